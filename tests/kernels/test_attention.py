"""kernels/attention.py: prefill (causal, sliding window + meta tokens, GQA, dq != dv) and decode (split over the
key axis, num_valid as an int or a device tensor) against their twins; ring-buffer decode through DecodeState's
slot arithmetic against plain attention over the meta tokens + the last `window` positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import HymbaConfig
from engine.state import DecodeState
from kernels import attention
from kernels.attention import (
    attention_decode,
    attention_decode_ref,
    attention_prefill,
    attention_prefill_ref,
    rope_attention_decode,
    rope_attention_decode_ref,
)
from kernels.prefill_kv import store_kv_ref
from tests.conftest import assert_close, nan_empty

# the interpreter itself warns on loops with run-time bounds (numpy >= 1.25)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

MIRROR_CONFIG = Path(__file__).parents[1] / "data" / "conformance" / "hymba-mirror-12L" / "config.json"


def prefill_positions(start: int, T: int, num_meta: int, window: int | None, device):
    """Query and key positions of a prefill call as the model makes them: the meta tokens, the history a query at
    `start` may see (all of it, or the last `window` positions), then the T new positions."""
    q_pos = torch.arange(start, start + T, device=device)
    meta = torch.arange(min(start, num_meta), device=device)
    lo = num_meta if window is None else max(num_meta, start - window)
    k_pos = torch.cat([meta, torch.arange(lo, max(lo, start), device=device), q_pos])
    return q_pos, k_pos


def check_prefill(T, H, Hk, dq, dv, start, num_meta, window, dtype, device) -> None:
    q_pos, k_pos = prefill_positions(start, T, num_meta, window, device)
    S = k_pos.numel()
    q = torch.randn(T, H, dq, device=device, dtype=dtype)
    k = torch.randn(Hk, S, dq, device=device, dtype=dtype)
    v = torch.randn(Hk, S, dv, device=device, dtype=dtype)
    out = attention_prefill(
        q, k, v, q_pos, k_pos, window, num_meta, out=nan_empty(T, H, dv, dtype=dtype, device=device)
    )
    assert_close("out", out, attention_prefill_ref(q, k, v, q_pos, k_pos, window, num_meta), dtype)


# (T, H, Hk, dq, dv, start, num_meta, window): the meta tokens + prompt in one call (start 0); a chunk on top of
# history; a sliding window that masks inside the chunk and cuts history; more meta tokens than the window; T past
# one 128-query tile; 1.5B-like head dims
PREFILL_CASES = [
    (20, 5, 1, 8, 16, 0, 8, None),
    (37, 4, 2, 12, 24, 40, 8, None),
    (37, 5, 1, 8, 16, 0, 8, 16),
    (37, 4, 2, 12, 24, 60, 8, 16),
    (9, 3, 1, 12, 24, 30, 12, 8),
    (150, 2, 1, 16, 32, 20, 4, 64),
    (5, 5, 5, 64, 128, 100, 8, 16),
]


@pytest.mark.parametrize("T, H, Hk, dq, dv, start, num_meta, window", PREFILL_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_prefill_matches_ref(T, H, Hk, dq, dv, start, num_meta, window, dtype, device, seed):
    check_prefill(T, H, Hk, dq, dv, start, num_meta, window, dtype, device)


# Small tiles, so that small sizes cross many: a block's key ranges (meta tokens; whole tiles every query sees; tiles
# straddling the causal or the window bound) and where they meet. Global with history; a window that cuts the chunk
# and history, the meta tokens apart; start 0 (queries at the meta positions); a window far from the meta tokens; a
# window narrower than a query block; windows that reach the meta tokens for some queries of a block or for all; a
# 5-head group
TILED_CASES = [
    (100, 2, 1, 16, 32, 40, 8, None),
    (100, 2, 1, 16, 32, 60, 16, 24),
    (70, 2, 2, 16, 32, 0, 12, 40),
    (90, 3, 1, 16, 32, 200, 20, 50),
    (45, 2, 1, 16, 16, 30, 5, 10),
    (50, 2, 1, 16, 16, 40, 16, 40),
    (50, 2, 1, 16, 16, 17, 16, 80),
    (60, 5, 1, 16, 32, 30, 8, 20),
]


@pytest.mark.parametrize("T, H, Hk, dq, dv, start, num_meta, window", TILED_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("block_m, block_n", [(16, 16), (32, 16), (16, 32)], ids=str)
def test_attention_prefill_tiles(T, H, Hk, dq, dv, start, num_meta, window, block_m, block_n, device, seed,
                                 monkeypatch):  # fmt: skip
    monkeypatch.setattr(attention, "PREFILL_CONFIG", (block_m, block_n, 4, 2, 2))
    check_prefill(T, H, Hk, dq, dv, start, num_meta, window, torch.float32, device)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 1024], ids=["global", "sliding"])
@pytest.mark.parametrize("T, start", [(2048, 128), (2048, 6272), (1000, 3000), (1024, 128)], ids=str)
def test_attention_prefill_matches_ref_at_real_size(T, start, window, device, seed):
    """1.5B: 25 query heads over 5 KV heads, dq 64, dv 128, 128 meta tokens, window 1024."""
    check_prefill(T, 25, 5, 64, 128, start, 128, window, torch.bfloat16, device)


def check_decode(H, Hk, dq, dv, capacity, num_valid, dtype, device) -> None:
    q = torch.randn(H, dq, device=device, dtype=dtype)
    k_buf = torch.randn(Hk, capacity, dq, device=device, dtype=dtype)
    v_buf = torch.randn(Hk, capacity, dv, device=device, dtype=dtype)
    out = attention_decode(q, k_buf, v_buf, num_valid, out=nan_empty(H, dv, dtype=dtype, device=device))
    assert_close("out", out, attention_decode_ref(q, k_buf, v_buf, num_valid), dtype)


# num_valid: one slot; a partly filled buffer; exactly two splits (128 each); one past a split; a full buffer
@pytest.mark.parametrize("num_valid", [1, 37, 256, 257, 300], ids=str)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_decode_matches_ref(num_valid, as_tensor, dtype, device, seed):
    n = torch.tensor(num_valid, device=device) if as_tensor else num_valid
    check_decode(5, 1, 8, 16, 300, n, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("capacity, num_valid", [(1152, 1152), (1152, 700), (8320, 8320), (8320, 129)], ids=str)
def test_attention_decode_matches_ref_at_real_size(capacity, num_valid, device, seed):
    check_decode(25, 5, 64, 128, capacity, torch.tensor(num_valid, device=device), torch.bfloat16, device)


def check_rope_decode(H, Hk, dq, dv, capacity, num_valid, pos, slot, dtype, device, write_kv=True) -> None:
    """rope_attention_decode against rope_decode_ref + attention_decode_ref: the output, and with a slot (a KV producer)
    the buffers, whose slot starts as NaN (a missed write stays NaN) and whose other slots must not change. A consumer
    (write_kv False) gets a slot holding this step's key already: the kernel reads it after its wait."""
    qkv = torch.randn(H * dq + Hk * (dq + dv) + 2 * 24, device=device)  # q | k | v | x | z, fp32
    cos, sin = torch.rand(pos + 3, dq, device=device) * 2 - 1, torch.rand(pos + 3, dq, device=device) * 2 - 1
    k_buf = torch.randn(Hk, capacity, dq, device=device).to(dtype)
    v_buf = torch.randn(Hk, capacity, dv, device=device).to(dtype)
    if slot is not None and write_kv:
        k_buf[:, slot], v_buf[:, slot] = float("nan"), float("nan")
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    pos_t, n = torch.tensor([pos], device=device), torch.tensor(num_valid, device=device)
    slot_t = None if slot is None else torch.tensor([slot], device=device)
    out = rope_attention_decode(qkv, H, pos_t, cos, sin, k_buf, v_buf, n, slot_t, write_kv=write_kv,
                                out=nan_empty(H, dv, dtype=dtype, device=device))  # fmt: skip
    expected = rope_attention_decode_ref(qkv, H, pos_t, cos, sin, k_ref, v_ref, n, slot_t, write_kv=write_kv)
    assert_close("out", out, expected, dtype)
    if slot is not None:
        assert_close("k at the slot", k_buf[:, slot], k_ref[:, slot], dtype)
        assert_close("v at the slot", v_buf[:, slot], v_ref[:, slot], dtype)
    others = torch.arange(capacity, device=device) != (-1 if slot is None else slot)
    assert torch.equal(k_buf[:, others], k_ref[:, others]), "k_buf changed outside the slot"
    assert torch.equal(v_buf[:, others], v_ref[:, others]), "v_buf changed outside the slot"


# (num_valid, pos, slot, write_kv): the first slot; a slot in the first split and in the last (300 slots, splits of
# 128); a consumer layer (its producer wrote the slot), in the first split and the last; no slot
@pytest.mark.parametrize("num_valid, pos, slot, write_kv", [(1, 0, 0, True), (37, 36, 36, True),
                                                            (300, 500, 257, True), (300, 41, 5, True),
                                                            (300, 41, 5, False), (290, 600, 289, False),
                                                            (280, 9, None, False)], ids=str)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rope_attention_decode_matches_ref(num_valid, pos, slot, write_kv, dtype, device, seed):
    check_rope_decode(5, 1, 8, 16, 300, num_valid, pos, slot, dtype, device, write_kv)


@pytest.mark.parametrize("split, merge_block", [(16, 2), (32, 4), (256, 8)], ids=str)
def test_decode_merges_many_splits_in_chunks(split, merge_block, device, seed, monkeypatch):
    """Many splits (19 or 10 over 300 slots), some empty, merged a few at a time by the last split program of each KV
    head to finish; GQA 4:2, dq / 2 not a power of two."""
    monkeypatch.setattr(attention, "DECODE_SPLIT", split)
    monkeypatch.setattr(attention, "DECODE_MERGE_BLOCK", merge_block)
    check_rope_decode(4, 2, 12, 24, 300, 250, 77, 251, torch.float32, device)
    check_rope_decode(4, 2, 12, 24, 300, 250, 77, 251, torch.float32, device, write_kv=False)
    check_decode(4, 2, 12, 24, 300, torch.tensor(131, device=device), torch.float32, device)


@pytest.mark.gpu
@pytest.mark.parametrize("capacity, num_valid, pos, slot, write_kv", [
    (1152, 1152, 5000, 1151, True), (1152, 700, 699, 699, True), (1152, 1152, 5000, 300, False),
    (8320, 1300, 1299, 1299, True), (8320, 129, 128, None, False)], ids=str)  # fmt: skip
def test_rope_attention_decode_matches_ref_at_real_size(capacity, num_valid, pos, slot, write_kv, device, seed):
    """1.5B: 25 query heads over 5 KV heads, dq 64, dv 128; a sliding layer's 1152-slot ring, a global buffer."""
    check_rope_decode(25, 5, 64, 128, capacity, num_valid, pos, slot, torch.bfloat16, device, write_kv)


@pytest.mark.parametrize("layer_idx", [1, 0], ids=["sliding", "global"])
def test_ring_buffer_decode_equals_attention_over_meta_and_window(layer_idx, device, seed):
    """Decode steps write K/V through DecodeState (the ring wraps twice for the sliding layer) and attend over its
    buffer; each must equal plain attention over the meta tokens + the last `window` positions (spec 7.2)."""
    config = HymbaConfig.from_json(MIRROR_CONFIG)  # 5 heads over 1 KV head, dq 8, dv 16, 8 meta tokens, window 16
    M, W, Hk = config.num_memory_tokens, config.sliding_window, config.num_key_value_heads
    window = None if config.is_global[layer_idx] else W
    num_positions = M + 2 * W + 5
    state = DecodeState(config, max_model_len=num_positions - M, device=device, dtype=torch.float32)
    k_all = torch.randn(Hk, num_positions, config.head_dim, device=device)
    v_all = torch.randn(Hk, num_positions, config.v_head_dim, device=device)
    k_buf, v_buf, ring = state.k[layer_idx], state.v[layer_idx], state.window[layer_idx]
    store_kv_ref(k_all[:, :M], v_all[:, :M], k_buf, v_buf, 0, M, ring)  # the meta tokens, as their prefill leaves them
    for p in range(M, num_positions):
        store_kv_ref(k_all[:, p : p + 1], v_all[:, p : p + 1], k_buf, v_buf, p, M, ring)
        num_valid = state.num_valid(layer_idx, p + 1)
        q = torch.randn(config.num_attention_heads, config.head_dim, device=device)
        as_tensor = p % 2 == 0  # both forms of num_valid
        out = attention_decode(q, state.k[layer_idx], state.v[layer_idx],
                               torch.tensor(num_valid, device=device) if as_tensor else num_valid)  # fmt: skip
        positions = torch.arange(p + 1, device=device)
        visible = positions[(positions < M) | (p - positions < W)] if window is not None else positions
        expected = attention_prefill_ref(
            q[None], k_all[:, visible], v_all[:, visible], torch.tensor([p], device=device), visible, None, M
        )[0]
        assert_close(f"position {p}", out, expected, torch.float32)
