"""RMSNorm rows in one pass, and the hybrid mixer's normalize-both-branches-and-average (spec 6.2, 6.5).

rms_norm(x, w)                 = w * (x / sqrt(mean(x^2) + eps))   all in fp32, fp32 result
rms_norm_average(a, b, wa, wb) = (rms_norm(a, wa) + rms_norm(b, wb)) / 2   (spec 6.2), fp32 result
The result feeds a matrix product, which rounds it once to its operand dtype. (The reference rounds the normalized
vector to bf16 before scaling (Q10); measured against the goldens that only adds error: engine/model.py.)
Triton kernel + launchers for CUDA (and TRITON_INTERPRET=1); rms_norm_ref and rms_norm_average_ref are the twins.
"""

from __future__ import annotations

import torch

from kernels._triton import tl, triton


@triton.jit
def _normalize_row(x_ptr, w_ptr, offs, mask, n, eps):
    """One row: w * (x * rsqrt(mean(x^2) + eps)) in fp32."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps) * w


@triton.jit
def _rms_norm_kernel(
    a_ptr, wa_ptr, b_ptr, wb_ptr, out_ptr,  # pointers
    n, eps,  # sizes
    stride_a, stride_b, stride_out,  # row strides, in elements
    HAS_B: tl.constexpr, BLOCK: tl.constexpr,  # meta
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    out = _normalize_row(a_ptr + row * stride_a, wa_ptr, offs, mask, n, eps)
    if HAS_B:
        out = (out + _normalize_row(b_ptr + row * stride_b, wb_ptr, offs, mask, n, eps)) * 0.5
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(a, wa, b, wb, eps, out):
    n = a.shape[-1]
    rows = a.reshape(-1, n)
    assert rows.stride(1) == 1 and wa.shape == (n,), f"a {tuple(a.shape)}, weight {tuple(wa.shape)}"
    out = torch.empty(a.shape, dtype=torch.float32, device=a.device) if out is None else out
    out_rows = out.view(-1, n)
    b_rows = rows if b is None else b.reshape(-1, n)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, wa, b_rows, wa if wb is None else wb, out_rows,
        n, eps,
        rows.stride(0), b_rows.stride(0), out_rows.stride(0),
        HAS_B=b is not None, BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 2048 else 8,
    )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., n) any float dtype (rows may be strided)   weight: (n,)   returns (..., n) fp32"""
    return _launch(x, weight, None, None, eps, out)


def rms_norm_average(
    a: torch.Tensor,
    b: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(rms_norm(a, weight_a) + rms_norm(b, weight_b)) / 2.   a, b: (T, n)   weights: (n,)   returns (T, n) fp32"""
    assert a.shape == b.shape and b.stride(-1) == 1, f"a {tuple(a.shape)}, b {tuple(b.shape)}"
    return _launch(a, weight_a, b, weight_b, eps, out)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as rms_norm, written to be read."""
    x32 = x.float()
    result = weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))
    return result if out is None else out.copy_(result)


def rms_norm_average_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as rms_norm_average, written to be read."""
    result = (rms_norm_ref(a, weight_a, eps) + rms_norm_ref(b, weight_b, eps)) / 2
    return result if out is None else out.copy_(result)
