"""One decode step of the selective SSM for one request, updating its state in place.

state <- exp(delta*A) * state + (delta*x) outer B;   y = state @ C + D*x;   out = y * silu(z)
with delta = softplus(dt + dt_bias) in fp32 (spec 6.4, quirk Q8). ssm_update_ref is the PyTorch twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
) -> torch.Tensor:
    """Advance `state` by one token in place and return the gated output.

    state: (d, N) fp32     x, dt, z: (d,) activation dtype     A: (d, N) fp32     B, C: (N,)
    D, dt_bias: (d,) fp32  returns out: (d,) in x.dtype
    """
    xf = x.float()
    delta = F.softplus(dt.float() + dt_bias)  # (d,)
    state.mul_(torch.exp(delta.unsqueeze(1) * A)).add_((delta * xf).unsqueeze(1) * B.float())
    y = state @ C.float() + D * xf  # (d,)
    return (y * F.silu(z.float())).to(x.dtype)
