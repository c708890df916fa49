"""kernels/ssm_update.py: the fused decode step (dt/B/C split of the x_proj output, optional inner RMSNorms, dt_proj,
softplus with its bias, state update, gated output) against its twin, output and in-place state."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.ssm_update import BLOCK_D, ssm_update, ssm_update_ref
from tests.conftest import assert_close, nan_empty

EPS = 1e-6


def make_step_inputs(d: int, N: int, R: int, act_dtype, dtype, has_norms: bool, device) -> dict:
    """Hymba-like values: A = -(1..N) with noise, softplus(dt_proj @ dt + dt_bias) mostly in [0.005, 0.3] (spec 6.4).
    act_dtype: x, z and the x_proj output dbc (fp32 in the model); dtype: dt_proj's and the norms' weights."""
    delta0 = torch.empty(d, device=device).uniform_(0.005, 0.3)
    A = -torch.arange(1, N + 1, device=device).float() * torch.exp(0.1 * torch.randn(d, N, device=device))
    dbc = torch.cat([3 * torch.randn(R, device=device), torch.randn(2 * N, device=device)])  # dt | B | C
    norm_weights = None
    if has_norms:
        norm_weights = tuple((1 + 0.1 * torch.randn(n, device=device)).to(dtype) for n in (R, N, N))
    dt_scale = 0.5 / math.sqrt(R) / (1 if has_norms else 3)  # dt_proj @ dt ~ N(0, 0.25) either way
    return {
        "state": torch.randn(d, N, device=device),
        "x": torch.randn(d, device=device).to(act_dtype),
        "dbc": dbc.to(act_dtype),
        "dt_weight": (dt_scale * torch.randn(d, R, device=device)).to(dtype),
        "dt_bias": torch.log(torch.expm1(delta0)),  # inverse softplus
        "A": A,
        "D": torch.randn(d, device=device),
        "z": torch.randn(d, device=device).to(act_dtype),
        "norm_weights": norm_weights,
        "eps": EPS,
    }


def check_step(d: int, N: int, R: int, act_dtype, dtype, has_norms: bool, device) -> None:
    """The tolerance is the lower precision's: on CPU the twin rounds dt_proj's output to the weights' dtype."""
    inputs = make_step_inputs(d, N, R, act_dtype, dtype, has_norms, device)
    ref_inputs = {**inputs, "state": inputs["state"].clone()}
    out = ssm_update(**inputs, out=nan_empty(d, dtype=act_dtype, device=device))
    ref = ssm_update_ref(**ref_inputs)
    assert out.dtype == act_dtype
    assert_close("out", out, ref, dtype)
    assert_close("state", inputs["state"], ref_inputs["state"], dtype)


DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.float16)]
DTYPE_IDS = ["act32-w32", "act32-w16", "act16-w16"]


# (d, N, R): one partial block; d past one BLOCK_D and not a multiple of it; an exact BLOCK_D multiple; N and R not
# powers of two (masked inside their tiles); R = 1; the 1.5B's N and dt rank
SHAPES = [(16, 4, 4), (BLOCK_D + 36, 16, 7), (2 * BLOCK_D, 6, 13), (37, 5, 1), (50, 16, 100)]


@pytest.mark.parametrize("d, N, R", SHAPES, ids=str)
@pytest.mark.parametrize("act_dtype, dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("has_norms", [False, True], ids=["nonorms", "norms"])
def test_ssm_update_matches_ref(d, N, R, act_dtype, dtype, has_norms, device, seed):
    check_step(d, N, R, act_dtype, dtype, has_norms, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("has_norms", [True, False], ids=["norms", "nonorms"])
def test_ssm_update_matches_ref_at_real_size(dtype, has_norms, device, seed):
    """1.5B: d_inner 3200, N 16, dt rank 100; activations fp32 as in the model."""
    check_step(3200, 16, 100, torch.float32, dtype, has_norms, device)


def test_ssm_update_steps_accumulate_in_the_state(device, seed):
    """Five steps in a row on one state tensor, each against the twin's step on its own copy."""
    d, N, R = 70, 6, 5
    inputs = make_step_inputs(d, N, R, torch.float32, torch.float32, True, device)
    ref_state = inputs["state"].clone()
    for t in range(5):
        for name in ("x", "z", "dbc"):
            inputs[name] = torch.randn_like(inputs[name])
        out = ssm_update(**inputs)
        ref = ssm_update_ref(**{**inputs, "state": ref_state})
        assert_close(f"out at step {t}", out, ref, torch.float32)
    assert_close("state", inputs["state"], ref_state, torch.float32)


def test_softplus_matches_torch_over_its_range(device):
    """The kernel's softplus (threshold 20, log1p by Kahan's trick) against torch's, from e^-30 to far past 20."""
    y = torch.linspace(-30.0, 40.0, 701, device=device)
    d = y.numel()
    zeros, ones = torch.zeros(d, device=device), torch.ones(d, device=device)
    state = torch.zeros(d, 1, device=device)
    # R = N = 1, dt_proj's weight 0 and its bias y, so delta = softplus(y) exactly; with A = 0, B = 1, x = 1, C = 1,
    # D = 0, z large: state = delta, out = delta * silu(z) ~ delta * z.
    dbc = torch.tensor([0.0, 1.0, 1.0], device=device)  # dt | B | C
    z = torch.full_like(ones, 30.0)
    out = ssm_update(state, ones, dbc, zeros[:, None], y, zeros[:, None], zeros, z)
    expected = torch.nn.functional.softplus(y)
    assert torch.allclose(state[:, 0], expected, rtol=2e-6, atol=0), (state[:, 0] - expected).abs().max()
    assert math.isfinite(out.sum().item())
