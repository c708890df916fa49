"""kernels/selective_scan.py: the Triton prefill scan against its twin, and against T decode steps (ssm_update)."""

from __future__ import annotations

import pytest
import torch

from kernels.selective_scan import LANES_D, WARPS, selective_scan, selective_scan_ref
from kernels.ssm_update import ssm_update
from tests.conftest import assert_close, nan_empty

SEGMENTS = 32 // LANES_D * WARPS  # time segments per channel: the kernel's lanes and warps along time

# the interpreter itself warns on loops with run-time bounds (numpy >= 1.25)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def make_scan_inputs(T: int, d: int, N: int, dtype: torch.dtype, device, rank: int = 5) -> dict[str, torch.Tensor]:
    """Laid out as the model hands them over: z a column slice of in_proj's output, B and C slices of x_proj's.
    rank: dt's width in x_proj; 5 leaves B and C rows unaligned, Hymba's 100 aligns them (the vector path)."""
    in_proj = torch.randn(T, 3 * d, device=device, dtype=dtype)  # ... | x | z: z's rows are strided
    x_proj = torch.randn(T, rank + 2 * N, device=device, dtype=dtype)  # dt_in | B | C
    delta0 = torch.empty(d, device=device).uniform_(0.005, 0.3)
    return {
        "u": torch.randn(T, d, device=device, dtype=dtype),
        "dt": (0.5 * torch.randn(T, d, device=device)).to(dtype),
        "A": -torch.arange(1, N + 1, device=device).float() * torch.exp(0.1 * torch.randn(d, N, device=device)),
        "B": x_proj[:, rank : rank + N],
        "C": x_proj[:, rank + N :],
        "D": torch.randn(d, device=device),
        "z": in_proj[:, 2 * d :],
        "dt_bias": torch.log(torch.expm1(delta0)),  # inverse softplus: softplus(dt_bias) in [0.005, 0.3]
        "ssm_state": torch.randn(d, N, device=device),
    }


def check_scan(T: int, d: int, N: int, dtype: torch.dtype, device, rank: int = 5) -> None:
    inputs = make_scan_inputs(T, d, N, dtype, device, rank)
    ref_inputs = {**inputs, "ssm_state": inputs["ssm_state"].clone()}
    out = selective_scan(**inputs, out=nan_empty(T, d, dtype=dtype, device=device))
    ref = selective_scan_ref(**ref_inputs)
    assert_close("out", out, ref, dtype)
    assert_close("ssm_state", inputs["ssm_state"], ref_inputs["ssm_state"], torch.float32)


# 1: a single token; 37, 12: not multiples of the segments or the channel lanes; N = 6: not a power of two;
# 6 * SEGMENTS + 5: segments of several steps, the last one partial
SIZES = [(1, 8, 4), (37, 12, 6), (32, 8, 16), (6 * SEGMENTS + 5, 12, 16)]


@pytest.mark.parametrize("T, d, N", SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("rank", [5, 100], ids=["unaligned", "aligned"])
def test_selective_scan_matches_ref(T, d, N, dtype, rank, device, seed):
    check_scan(T, d, N, dtype, device, rank)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [2048, 1000, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rank", [5, 100], ids=["unaligned", "aligned"])
def test_selective_scan_matches_ref_at_real_size(T, dtype, rank, device, seed):
    check_scan(T, 3200, 16, dtype, device, rank)


def check_valid(T: int, d: int, N: int, n: int, device) -> None:
    """A call padded to T rows with valid = n leaves the state of an unpadded call on the first n rows and gives its
    outputs there; the padding rows' outputs are finite (written, whatever they hold)."""
    inputs = make_scan_inputs(T, d, N, torch.float32, device, rank=100)
    valid = torch.tensor(n, device=device)
    for scan in (selective_scan, selective_scan_ref):
        padded = {**inputs, "ssm_state": inputs["ssm_state"].clone()}
        head = {name: t[:n] if t.shape[0] == T and name != "A" else t for name, t in inputs.items()}
        head["ssm_state"] = inputs["ssm_state"].clone()
        out = scan(**padded, out=nan_empty(T, d, dtype=torch.float32, device=device), valid=valid)
        out_head = scan(**head)
        assert torch.isfinite(out).all(), f"{scan.__name__}: non-finite outputs in the padding rows"
        assert_close(f"{scan.__name__} out", out[:n], out_head, torch.float32)
        assert_close(f"{scan.__name__} ssm_state", padded["ssm_state"], head["ssm_state"], torch.float32)


# n = 0: nothing valid; 7: fewer rows than segments; 2 * SEGMENTS: segment boundaries; 4 * SEGMENTS + 13: a partial last
# segment; T
@pytest.mark.parametrize("n", [0, 7, 2 * SEGMENTS, 4 * SEGMENTS + 13, 6 * SEGMENTS + 4])
def test_selective_scan_valid_rows(n, device, seed):
    check_valid(6 * SEGMENTS + 4, 12, 16, n, device)


@pytest.mark.gpu
def test_selective_scan_valid_rows_at_real_size(device, seed):
    check_valid(2048, 3200, 16, 1500, device)


def test_prefill_scan_equals_decode_steps(device, seed):
    """Scanning T tokens leaves the same state, and gives the same outputs, as T one-token decode steps."""
    T, d, N = 2 * SEGMENTS + 9, 12, 6  # segments of a few rows, the last one partial
    inputs = make_scan_inputs(T, d, N, torch.float32, device)
    state = inputs["ssm_state"].clone()
    out = selective_scan(**inputs)
    # The decode step takes the x_proj output and applies dt_proj itself: an fp32 identity dt_proj (rank R = d)
    # passes the scan's dt through exactly, and no inner norms.
    dt_weight = torch.eye(d, device=device)
    steps = [
        ssm_update(state, inputs["u"][t], torch.cat([inputs["dt"][t], inputs["B"][t], inputs["C"][t]]).float(),
                   dt_weight, inputs["dt_bias"], inputs["A"], inputs["D"], inputs["z"][t], norm_weights=None)
        for t in range(T)
    ]  # fmt: skip
    assert_close("out", out, torch.stack(steps), torch.float32)
    assert_close("ssm_state", inputs["ssm_state"], state, torch.float32)
