"""kernels/rope.py: decode's RoPE launcher against its twin, for a KV-producing layer (the rotated query, and the
key and value written at the slot, every other slot untouched) and for a consumer layer (the query alone)."""

from __future__ import annotations

import pytest
import torch

from kernels.rope import rope_decode, rope_decode_ref
from tests.conftest import assert_close, nan_empty


def make_rope_inputs(H: int, Hk: int, dq: int, dv: int, positions: int, device) -> dict[str, torch.Tensor]:
    """qkv as the model hands it over: the fp32 in_proj output q | k | v followed by the SSM's x | z. The tables
    are random, so the two halves of a row differ (real ones repeat): a kernel that reads the wrong half fails."""
    return {
        "qkv": torch.randn(H * dq + Hk * (dq + dv) + 2 * 24, device=device),
        "cos": torch.rand(positions, dq, device=device) * 2 - 1,
        "sin": torch.rand(positions, dq, device=device) * 2 - 1,
    }


def check_rope(H, Hk, dq, dv, capacity, pos, slot, dtype, produce, device) -> None:
    """produce: a KV-producing layer's call (q, k and v); else a consumer's (q alone)."""
    inputs = make_rope_inputs(H, Hk, dq, dv, pos + 3, device)
    pos_t = torch.tensor([pos], device=device)
    q_out = nan_empty(H, dq, dtype=dtype, device=device)
    expected_q = torch.empty(H, dq, dtype=dtype, device=device)
    if not produce:
        out = rope_decode(inputs["qkv"], pos_t, inputs["cos"], inputs["sin"], q_out)
        assert out.data_ptr() == q_out.data_ptr(), "rope_decode returns q_out"
        assert_close("q", q_out, rope_decode_ref(inputs["qkv"], pos_t, inputs["cos"], inputs["sin"], expected_q), dtype)
        return

    # Buffers filled with earlier tokens' keys and values, the slot about to be written with NaN: a slot the kernel
    # forgets stays NaN, a write elsewhere changes a slot that must keep its value.
    k_buf = torch.randn(Hk, capacity, dq, device=device).to(dtype)
    v_buf = torch.randn(Hk, capacity, dv, device=device).to(dtype)
    k_buf[:, slot], v_buf[:, slot] = float("nan"), float("nan")
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    slot_t = torch.tensor([slot], device=device)
    rope_decode(inputs["qkv"], pos_t, inputs["cos"], inputs["sin"], q_out, k_buf, v_buf, slot_t)
    rope_decode_ref(inputs["qkv"], pos_t, inputs["cos"], inputs["sin"], expected_q, k_ref, v_ref, slot_t)
    assert_close("q", q_out, expected_q, dtype)
    assert_close("k at the slot", k_buf[:, slot], k_ref[:, slot], dtype)
    assert_close("v at the slot", v_buf[:, slot], v_ref[:, slot], dtype)
    others = torch.arange(capacity, device=device) != slot
    assert torch.equal(k_buf[:, others], k_ref[:, others]), "k_buf changed outside the slot"
    assert torch.equal(v_buf[:, others], v_ref[:, others]), "v_buf changed outside the slot"


# (H, Hk, dq, dv, capacity, pos, slot): the mirror model's heads (dv = 2 dq), slot 0 and the last slot, a position
# past the capacity (a ring buffer's slot); dv not a power of two; dq / 2 not a power of two (the GQA conformance
# model's dq 12, dv 24); the 1.5B head dims, GQA 5:1 and the 1.5B heads
SHAPES = [
    (5, 1, 8, 16, 24, 0, 0),
    (4, 2, 12, 24, 9, 11, 2),
    (5, 1, 8, 16, 24, 40, 23),
    (4, 2, 8, 24, 10, 7, 3),
    (10, 2, 64, 128, 12, 100, 5),
    (25, 5, 64, 128, 40, 300, 39),
]


@pytest.mark.parametrize("H, Hk, dq, dv, capacity, pos, slot", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("produce", [True, False], ids=["producer", "q-only"])
def test_rope_decode_matches_ref(H, Hk, dq, dv, capacity, pos, slot, dtype, produce, device, seed):
    check_rope(H, Hk, dq, dv, capacity, pos, slot, dtype, produce, device)


def test_rope_decode_reads_position_and_slot_on_the_device(device, seed):
    """One launch replayed (as a CUDA graph replays it) sees new values written into the same pos and slot
    tensors: three steps fill three slots, each rotated at its own position."""
    H, Hk, dq, dv, capacity = 5, 1, 8, 16, 6
    inputs = make_rope_inputs(H, Hk, dq, dv, 20, device)
    pos, slot = torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.int64, device=device)
    k_buf = nan_empty(Hk, capacity, dq, dtype=torch.float32, device=device)
    v_buf = nan_empty(Hk, capacity, dv, dtype=torch.float32, device=device)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    for p, s in ((11, 2), (12, 3), (13, 0)):
        pos.fill_(p)
        slot.fill_(s)
        qkv = torch.randn_like(inputs["qkv"])
        q = rope_decode(qkv, pos, inputs["cos"], inputs["sin"], nan_empty(H, dq, dtype=torch.float32, device=device),
                        k_buf, v_buf, slot)  # fmt: skip
        expected_q = rope_decode_ref(qkv, pos, inputs["cos"], inputs["sin"], torch.empty_like(q), k_ref, v_ref, slot)
        assert_close(f"q at position {p}", q, expected_q, torch.float32)
    written = torch.tensor([0, 2, 3], device=device)
    assert_close("k", k_buf[:, written], k_ref[:, written], torch.float32)
    assert_close("v", v_buf[:, written], v_ref[:, written], torch.float32)
    assert torch.isnan(k_buf[:, [1, 4, 5]]).all() and torch.isnan(v_buf[:, [1, 4, 5]]).all(), "unused slots written"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("produce", [True, False], ids=["producer", "q-only"])
@pytest.mark.parametrize("pos, slot", [(0, 0), (5000, 1151), (700, 700)], ids=str)
def test_rope_decode_matches_ref_at_real_size(pos, slot, dtype, produce, device, seed):
    """1.5B: 25 query heads over 5 KV heads, dq 64, dv 128, a 1152-slot buffer (128 meta tokens + window 1024)."""
    check_rope(25, 5, 64, 128, 1152, pos, slot, dtype, produce, device)
