"""kernels/ssm_update.py: the Triton decode step against its twin, output and in-place state."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.ssm_update import ssm_update, ssm_update_ref
from tests.conftest import assert_close, nan_empty


def make_step_inputs(d: int, N: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Hymba-like values: A = -(1..N) with noise, softplus(dt + dt_bias) roughly in [0.005, 0.3] (spec 6.4)."""
    delta0 = torch.empty(d, device=device).uniform_(0.005, 0.3)
    A = -torch.arange(1, N + 1, device=device).float() * torch.exp(0.1 * torch.randn(d, N, device=device))
    return {
        "state": torch.randn(d, N, device=device),
        "x": torch.randn(d, device=device, dtype=dtype),
        "dt": (0.5 * torch.randn(d, device=device)).to(dtype),
        "A": A,
        "B": torch.randn(N, device=device, dtype=dtype),
        "C": torch.randn(N, device=device, dtype=dtype),
        "D": torch.randn(d, device=device),
        "z": torch.randn(d, device=device, dtype=dtype),
        "dt_bias": torch.log(torch.expm1(delta0)),  # inverse softplus
    }


def check_step(d: int, N: int, dtype: torch.dtype, device) -> None:
    inputs = make_step_inputs(d, N, dtype, device)
    ref_inputs = {k: v.clone() for k, v in inputs.items()}
    out = ssm_update(**inputs, out=nan_empty(d, dtype=dtype, device=device))
    ref = ssm_update_ref(**ref_inputs)
    assert_close("out", out, ref, dtype)
    assert_close("state", inputs["state"], ref_inputs["state"], torch.float32)


@pytest.mark.parametrize("d, N", [(16, 4), (100, 16), (37, 6)], ids=lambda v: str(v))  # 100, 37: not BLOCK_D multiples
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_ssm_update_matches_ref(d, N, dtype, device, seed):
    check_step(d, N, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_ssm_update_matches_ref_at_real_size(dtype, device, seed):
    check_step(3200, 16, dtype, device)


def test_softplus_matches_torch_over_its_range(device):
    """The kernel's softplus (threshold 20, log1p by Kahan's trick) against torch's, from e^-30 to far past 20."""
    y = torch.linspace(-30.0, 40.0, 701, device=device)
    zeros = torch.zeros(y.numel(), 1, device=device)
    state = zeros.clone()
    # With A = 0, B = 1, x = 1, C = 1, D = 0, z large: state = delta, out = delta * silu(z) ~ delta * z.
    ones = torch.ones(y.numel(), device=device)
    z = torch.full_like(ones, 30.0)
    out = ssm_update(state, ones, y, zeros, ones[:1], ones[:1], ones * 0, z, ones * 0)
    expected = torch.nn.functional.softplus(y)
    assert torch.allclose(state[:, 0], expected, rtol=2e-6, atol=0), (state[:, 0] - expected).abs().max()
    assert math.isfinite(out.sum().item())
