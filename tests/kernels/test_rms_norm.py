"""kernels/rms_norm.py: the fused RMSNorm and normalize-and-average against their twins."""

from __future__ import annotations

import pytest
import torch

from kernels.rms_norm import rms_norm, rms_norm_average, rms_norm_average_ref, rms_norm_ref
from tests.conftest import assert_close, nan_empty

EPS = 1e-6


def check_norms(T: int, n: int, x_dtype: torch.dtype, dtype: torch.dtype, device) -> None:
    """x_dtype: activations (fp32 in the model); dtype: the weights' (the serving dtype)."""
    x = torch.randn(T, n + 3, device=device, dtype=x_dtype)[:, :n]  # strided rows, as the model's slices are
    b = torch.randn(T, n, device=device, dtype=x_dtype)
    wa, wb = (1 + 0.1 * torch.randn(2, n, device=device)).to(dtype)
    out = rms_norm(x, wa, EPS, out=nan_empty(T, n, dtype=torch.float32, device=device))
    assert_close("rms_norm", out, rms_norm_ref(x, wa, EPS), dtype)
    out = rms_norm_average(x, b, wa, wb, EPS, out=nan_empty(T, n, dtype=torch.float32, device=device))
    assert_close("rms_norm_average", out, rms_norm_average_ref(x, b, wa, wb, EPS), dtype)
    # written straight in the weights' dtype, as prefill hands it to a matrix product: one rounding of the fp32 norm
    out = rms_norm(x, wa, EPS, out=nan_empty(T, n, dtype=dtype, device=device))
    assert_close("rms_norm into the operand dtype", out, rms_norm_ref(x, wa, EPS).to(dtype), dtype)


@pytest.mark.parametrize("T, n", [(1, 16), (7, 50), (3, 100)], ids=str)
@pytest.mark.parametrize("x_dtype, dtype", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                            (torch.float16, torch.float16)], ids=str)  # fmt: skip
def test_rms_norm_matches_ref(T, n, x_dtype, dtype, device, seed):
    check_norms(T, n, x_dtype, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("T, n", [(2048, 1600), (2048, 3200), (1, 3200), (1000, 100)], ids=str)
def test_rms_norm_matches_ref_at_real_size(T, n, device, seed):
    check_norms(T, n, torch.float32, torch.bfloat16, device)
