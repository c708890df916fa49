"""One decode step of the SSM heads for one request, from the x_proj output on, updating the state in place.

    dt, B, C = split(dbc, [R, N, N]);  with inner norms: dt, B, C = rms_norm(dt), rms_norm(B), rms_norm(C)
    delta = softplus(dt_proj_weight @ dt + dt_bias)          (the bias added in fp32 inside: spec 6.4, quirk Q8)
    state <- exp(delta*A) * state + (delta*x) outer B;   y = state @ C + D*x;   out = y * silu(z)

At batch 1 each of these is a tiny op, so one launch does them all (issue 5): every program recomputes the three
small norms (R + 2N floats) and owns BLOCK_D channels' rows of dt_proj and of the state. Roundings as in
engine/model.py: norms in fp32, the dt operand rounded once to dt_proj's dtype, fp32 accumulation and state.
With programmatic dependent launch (CUDA, kernels/gemv.py launch_facts) a program loads its weights and its state
rows, which no kernel of the step writes before it, then waits for the kernels before it.
Triton kernel + launcher ssm_update for CUDA (and TRITON_INTERPRET=1); ssm_update_ref is the PyTorch twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import tl, triton
from kernels.gemv import launch_facts, linear
from kernels.rms_norm import rms_norm_ref

BLOCK_D = 8  # channels per program: 400 programs at d_inner = 3200; 5.3 us on the H100 against 10.5 at 64 (sweep)
USE_PDL = True  # with programmatic dependent launch where kernels/gemv.py launch_facts allows it


@triton.jit
def softplus(y):
    """log(1 + e^y), y for y > 20 (torch's threshold); log1p by Kahan's trick, exact for tiny e^y too."""
    e = tl.exp(tl.minimum(y, 20.0))
    one_plus = 1.0 + e
    is_tiny = one_plus == 1.0
    log1p = tl.where(is_tiny, e, tl.log(one_plus) * (e / tl.where(is_tiny, 1.0, one_plus - 1.0)))
    return tl.where(y > 20.0, y, log1p)


@triton.jit
def _load_normed(ptr, norm_w, offs, n, eps, HAS_NORM: tl.constexpr):
    """The vector at ptr (n long), RMS-normalised with the loaded weights norm_w if HAS_NORM."""
    v = tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    if HAS_NORM:
        v = v * tl.rsqrt(tl.sum(v * v, axis=0) / n + eps) * norm_w
    return v


@triton.jit
def _ssm_update_kernel(
    state_ptr, x_ptr, dbc_ptr, dt_w_ptr, dt_bias_ptr, A_ptr, D_ptr, z_ptr,  # pointers
    dt_norm_ptr, B_norm_ptr, C_norm_ptr, out_ptr,
    d_inner, d_state, dt_rank, eps,  # sizes
    stride_state_d, stride_A_d, stride_dt_w,  # strides, in elements (vectors are contiguous)
    HAS_NORMS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,  # meta
    USE_PDL: tl.constexpr,
):  # fmt: skip
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # the channels this program owns
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_d = offs_d < d_inner
    mask_dn = mask_d[:, None] & (offs_n[None, :] < d_state)
    # before the wait, everything no kernel of this step writes before this one: the weights, and the state, last
    # written by this layer's update in an earlier step
    dt_w = tl.load(dt_w_ptr + offs_d[:, None] * stride_dt_w + offs_r[None, :],
                   mask=mask_d[:, None] & (offs_r < dt_rank)[None, :], other=0.0)  # fmt: skip
    A = tl.load(A_ptr + offs_d[:, None] * stride_A_d + offs_n[None, :], mask=mask_dn, other=0.0)  # (BLOCK_D, BLOCK_N)
    dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0)
    D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    p_state = state_ptr + offs_d[:, None] * stride_state_d + offs_n[None, :]
    state = tl.load(p_state, mask=mask_dn, other=0.0)
    if HAS_NORMS:
        dt_norm = tl.load(dt_norm_ptr + offs_r, mask=offs_r < dt_rank, other=0.0).to(tl.float32)
        B_norm = tl.load(B_norm_ptr + offs_n, mask=offs_n < d_state, other=0.0).to(tl.float32)
        C_norm = tl.load(C_norm_ptr + offs_n, mask=offs_n < d_state, other=0.0).to(tl.float32)
    else:
        dt_norm, B_norm, C_norm = 1.0, 1.0, 1.0
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()

    dt_low = _load_normed(dbc_ptr, dt_norm, offs_r, dt_rank, eps, HAS_NORMS)  # (BLOCK_R,)
    B = _load_normed(dbc_ptr + dt_rank, B_norm, offs_n, d_state, eps, HAS_NORMS)  # (BLOCK_N,)
    C = _load_normed(dbc_ptr + dt_rank + d_state, C_norm, offs_n, d_state, eps, HAS_NORMS)
    dt_low = dt_low.to(dt_w_ptr.dtype.element_ty).to(tl.float32)  # the operand rounding of dt_proj
    dt = tl.sum(dt_w.to(tl.float32) * dt_low[None, :], axis=1)  # (BLOCK_D,) fp32
    delta = softplus(dt + dt_bias)  # bias added in fp32 (Q8)

    x = tl.load(x_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # (BLOCK_D,)
    z = tl.load(z_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state = tl.exp(delta[:, None] * A) * state + (delta * x)[:, None] * B[None, :]
    tl.store(p_state, state, mask=mask_dn)
    y = tl.sum(state * C[None, :], axis=1) + D * x
    out = y * z * tl.sigmoid(z)
    tl.store(out_ptr + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def ssm_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dbc: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    norm_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    eps: float = 0.0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advance `state` by one token in place and return the gated output.

    state: (d, N) fp32      x, z: (d,) activation dtype (the conv output and the gate)
    dbc: (R + 2N,) the x_proj output [dt | B | C]     dt_weight: (d, R) dt_proj's weight     dt_bias, D: (d,) fp32
    A: (d, N) fp32          norm_weights: the dt, B and C RMSNorm weights (R,), (N,), (N,), or None for no norms
    returns out: (d,) in x.dtype (written into `out` if given)
    """
    d, N = state.shape
    R = dt_weight.shape[1]
    assert state.dtype == torch.float32 and state.stride(1) == 1 and A.stride(1) == 1, "state, A: fp32 rows"
    assert dt_weight.shape == (d, R) and dt_weight.stride(1) == 1, f"dt_weight {tuple(dt_weight.shape)}"
    for name, t, n in (("x", x, d), ("z", z, d), ("D", D, d), ("dt_bias", dt_bias, d), ("dbc", dbc, R + 2 * N)):
        assert t.shape == (n,) and t.stride(0) == 1, f"{name}: expected contiguous ({n},), got {tuple(t.shape)}"
    norm_dt, norm_B, norm_C = (dbc, dbc, dbc) if norm_weights is None else norm_weights
    out = torch.empty_like(x) if out is None else out
    use_pdl = launch_facts(x)[1] and USE_PDL
    _ssm_update_kernel[(triton.cdiv(d, BLOCK_D),)](
        state, x, dbc, dt_weight, dt_bias, A, D, z, norm_dt, norm_B, norm_C, out,
        d, N, R, eps,
        state.stride(0), A.stride(0), dt_weight.stride(0),
        HAS_NORMS=norm_weights is not None, BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(N),
        BLOCK_R=triton.next_power_of_2(R), USE_PDL=use_pdl, launch_pdl=use_pdl,
    )  # fmt: skip
    return out


def ssm_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dbc: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    norm_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    eps: float = 0.0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ssm_update, written to be read: fp32 math, one line per equation."""
    R, N = dt_weight.shape[1], state.shape[1]
    dt, B, C = dbc.float().split([R, N, N])
    if norm_weights is not None:
        dt, B, C = (rms_norm_ref(v, w, eps) for v, w in zip((dt, B, C), norm_weights, strict=True))
    dt = linear(dt, dt_weight)
    xf = x.float()
    delta = F.softplus(dt + dt_bias)  # (d,)
    state.mul_(torch.exp(delta.unsqueeze(1) * A)).add_((delta * xf).unsqueeze(1) * B)
    y = state @ C + D * xf  # (d,)
    result = (y * F.silu(z.float())).to(x.dtype)
    return result if out is None else out.copy_(result)
