"""Causal depthwise conv1d + SiLU over one request's channels, reading and writing its conv state in place.

u[t, d] = silu(bias[d] + sum_k weight[d, k] * x[t - (K-1) + k, d]), where times before the chunk come from the
conv state (the last K-1 inputs of the previous call; zeros at the start of a request). Spec section 6.4 step 1.
causal_conv1d (prefill, T tokens) and causal_conv1d_update (decode, one token), each with its PyTorch _ref twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor
) -> torch.Tensor:
    """Conv over a chunk of T tokens; conv_state ends holding the chunk's last K-1 inputs (older ones if T < K-1).

    x: (T, d) any float dtype, rows may be strided     weight: (d, K) fp32     bias: (d,) fp32 or None
    conv_state: (d, K-1) fp32, updated in place       returns u: (T, d) in x.dtype
    """
    T, d = x.shape
    K = weight.shape[1]
    xs = torch.cat([conv_state, x.float().t()], dim=1)  # (d, K-1+T) fp32
    u = F.conv1d(xs.unsqueeze(0), weight.unsqueeze(1), bias, groups=d).squeeze(0)  # (d, T)
    conv_state.copy_(xs[:, xs.shape[1] - (K - 1) :])
    return F.silu(u).t().to(x.dtype)


def causal_conv1d_update_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor
) -> torch.Tensor:
    """One token: x (d,), same weight/bias/state contract as causal_conv1d_ref; returns u (d,) in x.dtype."""
    xs = torch.cat([conv_state, x.float().unsqueeze(1)], dim=1)  # (d, K) fp32
    u = (xs * weight).sum(dim=1)  # (d,)
    if bias is not None:
        u = u + bias
    conv_state.copy_(xs[:, 1:])
    return F.silu(u).to(x.dtype)
