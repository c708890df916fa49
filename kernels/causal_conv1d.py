"""Causal depthwise conv1d + SiLU over one request's channels, reading and writing its conv state in place.

u[t, d] = silu(bias[d] + sum_k weight[d, k] * x[t - (K-1) + k, d]), where times before the chunk come from the
conv state (the last K-1 inputs of the previous call; zeros at the start of a request). Spec section 6.4 step 1.
causal_conv1d (prefill, T tokens) and causal_conv1d_update (decode, one token): Triton kernels + launchers for CUDA
(and TRITON_INTERPRET=1), each with its PyTorch _ref twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import tl, triton
from kernels.gemv import launch_facts

BLOCK_T = 32  # prefill tile: (32 tokens, 128 channels) -> 1600 programs at T = 2048, d_inner = 3200
BLOCK_D = 128
BLOCK_D_UPDATE = 256  # decode: 13 programs at d_inner = 3200
UPDATE_USE_PDL = True  # decode, with programmatic dependent launch where kernels/gemv.py launch_facts allows it


@triton.jit
def _causal_conv1d_kernel(
    x_ptr, weight_ptr, bias_ptr, state_ptr, out_ptr, valid_ptr,  # pointers
    T, d,  # sizes
    stride_x_t, stride_out_t, stride_w_d, stride_state_d,  # strides, in elements (channels are contiguous)
    K: tl.constexpr, BLOCK_KM1: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr,  # meta
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    i_t = tl.program_id(0)
    offs_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < d

    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    for k in tl.static_range(K):
        src = offs_t - (K - 1) + k  # (BLOCK_T,) input time; negative: from the conv state, column K-1+src
        from_x = (mask_t & (src >= 0))[:, None] & mask_d[None, :]
        from_state = (mask_t & (src < 0))[:, None] & mask_d[None, :]
        xk = tl.load(x_ptr + src[:, None] * stride_x_t + offs_d[None, :], mask=from_x, other=0.0).to(tl.float32)
        xk += tl.load(state_ptr + offs_d[None, :] * stride_state_d + (K - 1 + src)[:, None], mask=from_state,
                      other=0.0)  # fmt: skip
        acc += xk * tl.load(weight_ptr + offs_d * stride_w_d + k, mask=mask_d, other=0.0)[None, :]
    out = acc * tl.sigmoid(acc)
    tl.store(out_ptr + offs_t[:, None] * stride_out_t + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_d[None, :])  # fmt: skip

    # The first time tile is the only reader of the old state, so it alone writes the new one: the last K-1
    # inputs of [old state | x[:n]], i.e. column j <- input time n-(K-1)+j (from x if >= 0, else old column n+j),
    # where n = T, or the count of real rows of a padded chunk (read on the device).
    if i_t == 0:
        n = T
        if HAS_VALID:
            n = tl.load(valid_ptr).to(tl.int32)
        offs_j = tl.arange(0, BLOCK_KM1)
        src_j = n - (K - 1) + offs_j
        mask_j = (offs_j < K - 1)[None, :] & mask_d[:, None]
        new = tl.load(x_ptr + src_j[None, :] * stride_x_t + offs_d[:, None], mask=mask_j & (src_j >= 0)[None, :],
                      other=0.0).to(tl.float32)  # fmt: skip
        new += tl.load(state_ptr + offs_d[:, None] * stride_state_d + (n + offs_j)[None, :],
                       mask=mask_j & (src_j < 0)[None, :], other=0.0)  # fmt: skip
        tl.debug_barrier()  # every thread has read the old state before any thread overwrites it
        tl.store(state_ptr + offs_d[:, None] * stride_state_d + offs_j[None, :], new, mask=mask_j)


@triton.jit
def _causal_conv1d_update_kernel(
    x_ptr, weight_ptr, bias_ptr, state_ptr, out_ptr,  # pointers
    d,  # sizes
    stride_w_d, stride_state_d,  # strides, in elements
    K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,  # meta
    USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # nothing before this reads or writes memory
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_d = offs_d < d
    x = tl.load(x_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # (BLOCK_D,)
    # window[:, k] = state[:, k] for k < K-1, the new input x at k = K-1
    in_state = mask_d[:, None] & (offs_k < K - 1)[None, :]
    window = tl.load(state_ptr + offs_d[:, None] * stride_state_d + offs_k[None, :], mask=in_state, other=0.0)
    window += tl.where((offs_k == K - 1)[None, :], x[:, None], 0.0)
    w = tl.load(weight_ptr + offs_d[:, None] * stride_w_d + offs_k[None, :],
                mask=mask_d[:, None] & (offs_k < K)[None, :], other=0.0)  # fmt: skip
    acc = tl.sum(window * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    out = acc * tl.sigmoid(acc)
    tl.store(out_ptr + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)

    # shift left by one: new state[:, j] = window[:, j+1], read again from memory at an offset of one column
    shifted = tl.load(state_ptr + offs_d[:, None] * stride_state_d + (offs_k + 1)[None, :],
                      mask=mask_d[:, None] & (offs_k + 1 < K - 1)[None, :], other=0.0)  # fmt: skip
    shifted += tl.where((offs_k == K - 2)[None, :], x[:, None], 0.0)
    tl.debug_barrier()  # every thread has read the old state before any thread overwrites it
    tl.store(state_ptr + offs_d[:, None] * stride_state_d + offs_k[None, :], shifted, mask=in_state)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Conv over a chunk of T tokens; conv_state ends holding the chunk's last K-1 inputs (older ones if T < K-1).

    x: (T, d) any float dtype, rows may be strided     weight: (d, K) fp32     bias: (d,) fp32 or None
    conv_state: (d, K-1) fp32, updated in place       returns u: (T, d) in x.dtype (written into `out` if given)
    valid: None, or a 0-d int64 device tensor n <= T: only the first n rows are tokens (a padded chunk in a CUDA
    graph), so the state ends holding the last K-1 inputs of x[:n]; the outputs of rows past n are not used.
    """
    T, d = x.shape
    K = weight.shape[1]
    assert x.stride(1) == 1 and weight.stride(1) == 1 and conv_state.stride(1) == 1, "channels must be contiguous"
    assert conv_state.shape == (d, K - 1) and conv_state.dtype == torch.float32, f"conv_state {conv_state.shape}"
    out = torch.empty(T, d, dtype=x.dtype, device=x.device) if out is None else out
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(d, BLOCK_D))
    _causal_conv1d_kernel[grid](
        x, weight, bias, conv_state, out, valid,
        T, d,
        x.stride(0), out.stride(0), weight.stride(0), conv_state.stride(0),
        K=K, BLOCK_KM1=triton.next_power_of_2(K - 1), HAS_BIAS=bias is not None, HAS_VALID=valid is not None,
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token: x (d,), same weight/bias/state contract as causal_conv1d; returns u (d,) in x.dtype."""
    (d,) = x.shape
    K = weight.shape[1]
    assert x.stride(0) == 1 and weight.stride(1) == 1 and conv_state.stride(1) == 1, "channels must be contiguous"
    assert conv_state.shape == (d, K - 1) and conv_state.dtype == torch.float32, f"conv_state {conv_state.shape}"
    out = torch.empty_like(x) if out is None else out
    use_pdl = launch_facts(x)[1] and UPDATE_USE_PDL
    _causal_conv1d_update_kernel[(triton.cdiv(d, BLOCK_D_UPDATE),)](
        x, weight, bias, conv_state, out,
        d,
        weight.stride(0), conv_state.stride(0),
        K=K, BLOCK_K=triton.next_power_of_2(K), HAS_BIAS=bias is not None, BLOCK_D=BLOCK_D_UPDATE,
        USE_PDL=use_pdl, launch_pdl=use_pdl,
    )  # fmt: skip
    return out


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as causal_conv1d, through F.conv1d over [conv_state | x] in fp32."""
    T, d = x.shape
    K = weight.shape[1]
    xs = torch.cat([conv_state, x.float().t()], dim=1)  # (d, K-1+T) fp32
    u = F.conv1d(xs.unsqueeze(0), weight.unsqueeze(1), bias, groups=d).squeeze(0)  # (d, T)
    n = T if valid is None else valid  # the state's columns: inputs n-(K-1) .. n-1, gathered without a sync
    conv_state.copy_(xs.index_select(1, torch.arange(K - 1, device=xs.device) + n))
    result = F.silu(u).t().to(x.dtype)
    return result if out is None else out.copy_(result)


def causal_conv1d_update_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as causal_conv1d_update: the K-wide window [conv_state | x] times the weight, in fp32."""
    xs = torch.cat([conv_state, x.float().unsqueeze(1)], dim=1)  # (d, K) fp32
    u = (xs * weight).sum(dim=1)  # (d,)
    if bias is not None:
        u = u + bias
    conv_state.copy_(xs[:, 1:])
    result = F.silu(u).to(x.dtype)
    return result if out is None else out.copy_(result)
