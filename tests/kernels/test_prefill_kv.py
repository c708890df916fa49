"""kernels/prefill_kv.py: a prefill chunk's rotated queries and key/value stash, and the KV buffer update after it,
Triton against the twins; and the twins against the rules they encode (which positions a chunk sees and keeps)."""

from __future__ import annotations

import pytest
import torch

from kernels.prefill_kv import rope_prefill, rope_prefill_ref, store_kv, store_kv_ref
from tests.conftest import assert_close, nan_empty


def history(start: int, num_meta: int, window: int | None) -> tuple[int, int, int]:
    """DecodeState.history_range's rule, restated: meta positions, then the last `window` (or all) before start."""
    m = min(start, num_meta)
    lo = start if start <= num_meta else (num_meta if window is None else max(num_meta, start - window))
    return m, lo, m + start - lo


def check(T, start, H, Hk, dq, dv, num_meta, window, produce, dtype, device, valid=None):
    capacity = num_meta + (window if window is not None else start + T)
    proj = torch.randn(T, H * dq + Hk * (dq + dv) + 7, device=device)[:, :-3]  # strided rows, extra columns
    cos = torch.rand(T, dq, device=device) * 2 - 1  # random tables: a kernel reading the wrong half fails
    sin = torch.rand(T, dq, device=device) * 2 - 1
    q = nan_empty(T, H, dq, dtype=dtype, device=device)
    q_ref = torch.empty(T, H, dq, dtype=dtype, device=device)
    if not produce:
        assert rope_prefill(proj, cos, sin, q) is q
        assert_close("q", q, rope_prefill_ref(proj, cos, sin, q_ref), dtype)
        return
    hist = history(start, num_meta, window)
    S = hist[2] + T
    k_buf = torch.randn(Hk, capacity, dq, device=device).to(dtype)
    v_buf = torch.randn(Hk, capacity, dv, device=device).to(dtype)
    keys, values = nan_empty(Hk, S, dq, dtype=dtype, device=device), nan_empty(Hk, S, dv, dtype=dtype, device=device)
    keys_ref, values_ref = torch.empty_like(keys), torch.empty_like(values)
    rope_prefill(proj, cos, sin, q, keys, values, k_buf, v_buf, hist, num_meta, window)
    rope_prefill_ref(proj, cos, sin, q_ref, keys_ref, values_ref, k_buf, v_buf, hist, num_meta, window)
    assert_close("q", q, q_ref, dtype)
    assert_close("keys", keys, keys_ref, dtype)
    assert_close("values", values, values_ref, dtype)

    valid_t = None if valid is None else torch.tensor(valid, device=device)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    store_kv(keys[:, hist[2] :], values[:, hist[2] :], k_buf, v_buf, start, num_meta, window, valid_t)
    store_kv_ref(keys_ref[:, hist[2] :], values_ref[:, hist[2] :], k_ref, v_ref, start, num_meta, window, valid_t)
    assert_close("k_buf", k_buf, k_ref, dtype)
    assert_close("v_buf", v_buf, v_ref, dtype)


# (T, start, H, Hk, dq, dv, num_meta, window): the meta tokens' own chunk; a first chunk shorter and longer than
# the window; a later chunk whose history wraps the ring; dq / 2 and dv not powers of two; the 1.5B heads
SHAPES = [
    (8, 0, 5, 1, 8, 16, 8, 16),
    (10, 8, 5, 1, 8, 16, 8, 16),
    (40, 8, 4, 2, 12, 24, 8, 16),
    (37, 61, 4, 2, 12, 24, 8, 16),
    (33, 130, 10, 2, 64, 128, 3, 24),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-start{}-H{}-Hk{}-dq{}-dv{}-M{}-W{}".format(*s))
@pytest.mark.parametrize("window", ["sliding", "global"])
@pytest.mark.parametrize("produce", [True, False], ids=["producer", "consumer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rope_prefill_and_store_match_the_twins(shape, window, produce, dtype, device, seed):
    T, start, H, Hk, dq, dv, M, W = shape
    check(T, start, H, Hk, dq, dv, M, W if window == "sliding" else None, produce, dtype, device)


@pytest.mark.parametrize("valid", [1, 5, 24, 40])
@pytest.mark.parametrize("window", [16, None], ids=["sliding", "global"])
def test_store_kv_skips_padding_rows(valid, window, device, seed):
    """A padded chunk of 40 rows with `valid` real ones: the padding rows never reach the buffer."""
    check(40, 8 + 16 * 3, 4, 2, 12, 24, 8, window, True, torch.float32, device, valid=valid)


@pytest.mark.gpu
@pytest.mark.parametrize("start", [128, 128 + 2048], ids=["first-chunk", "third-chunk"])
@pytest.mark.parametrize("window", [1024, None], ids=["sliding", "global"])
def test_rope_prefill_at_real_size(start, window, device, seed):
    check(2048, start, 25, 5, 64, 128, 128, window, True, torch.bfloat16, device, valid=1500)


def test_twins_keep_what_the_rules_say():
    """Positions as values: the stash holds meta + the last `window` positions + the chunk, in position order; the
    buffer keeps the meta tokens and the last `window` real positions, each in its ring slot."""
    M, W, T, start, valid = 3, 4, 10, 9, 8  # positions 9..16 real, 17 and 18 padding; history meta + 5..8
    H, Hk, dq, dv = 1, 1, 2, 2
    proj = torch.zeros(T, (H + 2 * Hk) * dq)
    proj[:, H * dq + Hk * dq :] = torch.arange(start, start + T, dtype=torch.float32)[:, None]  # v = position
    k_buf = torch.zeros(Hk, M + W, dq)
    v_buf = torch.tensor([0.0, 1, 2, 7, 8, 5, 6]).view(1, M + W, 1).expand(1, M + W, dv).clone()  # slot of p: 3+(p-3)%4
    hist = history(start, M, W)
    assert hist == (3, 5, 7)
    keys, values = torch.empty(Hk, hist[2] + T, dq), torch.empty(Hk, hist[2] + T, dv)
    rope_prefill_ref(proj, torch.ones(T, dq), torch.zeros(T, dq), torch.empty(T, H, dq), keys, values, k_buf, v_buf,
                     hist, M, W)  # fmt: skip
    assert values[0, :, 0].tolist() == [0, 1, 2, 5, 6, 7, 8, *range(9, 19)]
    store_kv_ref(keys[:, hist[2] :], values[:, hist[2] :], k_buf, v_buf, start, M, W, torch.tensor(valid))
    assert v_buf[0, :, 0].tolist() == [0, 1, 2, 15, 16, 13, 14]  # the last 4 real positions 13..16, in the ring
