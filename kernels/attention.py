"""Attention for one request: prefill over explicit key positions, and decode over a KV buffer.

Masks follow spec section 7, with positions indexed in the meta-prefixed sequence. Prefill: key j is visible to
query i iff j <= i, and for sliding-window layers also (j < num_meta or i - j <= window). Decode: the caller's
buffer holds exactly the visible keys (meta + rolling window, or a global layer's whole history), so the one query
attends to every valid slot. GQA: query head h reads KV head h // (H / Hk). Scale 1/sqrt(q/k head dim) (Q11).
Triton kernels + launchers attention_prefill / attention_decode for CUDA (and TRITON_INTERPRET=1), with _ref twins;
rope_attention_decode is decode's whole attention chain in one launch (RoPE, the KV write, attention, the merge).
"""

from __future__ import annotations

import math

import torch

from kernels._triton import tl, triton
from kernels.gemv import launch_facts
from kernels.prefill_kv import apply_rope

LOG2_E = 1.4426950408889634

# prefill: a program owns BLOCK_M queries of one head and walks only the key tiles its mask can reach.
# (BLOCK_M, BLOCK_N, num_warps, num_stages, num_stages of the masked tiles' loop): the fastest of the shapes measured
# on the H100 for the 1.5B's heads (dq 64, dv 128), sliding and global alike (tools/time_attention.py)
PREFILL_CONFIG = (64, 64, 4, 3, 2)
# decode: the key axis is cut into splits of DECODE_SPLIT keys; a program owns one KV head's query group and one
# split, and the last program of a KV head to finish merges its splits (DECODE_MERGE_BLOCK at a time). The number of
# splits depends on the buffer's capacity only, so a CUDA graph can capture the launch. 128-key splits read as one
# tile: in the 1.5B decode graph on the H100 (1k context) 604 tokens/s, against 589 for two 64-key tiles, 588 for
# 64-key splits and 583 for 256-key splits of 64-key tiles.
DECODE_SPLIT = 128
DECODE_MERGE_BLOCK = 8
DECODE_NUM_WARPS = 4  # with the tiles loaded before the wait: 623 tokens/s at 1k, against 615 for 8 and 511 for 2
DECODE_USE_PDL = True  # with programmatic dependent launch where kernels/gemv.py launch_facts allows it

# The prefill twin materialises (H, block, S) scores; this bounds their elements.
_MAX_SCORE_ELEMENTS = 1 << 25


@triton.jit
def _count_below_each(pos_ptr, n, x, SEARCH_BLOCK: tl.constexpr):
    """For each threshold of the vector x, how many of the ascending pos[0:n] are < it: two gathers for all of them
    together (needs n <= SEARCH_BLOCK**2)."""
    offs = tl.arange(0, SEARCH_BLOCK)
    stride = tl.cdiv(n, SEARCH_BLOCK)
    sample = offs * stride
    coarse = tl.load(pos_ptr + sample, mask=sample < n, other=0)
    num_coarse = tl.sum(((coarse[None, :] < x[:, None]) & (sample < n)[None, :]).to(tl.int32), axis=1)
    # pos[(c-1)*stride] < x <= pos[c*stride] (or c*stride >= n): the answer is in ((c-1)*stride, c*stride]
    first = (num_coarse - 1) * stride + 1
    fine = first[:, None] + offs[None, :]
    in_gap = (num_coarse > 0)[:, None] & (fine < tl.minimum(num_coarse * stride, n)[:, None])
    below = in_gap & (tl.load(pos_ptr + fine, mask=in_gap, other=0) < x[:, None])
    return tl.where(num_coarse > 0, first + tl.sum(below.to(tl.int32), axis=1), 0)


@triton.jit
def _attend_prefill_tile(
    acc, m_i, l_i, q, q_pos, q_first, start_n, end_n, k_ptr, v_ptr, k_pos_ptr, stride_k_s, stride_v_s, scale_log2,
    num_meta,
    MASKED: tl.constexpr, IS_SLIDING: tl.constexpr, DQ: tl.constexpr, DV: tl.constexpr, BLOCK_DQ: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over the key tile [start_n, start_n + BLOCK_N), m in log2 units. MASKED: the tile is
    clipped at end_n and the spec 7.1 mask applies (q_pos: the rows' positions; q_first: the oldest non-meta position
    in each row's window; int32); otherwise the caller has shown every key of the tile visible to every query row, so
    neither is computed."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptrs = k_ptr + offs_n[:, None] * stride_k_s + offs_dq[None, :]
    v_ptrs = v_ptr + offs_n[:, None] * stride_v_s + offs_dv[None, :]
    if MASKED:
        in_range = offs_n < end_n
        k = tl.load(k_ptrs, mask=in_range[:, None] & (offs_dq < DQ)[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=in_range[:, None] & (offs_dv < DV)[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs, mask=(offs_dq < DQ)[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=(offs_dv < DV)[None, :], other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") if IEEE else tl.dot(q, tl.trans(k))  # unscaled
    if MASKED:
        # int32 positions: the mask's integer work is what a masked tile costs more; a key past end_n gets a
        # position no query reaches
        k_pos = tl.load(k_pos_ptr + offs_n, mask=in_range, other=2**31 - 1).to(tl.int32)
        visible = k_pos[None, :] <= q_pos[:, None]  # (BLOCK_M, BLOCK_N)
        if IS_SLIDING:  # spec 7.1: meta tokens always, else at most `window` back
            visible &= (k_pos < num_meta)[None, :] | (k_pos[None, :] >= q_first[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1) * scale_log2)  # the scale is positive: it commutes with max
    # masked: a row with nothing visible yet stays at zero weight
    m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new) if MASKED else m_new
    p = tl.exp2(scores * scale_log2 - m_new_safe[:, None])  # one FMA per score
    alpha = tl.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _attention_prefill_kernel(
    q_ptr, k_ptr, v_ptr, q_pos_ptr, k_pos_ptr, out_ptr,  # pointers
    T, S, num_meta, window, scale_log2,  # sizes and mask parameters
    stride_q_t, stride_q_h, stride_k_h, stride_k_s, stride_v_h, stride_v_s, stride_out_t, stride_out_h,  # strides
    GROUP: tl.constexpr, IS_SLIDING: tl.constexpr, DQ: tl.constexpr, DV: tl.constexpr,  # meta
    BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED_STAGES: tl.constexpr, SEARCH_BLOCK: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # heads vary fastest and the last query blocks (the most keys under a causal mask) are launched first
    i_h = tl.program_id(0)
    i_m = tl.num_programs(1) - 1 - tl.program_id(1)
    k_ptr += (i_h // GROUP) * stride_k_h  # GQA: query head h reads KV head h // GROUP
    v_ptr += (i_h // GROUP) * stride_v_h
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < T
    q = tl.load(q_ptr + offs_m[:, None] * stride_q_t + i_h * stride_q_h + offs_dq[None, :],
                mask=mask_m[:, None] & (offs_dq < DQ)[None, :], other=0.0)  # fmt: skip
    q_pos = tl.load(q_pos_ptr + offs_m, mask=mask_m, other=0)
    q_pos_max = tl.max(tl.where(mask_m, q_pos, 0))
    q_pos_min = tl.min(tl.where(mask_m, q_pos, q_pos_max))

    # Keys are ascending by position, so one search per bound turns the block's mask into index ranges:
    #   [0, meta_end) the meta tokens, [lo, hi) the window (for a global layer, lo = meta_end = 0): tiles outside
    #   are skipped, which makes a sliding-window layer O(T * (window + meta)) rather than O(T * S);
    #   keys < full_hi are at or before every query of the block; keys >= full_lo are in every query's window.
    which = tl.arange(0, 8)
    bounds = tl.where(which == 0, q_pos_max + 1, q_pos_min + 1)
    if IS_SLIDING:
        bounds = tl.where(which == 2, q_pos_min - window, bounds)
        bounds = tl.where(which == 3, q_pos_max - window, bounds)
        bounds = tl.where(which == 4, num_meta, bounds)
    counts = _count_below_each(k_pos_ptr, S, bounds, SEARCH_BLOCK)
    hi = tl.sum(tl.where(which == 0, counts, 0))
    full_hi = tl.sum(tl.where(which == 1, counts, 0))
    if IS_SLIDING:
        lo = tl.sum(tl.where(which == 2, counts, 0))
        full_lo = tl.sum(tl.where(which == 3, counts, 0))
        num_meta_keys = tl.sum(tl.where(which == 4, counts, 0))
        merged = full_lo <= num_meta_keys  # every query's window reaches back to the meta tokens: one causal range
        lo = tl.where(merged, 0, lo)
        full_lo = tl.where(merged, 0, full_lo)
        meta_end = tl.minimum(num_meta_keys, lo)
        meta_full = meta_end // BLOCK_N * BLOCK_N  # meta_end <= lo <= full_hi: all seen by every row
    else:
        lo = 0
        full_lo = 0
        meta_end = 0
        meta_full = 0
    # The window's tiles are laid from lo; the ones inside [full_lo, full_hi) are whole: [first, last)
    first = tl.minimum(lo + tl.cdiv(full_lo - lo, BLOCK_N) * BLOCK_N, hi)
    last = tl.maximum(first, lo + (full_hi - lo) // BLOCK_N * BLOCK_N)
    q_pos_32 = q_pos.to(tl.int32)  # positions < 2**31
    q_first = q_pos_32 - window  # each row's oldest non-meta key in its window

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # The whole tiles that every row sees, [0, meta_full) then [first, last): no mask computed
    num_meta_tiles = meta_full // BLOCK_N
    for i in range(0, num_meta_tiles + (last - first) // BLOCK_N):
        start_n = tl.where(i < num_meta_tiles, i * BLOCK_N, first + (i - num_meta_tiles) * BLOCK_N)
        acc, m_i, l_i = _attend_prefill_tile(
            acc, m_i, l_i, q, q_pos_32, q_first, start_n, S, k_ptr, v_ptr, k_pos_ptr, stride_k_s, stride_v_s,
            scale_log2, num_meta, False, IS_SLIDING, DQ, DV, BLOCK_DQ, BLOCK_DV, BLOCK_N, IEEE,
        )  # fmt: skip
    # The tiles that straddle a bound, masked: the meta tokens' last [meta_full, meta_end), the window's [lo, first)
    # and [last, hi)
    n_meta = tl.cdiv(meta_end - meta_full, BLOCK_N)
    n_lower = n_meta + tl.cdiv(first - lo, BLOCK_N)
    for i in tl.range(0, n_lower + tl.cdiv(hi - last, BLOCK_N), num_stages=MASKED_STAGES):
        start_n = tl.where(i < n_meta, meta_full, tl.where(i < n_lower, lo + (i - n_meta) * BLOCK_N,
                                                            last + (i - n_lower) * BLOCK_N))  # fmt: skip
        acc, m_i, l_i = _attend_prefill_tile(
            acc, m_i, l_i, q, q_pos_32, q_first, start_n, tl.where(i < n_meta, meta_end, hi), k_ptr, v_ptr,
            k_pos_ptr, stride_k_s, stride_v_s, scale_log2, num_meta, True, IS_SLIDING, DQ, DV, BLOCK_DQ, BLOCK_DV,
            BLOCK_N, IEEE,
        )  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(out_ptr + offs_m[:, None] * stride_out_t + i_h * stride_out_h + offs_dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_dv < DV)[None, :])  # fmt: skip


@triton.jit
def _rope_rows(row_ptr, offs_d, mask, cos, sin, HALF: tl.constexpr):
    """RoPE of head rows at row_ptr + offs_d (offs_d: the head dim, on the last axis) with the position's table rows
    cos and sin (loaded, fp32): x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[HALF:], x[:HALF]] (spec 5)."""
    is_lo = offs_d < HALF
    x = tl.load(row_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(row_ptr + tl.where(is_lo, offs_d + HALF, offs_d - HALF), mask=mask, other=0.0).to(tl.float32)
    return x * cos + tl.where(is_lo, -partner, partner) * sin


@triton.jit
def _merge_splits(m_part_ptr, l_part_ptr, acc_part_ptr, out_ptr, first_head, num_splits, num_used,
                  GROUP: tl.constexpr, DV: tl.constexpr, BLOCK_GM: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_DV: tl.constexpr):  # fmt: skip
    """out of the GROUP heads from first_head on, from the partial softmaxes of their first num_used splits (the later
    ones hold no key), BLOCK_S splits at a time in split order. The partials come from other programs: loaded past
    L1 (.cg)."""
    offs_g = tl.arange(0, BLOCK_GM)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    heads = first_head + offs_g
    mask_g = offs_g < GROUP
    mask_dv = offs_dv < DV
    m_run = tl.full((BLOCK_GM,), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((BLOCK_GM,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_GM, BLOCK_DV), dtype=tl.float32)
    for s0 in range(0, num_used, BLOCK_S):
        splits = s0 + offs_s
        mask = mask_g[:, None] & (splits < num_used)[None, :]  # (BLOCK_GM, BLOCK_S)
        part = heads[:, None] * num_splits + splits[None, :]
        m = tl.load(m_part_ptr + part, mask=mask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(l_part_ptr + part, mask=mask, other=0.0, cache_modifier=".cg")
        part_acc = tl.load(acc_part_ptr + part[:, :, None] * DV + offs_dv[None, None, :],
                           mask=mask[:, :, None] & mask_dv[None, None, :], other=0.0, cache_modifier=".cg")  # fmt: skip
        m_new = tl.maximum(m_run, tl.max(m, axis=1))  # finite for real heads: every used split saw a key
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding heads
        alpha = tl.exp2(m_run - m_safe)  # 0 on the first chunk
        w = tl.where(mask, tl.exp2(m - m_safe[:, None]), 0.0)
        l_run = l_run * alpha + tl.sum(w * l, axis=1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * part_acc, axis=1)
        m_run = m_new
    out = acc / l_run[:, None]
    tl.store(out_ptr + heads[:, None] * DV + offs_dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_g[:, None] & mask_dv[None, :])  # fmt: skip


@triton.jit
def _attention_decode_kernel(
    q_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, k_ptr, v_ptr, num_valid_ptr,  # inputs (q_ptr: q, or the qkv row)
    m_part_ptr, l_part_ptr, acc_part_ptr, count_ptr, out_ptr,  # the splits' partials, arrivals per KV head, output
    num_valid, num_splits, scale_log2,  # sizes
    stride_table, stride_k_h, stride_k_s, stride_v_h, stride_v_s,  # strides, in elements (q and out: contiguous)
    H: tl.constexpr, HK: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr, DV: tl.constexpr,  # meta
    ROPE: tl.constexpr, HAS_SLOT: tl.constexpr, WRITE_KV: tl.constexpr, NUM_VALID_IN_MEMORY: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_GM: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program (i_kv, i_s): KV head i_kv's query group over the valid keys among slots [i_s*SPLIT, (i_s+1)*SPLIT),
    one tile; the last of the head's programs to finish merges their partial softmaxes. ROPE: the queries come
    unrotated in the in_proj row (q | k | v) and are rotated here. HAS_SLOT: `slot` holds this step's key and value:
    WRITE_KV (a producer layer), the program whose split holds it stores them there from the row; else (a consumer)
    an earlier kernel of this step wrote them.

    With PDL, everything but this step's activations is loaded before the wait, while in_proj still runs: the
    position, its RoPE rows, the slot, the count of valid slots (all from the step's first kernels, done before any
    PDL kernel of the step starts) and the key and value tile, written by earlier steps except at `slot`, which is
    read (or taken from the row) after the wait."""
    i_kv, i_s = tl.program_id(0), tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = i_s * SPLIT + tl.arange(0, SPLIT)
    heads = i_kv * GROUP + offs_g  # the query heads of this KV head
    mask_g = offs_g < GROUP
    mask_dq = offs_dq < DQ
    mask_dv = offs_dv < DV
    mask_q = mask_g[:, None] & mask_dq[None, :]
    k_head = k_ptr + i_kv * stride_k_h
    v_head = v_ptr + i_kv * stride_v_h

    # --- before the wait: nothing this step's kernels write before this one ---
    if NUM_VALID_IN_MEMORY:
        num_valid = tl.load(num_valid_ptr).to(tl.int32)
    mask_n = offs_n < num_valid
    fresh = offs_n < 0  # the slot of this step's key, if in this split
    if HAS_SLOT:
        slot = tl.load(slot_ptr)
        fresh = offs_n == slot
    old = mask_n & ~fresh
    k = tl.load(k_head + offs_n[:, None] * stride_k_s + offs_dq[None, :], mask=old[:, None] & mask_dq[None, :],
                other=0.0)  # fmt: skip
    v = tl.load(v_head + offs_n[:, None] * stride_v_s + offs_dv[None, :], mask=old[:, None] & mask_dv[None, :],
                other=0.0)  # fmt: skip
    if ROPE:
        pos = tl.load(pos_ptr)
        cos = tl.load(cos_ptr + pos * stride_table + offs_dq, mask=mask_dq, other=0.0)
        sin = tl.load(sin_ptr + pos * stride_table + offs_dq, mask=mask_dq, other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()

    # --- after: this step's activations ---
    if ROPE:
        q = _rope_rows(q_ptr + heads[:, None] * DQ, offs_dq[None, :], mask_q, cos[None, :], sin[None, :], DQ // 2)
        q = q.to(k_ptr.dtype.element_ty)  # rounded to the KV dtype, as the twin's q
    else:
        q = tl.load(q_ptr + heads[:, None] * DQ + offs_dq[None, :], mask=mask_q, other=0.0)
    if HAS_SLOT:
        owner = slot // SPLIT == i_s
        if WRITE_KV:
            k_new = _rope_rows(q_ptr + (H + i_kv) * DQ, offs_dq, mask_dq & owner, cos, sin, DQ // 2).to(k.dtype)
            v_new = tl.load(q_ptr + (H + HK) * DQ + i_kv * DV + offs_dv, mask=mask_dv & owner).to(v.dtype)
            tl.store(k_head + slot * stride_k_s + offs_dq, k_new, mask=mask_dq & owner)
            tl.store(v_head + slot * stride_v_s + offs_dv, v_new, mask=mask_dv & owner)
        else:
            k_new = tl.load(k_head + slot * stride_k_s + offs_dq, mask=mask_dq & owner, other=0.0)
            v_new = tl.load(v_head + slot * stride_v_s + offs_dv, mask=mask_dv & owner, other=0.0)
        k = tl.where(fresh[:, None], k_new[None, :], k)
        v = tl.where(fresh[:, None], v_new[None, :], v)

    scores = tl.dot(q, tl.trans(k), input_precision="ieee") if IEEE else tl.dot(q, tl.trans(k))
    scores = tl.where(mask_n[None, :], scores * scale_log2, float("-inf"))  # log2 units
    m_i = tl.max(scores, axis=1)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)  # an empty split: zero weight
    p = tl.exp2(scores - m_safe[:, None])
    l_i = tl.sum(p, axis=1)
    acc = tl.dot(p, v, input_precision="ieee") if IEEE else tl.dot(p.to(v.dtype), v)  # IEEE: fp32 buffers
    part = heads * num_splits + i_s
    tl.store(m_part_ptr + part, m_i, mask=mask_g)
    tl.store(l_part_ptr + part, l_i, mask=mask_g)
    tl.store(acc_part_ptr + part[:, None] * DV + offs_dv[None, :], acc, mask=mask_g[:, None] & mask_dv[None, :])
    tl.debug_barrier()  # every thread's partials are stored before the arrival is counted
    arrived = tl.atomic_add(count_ptr + i_kv, 1)  # acq_rel, GPU scope: the earlier arrivals' partials are visible
    if arrived == num_splits - 1:  # the last of this head's splits: merge them all, in split order
        _merge_splits(m_part_ptr, l_part_ptr, acc_part_ptr, out_ptr, i_kv * GROUP, num_splits,
                      tl.cdiv(num_valid, SPLIT), GROUP, DV, BLOCK_GM, BLOCK_S, BLOCK_DV)  # fmt: skip
        tl.store(count_ptr + i_kv, 0)  # ready for the next launch


def _dot_width(n: int) -> int:
    """tl.dot wants power-of-two tile sides of at least 16."""
    return max(16, triton.next_power_of_2(n))


def attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    num_meta: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (window=None) or sliding-window + meta-token attention of T queries over S keys.

    q: (T, H, dq)   k: (Hk, S, dq)   v: (Hk, S, dv)   q_pos: (T,) int64   k_pos: (S,) int64, ascending
    returns out: (T, H, dv) in q.dtype (written into `out` if given)
    """
    T, H, dq = q.shape
    Hk, S, dv = v.shape
    assert k.shape == (Hk, S, dq) and H % Hk == 0, f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1, "head dims must be contiguous"
    assert q_pos.dtype == k_pos.dtype == torch.int64 and q_pos.is_contiguous() and k_pos.is_contiguous()
    out = torch.empty(T, H, dv, dtype=q.dtype, device=q.device) if out is None else out
    assert out.shape == (T, H, dv) and out.stride(2) == 1
    block_m, block_n, num_warps, num_stages, masked_stages = PREFILL_CONFIG
    _attention_prefill_kernel[(H, triton.cdiv(T, block_m))](
        q, k, v, q_pos, k_pos, out,
        T, S, num_meta, 0 if window is None else window, LOG2_E / math.sqrt(dq),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=H // Hk, IS_SLIDING=window is not None, DQ=dq, DV=dv, BLOCK_DQ=_dot_width(dq), BLOCK_DV=_dot_width(dv),
        BLOCK_M=block_m, BLOCK_N=block_n, MASKED_STAGES=masked_stages,
        SEARCH_BLOCK=_dot_width(math.isqrt(max(S - 1, 1)) + 1), IEEE=q.dtype == torch.float32, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out


_counters: dict[tuple, torch.Tensor] = {}  # (device, stream) -> the arrival counters there; (device, stream, n): all


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n int32 zeros, one per KV head, for the decode kernel's split programs to count their arrivals in; the
    last to arrive resets its counter. Launches on one stream run one after another (with PDL a kernel touches them
    only after gdc_wait), so one buffer per device and stream serves them all. Never freed: a captured CUDA graph keeps
    its address (an outgrown buffer is kept too)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    counters = _counters.get((device, stream))
    if counters is None or counters.numel() < n:
        counters = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
        _counters[device, stream, n] = _counters[device, stream] = counters
    return counters


def _decode_launch(q, qkv, pos, cos, sin, k_buf, v_buf, slot, write_kv, num_valid, out):
    """attention_decode (q given) or rope_attention_decode (qkv given): one launch of _attention_decode_kernel."""
    Hk, capacity, dv = v_buf.shape
    dq = k_buf.shape[2]
    assert k_buf.shape == (Hk, capacity, dq), f"k_buf {tuple(k_buf.shape)}, v_buf {tuple(v_buf.shape)}"
    assert k_buf.stride(2) == 1 and v_buf.stride(2) == 1, "head dims must be contiguous"
    H = out.shape[0]
    assert H % Hk == 0 and out.shape == (H, dv) and out.is_contiguous(), f"out {tuple(out.shape)} for {Hk} KV heads"
    in_memory = isinstance(num_valid, torch.Tensor)
    rope = qkv is not None
    num_splits = triton.cdiv(capacity, DECODE_SPLIT)
    m_part = torch.empty(H, num_splits, dtype=torch.float32, device=out.device)
    l_part = torch.empty(H, num_splits, dtype=torch.float32, device=out.device)
    acc_part = torch.empty(H, num_splits, dv, dtype=torch.float32, device=out.device)
    _, use_pdl = launch_facts(out)
    use_pdl = use_pdl and DECODE_USE_PDL
    _attention_decode_kernel[(Hk, num_splits)](
        qkv if rope else q, pos if rope else out, cos if rope else out, sin if rope else out,
        out if slot is None else slot, k_buf, v_buf, num_valid if in_memory else out,
        m_part, l_part, acc_part, _arrival_counters(out.device, Hk), out,
        0 if in_memory else num_valid, num_splits, LOG2_E / math.sqrt(dq),
        cos.stride(0) if rope else 0, k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        H=H, HK=Hk, GROUP=H // Hk, DQ=dq, DV=dv, ROPE=rope, HAS_SLOT=slot is not None,
        WRITE_KV=slot is not None and write_kv, NUM_VALID_IN_MEMORY=in_memory,
        BLOCK_G=_dot_width(H // Hk), BLOCK_GM=triton.next_power_of_2(H // Hk), BLOCK_DQ=_dot_width(dq),
        BLOCK_DV=_dot_width(dv), SPLIT=DECODE_SPLIT,
        BLOCK_S=min(DECODE_MERGE_BLOCK, triton.next_power_of_2(num_splits)),
        IEEE=k_buf.dtype == torch.float32, USE_PDL=use_pdl, num_warps=DECODE_NUM_WARPS, launch_pdl=use_pdl,
    )  # fmt: skip
    return out


def attention_decode(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    num_valid: torch.Tensor | int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query over the first num_valid slots of a KV buffer (slot order does not matter: keys carry RoPE).

    q: (H, dq)   k_buf: (Hk, capacity, dq)   v_buf: (Hk, capacity, dv)   num_valid: int or 0-d int tensor (read on
    the device, never synchronised: the launch can be captured in a CUDA graph)
    returns out: (H, dv) in q.dtype (written into `out` if given)
    """
    H, dq = q.shape
    assert q.is_contiguous() and k_buf.shape[2] == dq, f"q {tuple(q.shape)}, k_buf {tuple(k_buf.shape)}"
    out = torch.empty(H, v_buf.shape[2], dtype=q.dtype, device=q.device) if out is None else out
    return _decode_launch(q, None, None, None, None, k_buf, v_buf, None, False, num_valid, out)


def rope_attention_decode(
    qkv: torch.Tensor,
    num_heads: int,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    num_valid: torch.Tensor | int,
    slot: torch.Tensor | None = None,
    *,
    write_kv: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoPE on one token's heads, then attention_decode, in one launch: the token's num_heads query heads rotated at
    `pos`; then attention over the first num_valid slots. `slot` (one of them) is this step's: with write_kv (a KV
    producer layer) the token's key (rotated) and value are stored there first; without (a consumer) an earlier
    kernel of this step stored them. With no slot, no kernel of this step writes the buffer before this one.

    qkv: the in_proj row (H*dq + Hk*dq + Hk*dv + ...,) fp32, laid out q | k | v | ...     pos, slot: (1,) int64
    returns out: (H, dv) in the KV dtype (written into `out` if given)
    """
    dq = k_buf.shape[2]
    assert qkv.is_contiguous() and cos.stride(1) == 1 and sin.stride() == cos.stride(), "contiguous rows expected"
    assert pos.numel() == 1 and pos.dtype == torch.int64, "pos: one int64 on the device"
    Hk, dv = v_buf.shape[0], v_buf.shape[2]
    assert slot is None or (slot.numel() == 1 and slot.dtype == torch.int64), "slot: one int64 on the device"
    assert qkv.numel() >= num_heads * dq + (0 if slot is None else Hk * (dq + dv)), f"qkv {tuple(qkv.shape)} too short"
    out = torch.empty(num_heads, dv, dtype=k_buf.dtype, device=qkv.device) if out is None else out
    return _decode_launch(None, qkv, pos, cos, sin, k_buf, v_buf, slot, write_kv, num_valid, out)


def attention_prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    num_meta: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as attention_prefill: scores materialised block by block, masked, softmaxed in fp32."""
    T, H, dq = q.shape
    Hk, S, dv = v.shape
    g = H // Hk
    qf = q.float().transpose(0, 1).reshape(Hk, g, T, dq)  # query head h = kv * g + j
    kf, vf = k.float(), v.float()
    o = torch.empty(Hk, g, T, dv, dtype=torch.float32, device=q.device)
    block = max(1, _MAX_SCORE_ELEMENTS // (H * S))
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        qp, kp = q_pos[t0:t1, None], k_pos[None, :]
        visible = kp <= qp  # (t, S)
        if window is not None:
            visible &= (kp < num_meta) | (qp - kp <= window)
        qb = qf[:, :, t0:t1]  # (Hk, g, t, dq)
        scores = torch.einsum("hgtd,hsd->hgts", qb, kf) / math.sqrt(dq)
        scores.masked_fill_(~visible, float("-inf"))
        o[:, :, t0:t1] = torch.einsum("hgts,hsd->hgtd", torch.softmax(scores, dim=-1), vf)
    result = o.reshape(H, T, dv).transpose(0, 1).to(q.dtype)
    return result if out is None else out.copy_(result)


def attention_decode_ref(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    num_valid: torch.Tensor | int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as attention_decode (but int(num_valid) synchronises with the device)."""
    H, dq = q.shape
    Hk = k_buf.shape[0]
    n = int(num_valid)
    k, v = k_buf[:, :n].float(), v_buf[:, :n].float()  # (Hk, n, d)
    scores = torch.einsum("hgd,hsd->hgs", q.float().view(Hk, H // Hk, dq), k) / math.sqrt(dq)
    o = torch.einsum("hgs,hsd->hgd", torch.softmax(scores, dim=-1), v)  # (Hk, g, dv)
    result = o.reshape(H, -1).to(q.dtype)
    return result if out is None else out.copy_(result)


def _rope_decode_ref(qkv, pos, cos, sin, q_out, k_buf=None, v_buf=None, slot=None) -> None:
    """The token's query heads rotated at `pos` into q_out; with a slot, its key (rotated) and value stored there.
    RoPE is the GPT-NeoX "rotate half" form with fp32 tables (spec 5). PyTorch ops on device tensors, no host sync."""
    H, dq = q_out.shape
    c, s = cos.index_select(0, pos.view(1)), sin.index_select(0, pos.view(1))  # (1, dq): one position

    def rotate(x):  # (heads, dq) fp32: prefill's RoPE twin on a one-token chunk
        return apply_rope(x.unsqueeze(0), c, s)[0]

    q_out.copy_(rotate(qkv[: H * dq].float().view(H, dq)))
    if slot is not None:
        Hk, dv = v_buf.shape[0], v_buf.shape[2]
        k = rotate(qkv[H * dq : (H + Hk) * dq].float().view(Hk, dq))
        v = qkv[(H + Hk) * dq : (H + Hk) * dq + Hk * dv].view(Hk, dv)
        k_buf.index_copy_(1, slot.view(1), k.unsqueeze(1).to(k_buf.dtype))
        v_buf.index_copy_(1, slot.view(1), v.unsqueeze(1).to(v_buf.dtype))


def rope_attention_decode_ref(
    qkv: torch.Tensor,
    num_heads: int,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    num_valid: torch.Tensor | int,
    slot: torch.Tensor | None = None,
    *,
    write_kv: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as rope_attention_decode: the two twins one after the other."""
    q = torch.empty(num_heads, k_buf.shape[2], dtype=k_buf.dtype, device=qkv.device)
    _rope_decode_ref(qkv, pos, cos, sin, q, k_buf, v_buf, slot if write_kv else None)
    return attention_decode_ref(q, k_buf, v_buf, num_valid, out=out)
