"""Batch-1 matrix-vector products for decode, with the ops around them fused in (issue 5).

At batch 1 every decode matmul reads its whole weight once, so its time is bytes / bandwidth, and what surrounds
it (a norm before, an activation or a residual add after) is a separate launch costing more than its bytes. One
kernel does all of it:

    y = epilogue(W @ prologue(x))
    prologue:  x                                              NORM = 0
               rms_norm(x, nw)                                NORM = 1   (input_layernorm, final norm, ...)
               (rms_norm(x, nw) + rms_norm(x2, nw2)) / 2      NORM = 2   (the mixer's two branches, spec 6.2)
    epilogue:  (+ bias)  then  silu(W x) * (W2 x)             ACT = 1    (SwiGLU: W gate, W2 up)
                               relu(W x)^2                    ACT = 2    (relu2)
               (+ residual)

Roundings follow engine/model.py exactly: the prologue is fp32, the operand is rounded once to the weight's
dtype, products accumulate in fp32, the result is fp32. A program owns BLOCK_N output rows and walks K in
BLOCK_K steps; the prologue's sums of squares are recomputed by every program (K floats from L2, a few % of the
weight bytes it reads), which is what lets the norm live in the same launch.
Launchers gemv / norm_gemv / norm_average_gemv / mlp_gemv for CUDA (and TRITON_INTERPRET=1); *_ref twins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import tl, triton
from kernels.rms_norm import rms_norm_average_ref, rms_norm_ref

# Launch shape (BLOCK_N, BLOCK_K, num_warps, num_stages) by weight shape: the fastest of 64 shapes on the H100 for each
# of the 1.5B model's decode products, timed in a CUDA graph with the weights read from HBM (tools/sweep_gemv.py;
# the table is in docs/PERFORMANCE.md). Microseconds there: in_proj 14.6, out_proj 8.0, gate+up 19.2, down 9.3,
# x_proj 2.7, LM head 43.0; the first shape tried (8, 256, 4, 3) took 16.0 / 19.1 / 23.6 / 27.7 / 10.3 / 50.8.
CONFIG_TWO_WEIGHTS = (8, 1024, 4, 1)  # gate + up: 5504 x 1600 twice
CONFIG_FEW_ROWS = (1, 1024, 8, 3)  # x_proj: 132 x 3200; one row per program keeps 132 programs in flight
CONFIG_LONG_ROWS = (2, 2048, 4, 1)  # down_proj: 1600 x 5504
CONFIG_MEDIUM = (8, 2048, 4, 3)  # out_proj: 1600 x 3200
CONFIG_VOCAB = (4, 256, 4, 3)  # the LM head: 32001 x 1600
CONFIG_WIDE = (16, 256, 8, 1)  # in_proj: 8960 x 1600


def launch_config(N: int, K: int, two_weights: bool = False) -> tuple[int, int, int, int]:
    if two_weights:
        return CONFIG_TWO_WEIGHTS
    if N < 512:
        return CONFIG_FEW_ROWS
    if K >= 4096:
        return CONFIG_LONG_ROWS
    if N < 4096:
        return CONFIG_MEDIUM
    return CONFIG_VOCAB if N >= 16384 else CONFIG_WIDE


@triton.jit
def _sum_squares(x_ptr, K, BLOCK_K: tl.constexpr):
    offs = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        acc += x * x
    return tl.sum(acc, axis=0)


@triton.jit
def _gemv_kernel(
    x_ptr, x2_ptr, nw_ptr, nw2_ptr, w_ptr, w2_ptr, bias_ptr, res_ptr, out_ptr,  # pointers
    N, K, eps, stride_w, stride_w2,  # sizes, strides in elements
    NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,  # what to fuse
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows < N
    offs_k = tl.arange(0, BLOCK_K)
    if NORM >= 1:
        rstd = tl.rsqrt(_sum_squares(x_ptr, K, BLOCK_K) / K + eps)
    if NORM == 2:
        rstd2 = tl.rsqrt(_sum_squares(x2_ptr, K, BLOCK_K) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(x_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)
        if NORM >= 1:
            x = x * rstd * tl.load(nw_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)
        if NORM == 2:
            x2 = tl.load(x2_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)
            x = (x + x2 * rstd2 * tl.load(nw2_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)) * 0.5
        x = x.to(w_ptr.dtype.element_ty).to(tl.float32)[None, :]  # the one rounding to the operand dtype
        mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_w + kk[None, :], mask=mask, other=0.0)
        acc += w.to(tl.float32) * x
        if ACT == 1:
            w2 = tl.load(w2_ptr + rows[:, None] * stride_w2 + kk[None, :], mask=mask, other=0.0)
            acc2 += w2.to(tl.float32) * x
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)
    if ACT == 1:
        y = y * tl.sigmoid(y) * tl.sum(acc2, axis=1)
    if ACT == 2:
        y = tl.maximum(y, 0.0)
        y = y * y
    if HAS_RES:
        y += tl.load(res_ptr + rows, mask=mask_n, other=0.0)
    tl.store(out_ptr + rows, y, mask=mask_n)


def _launch(
    x, weight, *, x2=None, nw=None, nw2=None, eps=0.0, w2=None, act=0, bias=None, residual=None, out=None, config=None
):
    N, K = weight.shape
    assert x.shape == (K,) and x.is_contiguous(), f"x {tuple(x.shape)} for weight {tuple(weight.shape)}"
    assert weight.stride(1) == 1 and (w2 is None or (w2.shape == weight.shape and w2.stride(1) == 1))
    assert residual is None or (residual.shape == (N,) and residual.dtype == torch.float32)
    out = torch.empty(N, dtype=torch.float32, device=x.device) if out is None else out
    assert out.shape == (N,) and out.dtype == torch.float32 and out.is_contiguous()
    block_n, block_k, num_warps, num_stages = config or launch_config(N, K, w2 is not None)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, x if x2 is None else x2, x if nw is None else nw, x if nw2 is None else nw2,
        weight, weight if w2 is None else w2, x if bias is None else bias, x if residual is None else residual, out,
        N, K, eps, weight.stride(0), weight.stride(0) if w2 is None else w2.stride(0),
        NORM=0 if nw is None else (1 if x2 is None else 2), ACT=act, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def gemv(x, weight, bias=None, *, residual=None, out=None, config=None) -> torch.Tensor:
    """weight @ x (+ bias) (+ residual).   x: (K,) any float   weight: (N, K)   bias: (N,)   residual: (N,) fp32
    returns (N,) fp32 (written into `out` if given; out may be `residual`, updated in place).
    config: (BLOCK_N, BLOCK_K, num_warps, num_stages) instead of launch_config's (for sweeps)."""
    return _launch(x, weight, bias=bias, residual=residual, out=out, config=config)


def norm_gemv(x, norm_weight, eps, weight, bias=None, *, out=None, config=None) -> torch.Tensor:
    """weight @ rms_norm(x, norm_weight) (+ bias).   returns (N,) fp32"""
    return _launch(x, weight, nw=norm_weight, eps=eps, bias=bias, out=out, config=config)


def norm_average_gemv(
    a, b, weight_a, weight_b, eps, weight, bias=None, *, residual=None, out=None, config=None
) -> torch.Tensor:
    """weight @ ((rms_norm(a, weight_a) + rms_norm(b, weight_b)) / 2) (+ bias) (+ residual).   returns (N,) fp32"""
    assert b.shape == a.shape and b.is_contiguous()
    return _launch(
        a, weight, x2=b, nw=weight_a, nw2=weight_b, eps=eps, bias=bias, residual=residual, out=out, config=config
    )


def mlp_gemv(x, norm_weight, eps, gate_weight, up_weight, *, out=None, config=None) -> torch.Tensor:
    """The MLP's first half on rms_norm(x): silu(gate @ n) * (up @ n), or relu(up @ n)^2 when gate_weight is None.
    returns (intermediate,) fp32"""
    if gate_weight is None:
        return _launch(x, up_weight, nw=norm_weight, eps=eps, act=2, out=out, config=config)
    return _launch(x, gate_weight, nw=norm_weight, eps=eps, w2=up_weight, act=1, out=out, config=config)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): operands in the weight's dtype, fp32 accumulation, fp32 result. The matrix product of
    engine/model.py's prefill and of the twins below. x: (..., K)   weight: (N, K)   returns (..., N) fp32"""
    x = x.to(weight.dtype)
    if x.is_cuda and weight.dtype != torch.float32:  # cuBLAS writes the fp32 accumulator without rounding
        y = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32).view(*x.shape[:-1], -1)
    else:
        y = F.linear(x, weight).float()  # CPU torch has no bf16-in / fp32-out product: the output is rounded
    return y if bias is None else y + bias.float()


# --- twins: the same contracts, composed from the ops engine/model.py's prefill uses ---


def _finish(y, residual, out):
    if residual is not None:
        y = y + residual
    return y if out is None else out.copy_(y)


def gemv_ref(x, weight, bias=None, *, residual=None, out=None) -> torch.Tensor:
    return _finish(linear(x.float(), weight, bias), residual, out)


def norm_gemv_ref(x, norm_weight, eps, weight, bias=None, *, out=None) -> torch.Tensor:
    return _finish(linear(rms_norm_ref(x, norm_weight, eps), weight, bias), None, out)


def norm_average_gemv_ref(a, b, weight_a, weight_b, eps, weight, bias=None, *, residual=None, out=None):
    mixed = rms_norm_average_ref(a, b, weight_a, weight_b, eps)
    return _finish(linear(mixed, weight, bias), residual, out)


def mlp_gemv_ref(x, norm_weight, eps, gate_weight, up_weight, *, out=None) -> torch.Tensor:
    n = rms_norm_ref(x, norm_weight, eps)
    if gate_weight is None:
        y = F.relu(linear(n, up_weight)).square()
    else:
        y = F.silu(linear(n, gate_weight)) * linear(n, up_weight)
    return _finish(y, None, out)
