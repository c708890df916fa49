"""One decode step of the selective SSM for one request, updating its state in place.

state <- exp(delta*A) * state + (delta*x) outer B;   y = state @ C + D*x;   out = y * silu(z)
with delta = softplus(dt + dt_bias) in fp32 (spec 6.4, quirk Q8). Triton kernel + launcher ssm_update for CUDA (and
TRITON_INTERPRET=1); ssm_update_ref is the PyTorch twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import tl, triton

BLOCK_D = 64  # channels per program: 50 programs at d_inner = 3200, each holding a (64, 16) fp32 state tile


@triton.jit
def softplus(y):
    """log(1 + e^y), y for y > 20 (torch's threshold); log1p by Kahan's trick, exact for tiny e^y too."""
    e = tl.exp(tl.minimum(y, 20.0))
    one_plus = 1.0 + e
    is_tiny = one_plus == 1.0
    log1p = tl.where(is_tiny, e, tl.log(one_plus) * (e / tl.where(is_tiny, 1.0, one_plus - 1.0)))
    return tl.where(y > 20.0, y, log1p)


@triton.jit
def _ssm_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, out_ptr,  # pointers
    d_inner, d_state,  # sizes
    stride_state_d, stride_A_d,  # strides, in elements (vectors are contiguous)
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,  # meta
):  # fmt: skip
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # the channels this program owns
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_dn = mask_d[:, None] & (offs_n[None, :] < d_state)

    x = tl.load(x_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # (BLOCK_D,)
    z = tl.load(z_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    delta = softplus(dt + tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0))  # bias added in fp32 (Q8)
    B = tl.load(B_ptr + offs_n, mask=offs_n < d_state, other=0.0).to(tl.float32)  # (BLOCK_N,)
    C = tl.load(C_ptr + offs_n, mask=offs_n < d_state, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_d[:, None] * stride_A_d + offs_n[None, :], mask=mask_dn, other=0.0)  # (BLOCK_D, BLOCK_N)
    p_state = state_ptr + offs_d[:, None] * stride_state_d + offs_n[None, :]
    state = tl.load(p_state, mask=mask_dn, other=0.0)

    state = tl.exp(delta[:, None] * A) * state + (delta * x)[:, None] * B[None, :]
    tl.store(p_state, state, mask=mask_dn)
    y = tl.sum(state * C[None, :], axis=1) + tl.load(D_ptr + offs_d, mask=mask_d, other=0.0) * x
    out = y * z * tl.sigmoid(z)
    tl.store(out_ptr + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def ssm_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advance `state` by one token in place and return the gated output.

    state: (d, N) fp32     x, dt, z: (d,) activation dtype     A: (d, N) fp32     B, C: (N,)
    D, dt_bias: (d,) fp32  returns out: (d,) in x.dtype (written into `out` if given)
    """
    d, N = state.shape
    assert state.dtype == torch.float32 and state.stride(1) == 1 and A.stride(1) == 1, "state, A: fp32 rows"
    for name, t, n in (("x", x, d), ("dt", dt, d), ("z", z, d), ("D", D, d), ("dt_bias", dt_bias, d),
                       ("B", B, N), ("C", C, N)):  # fmt: skip
        assert t.shape == (n,) and t.stride(0) == 1, f"{name}: expected contiguous ({n},), got {tuple(t.shape)}"
    out = torch.empty_like(x) if out is None else out
    grid = (triton.cdiv(d, BLOCK_D),)
    _ssm_update_kernel[grid](
        state, x, dt, A, B, C, D, z, dt_bias, out,
        d, N,
        state.stride(0), A.stride(0),
        BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(N),
    )  # fmt: skip
    return out


def ssm_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ssm_update, written to be read: fp32 math, one line per equation."""
    xf = x.float()
    delta = F.softplus(dt.float() + dt_bias)  # (d,)
    state.mul_(torch.exp(delta.unsqueeze(1) * A)).add_((delta * xf).unsqueeze(1) * B.float())
    y = state @ C.float() + D * xf  # (d,)
    result = (y * F.silu(z.float())).to(x.dtype)
    return result if out is None else out.copy_(result)
