"""The next token from one logits row, in one launch: sampling.sample's whole pipeline.

  pick(logits, None, ...)    greedy: the id of the largest penalized logit (the lowest id among equal ones);
  pick(logits, noise, ...)   a draw: the exponential race argmax_i p_i / E_i over the kept tokens, with E the
                             caller's Exp(1) noise, one draw per token id (sampling.sample draws it from the request's
                             generator).

Order, as pick_ref (the twin) applies it: logit bias -> banned ids to -inf -> repetition penalty (CTRL-style, over
the prompt and the output so far) -> presence and frequency penalties (OpenAI's) -> greedy argmax, or temperature ->
top_k -> top_p -> min_p -> the race. Equal logits at a top_k or top_p cut keep the lower id. Returns -1 when the raw
row holds a NaN or a +inf or nothing finite, or when the bans leave nothing (INVALID_TOKEN_ID in engine/sampling.py).

Why a kernel: torch needs a sort of the 32k row for top_k / top_p and a dozen more launches for the penalties and
the masks, 0.15-0.3 ms a token on the H100 beside a 1.6 ms decode step. The kernel finds the kept set without
sorting. One program of 16 warps reads the row 2k logits at a time (from L2: the LM head has just written it), each
pass keeping its running values per lane and reducing once at its end:
  1. the penalized row z (kept in a scratch row when a penalty changed it), its maximum, the raw row's NaN and +inf,
     or the greedy argmax;
  2. for top_k, the k-th largest z: a 9-ary search over z's 32-bit order key (eight probes a pass, about 11 passes),
     then among equal values at the cut the same search over ids, so that the lowest ids stay;
  3. the race among the tokens in play (inside the top-k cut, at or above min_p times the top probability), then, for
     top_p, the mass ranked before the winner c (larger z, or equal with a lower id). The kept set is a prefix of that
     order, so if c falls outside it, so does everything ranked after c: cut there and race again. The top token is
     always kept, so this ends; the winner falls among the dropped tokens in proportion to their mass, so a round
     usually drops half or more of what is left, and one round is the common case with a peaked distribution. The
     race among a prefix's survivors is the race among the kept set.
The filters rank by z, which orders the tokens as the twin's (z - max) / T does except where that division rounds two
values together, and the probabilities are exp2((z - max) log2(e) / T). So kernel and twin give the same token for
the same noise except where rounding decides (a mass within an ulp of top_p, two scores within an ulp). Kernel +
launcher for CUDA (and TRITON_INTERPRET=1); pick_ref is the twin.
"""

from __future__ import annotations

import math

import torch

from kernels._triton import tl, triton

BLOCK = 2048  # logits per chunk: 16 chunks for a 32k vocabulary, 4 a thread (4096 spills in the race)
SEARCH_BLOCK = 2048  # the top_k search's chunk: it holds eight counts per logit
STAGES = 2  # chunks in flight (tried on the H100 with 3 and 4, and chunks of 1k to 8k: results/h100-sample)
LOG2E = 1.4426950408889634
NUM_WARPS = 16
FLOAT_MAX = 3.4028234663852886e38  # fp32's largest finite value: a tiny repetition penalty must not reach +inf
TINY = 1.1754943508222875e-38  # fp32's smallest normal value: an exact 0 of noise would make 0 / 0 win the race


@triton.jit
def _penalized(raw_ptr, bias_ptr, banned_ptr, prompt_ptr, counts_ptr, ids, n, flags, repetition, presence, frequency,
               PENALIZED: tl.constexpr):  # fmt: skip
    """(raw logits, penalized logits z) as fp32 for ids; -inf past n. flags: bit 0 bias, 1 banned, 2 prompt mask,
    3 counts; a row whose bit is 0 loads nothing."""
    inside = ids < n
    x = tl.load(raw_ptr + ids, mask=inside, other=float("-inf")).to(tl.float32)
    z = x
    if PENALIZED:
        z += tl.load(bias_ptr + ids, mask=inside & ((flags & 1) != 0), other=0.0)
        banned = tl.load(banned_ptr + ids, mask=inside & ((flags & 2) != 0), other=0)
        z = tl.where(banned != 0, float("-inf"), z)
        counts = tl.load(counts_ptr + ids, mask=inside & ((flags & 8) != 0), other=0)
        seen = (tl.load(prompt_ptr + ids, mask=inside & ((flags & 4) != 0), other=0) != 0) | (counts > 0)
        # 3.4e38, fp32's largest finite value (FLOAT_MAX): a tiny repetition penalty must not reach +inf
        penalized = tl.minimum(tl.where(z > 0, tl.math.div_rn(z, repetition), z * repetition), 3.4028234663852886e38)
        z = tl.where(seen & (repetition != 1.0), penalized, z)
        z = z - (counts.to(tl.float32) * frequency + (counts > 0).to(tl.float32) * presence)
    return x, z


@triton.jit
def _load_z(z_ptr, ids, n):
    """The penalized logits for ids, -inf past n. (+ 0.0 turns a -0.0 into 0.0, which the order key would put below
    it.)"""
    return tl.load(z_ptr + ids, mask=ids < n, other=float("-inf")).to(tl.float32) + 0.0


@triton.jit
def _order_key(z):
    """fp32 -> int32 in the same order (negative floats' magnitude bits flipped), for the top_k search."""
    bits = z.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _narrow(z_ptr, n, lo, hi, target, tie_key, BY_ID: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """One pass of a 9-ary search between lo, where a monotone predicate holds, and hi, where it does not: eight
    probes at once, counted per lane and summed at the end. Returns the narrowed (lo, hi).
    By key: holds at x when #(key >= x) >= target. By id: holds at x when #(key == tie_key and id < x) < target."""
    offs = tl.arange(0, BLOCK)
    probes = lo + ((tl.arange(0, 8).to(tl.int64) + 1) * (hi - lo)) // 9  # (8,) in [lo, hi): int32 keys or ids
    probes32 = probes.to(tl.int32)
    hits = tl.zeros([8, BLOCK], dtype=tl.int32)
    for start in tl.range(0, n, BLOCK, num_stages=STAGES):
        ids = start + offs
        key = _order_key(_load_z(z_ptr, ids, n))
        if BY_ID:
            hit = ((key == tie_key) & (ids < n))[None, :] & (ids[None, :] < probes32[:, None])
        else:
            hit = (ids < n)[None, :] & (key[None, :] >= probes32[:, None])
        hits += hit.to(tl.int32)
    counts = tl.sum(hits, axis=1)  # (8,)
    holds = (counts < target) if BY_ID else (counts >= target)
    return tl.max(tl.where(holds, probes, lo), axis=0), tl.min(tl.where(holds, hi, probes), axis=0)


@triton.jit(do_not_specialize=["flags", "top_k"])
def _pick_kernel(raw_ptr, noise_ptr, z_ptr, out_ptr, n, bias_ptr, banned_ptr, prompt_ptr, counts_ptr, flags,
                 repetition, presence, frequency, log2e_over_t, top_k, top_p, min_p,
                 GREEDY: tl.constexpr, PENALIZED: tl.constexpr, BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
                 STAGES: tl.constexpr):  # fmt: skip
    # Every pass keeps its running values per lane (one element of a chunk) and reduces across lanes once at its end:
    # a block-wide reduction per chunk would cost a round trip through shared memory at every chunk. The filters rank
    # by z, which orders the tokens as the twin's (z - max) / T does (but where the division rounds two apart values
    # together), and the probabilities are exp2((z - max) * log2(e) / T), without a division per token.
    offs = tl.arange(0, BLOCK)
    # 1. the penalized row's maximum, the raw row's NaN and maximum, the greedy id; a draw from a penalized row keeps
    #    the row for the later passes
    lane_nan = tl.zeros([BLOCK], dtype=tl.int32)
    lane_raw = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    lane_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    lane_id = tl.zeros([BLOCK], dtype=tl.int32) + n  # past every id
    for start in tl.range(0, n, BLOCK, num_stages=STAGES):
        ids = start + offs
        x, z = _penalized(raw_ptr, bias_ptr, banned_ptr, prompt_ptr, counts_ptr, ids, n, flags, repetition, presence,
                          frequency, PENALIZED)  # fmt: skip
        is_nan = x != x
        lane_nan = tl.maximum(lane_nan, is_nan.to(tl.int32))
        lane_raw = tl.maximum(lane_raw, tl.where(is_nan, float("-inf"), x))
        z = tl.where(z != z, float("-inf"), z)
        if GREEDY:
            lane_id = tl.where(z > lane_max, ids, lane_id)  # strictly: a later chunk's ids are larger
        elif PENALIZED:
            tl.store(z_ptr + ids, z, mask=ids < n)
        lane_max = tl.maximum(lane_max, z)
    peak = tl.max(lane_max, axis=0)
    valid = (tl.max(lane_nan, axis=0) == 0) & (tl.max(lane_raw, axis=0) < float("inf"))
    valid = valid & (peak > float("-inf")) & (peak < float("inf"))
    if GREEDY:
        token = tl.where(valid, tl.min(tl.where(lane_max == peak, lane_id, n), axis=0), -1).to(tl.int64)
    else:
        token = tl.where(valid, 0, -1).to(tl.int64)
        if valid:
            mass = peak * 0.0 - 1.0  # the softmax's sum over the tokens top_p measures against; -1: not yet known
            # In play: the tokens ranked before a cut (cut_z, cut_id), i.e. z > cut_z, or z == cut_z with a lower id.
            cut_z = peak * 0.0 + float("-inf")  # everything finite
            cut_id = n * 0
            # 2. top_k: the cut at the k-th largest value (a 9-ary search over its order key), and where equal values
            #    there are many, at the id that keeps the lowest ones (the same search over ids)
            if (top_k > 0) & (top_k < n):
                lo = (top_k * 0).to(tl.int64) - 2147483648  # below every key: #(key >= lo) = n >= k
                hi = _order_key(peak).to(tl.int64) + 1  # above the top key: # = 0 < k
                while hi - lo > 1:
                    lo, hi = _narrow(z_ptr, n, lo, hi, top_k, lo, False, SEARCH_BLOCK, STAGES)
                lane_above = tl.zeros([BLOCK], dtype=tl.int32)
                lane_at = tl.zeros([BLOCK], dtype=tl.int32)
                lane_mass = tl.zeros([BLOCK], dtype=tl.float32)
                lane_z = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
                for start in tl.range(0, n, BLOCK, num_stages=STAGES):
                    ids = start + offs
                    z = _load_z(z_ptr, ids, n)
                    key = _order_key(z)
                    above = (key > lo) & (ids < n)
                    at = (key == lo) & (ids < n)
                    lane_above += above.to(tl.int32)
                    lane_at += at.to(tl.int32)
                    lane_mass += tl.where(above, tl.exp2((z - peak) * log2e_over_t), 0.0)
                    lane_z = tl.maximum(lane_z, tl.where(at, z, float("-inf")))
                need = top_k - tl.sum(lane_above, axis=0)  # how many of the values at the cut stay: 1 or more
                cut_z = tl.max(lane_z, axis=0)
                cut_id = n
                if need < tl.sum(lane_at, axis=0):
                    id_lo = (top_k * 0).to(tl.int64)  # #(tied ids < 0) = 0 < need
                    id_hi = id_lo + n  # #(tied ids < n) >= need
                    while id_hi - id_lo > 1:
                        id_lo, id_hi = _narrow(z_ptr, n, id_lo, id_hi, need, lo, True, SEARCH_BLOCK, STAGES)
                    cut_id = id_hi.to(tl.int32)
                mass = tl.sum(lane_mass, axis=0) + need.to(tl.float32) * tl.exp2((cut_z - peak) * log2e_over_t)
            # 3. race among the tokens in play (and above min_p), rank the winner against top_p, and if it falls
            #    outside, cut there and race again
            searching = valid.to(tl.int32)
            while searching != 0:
                lane_best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
                lane_c = tl.zeros([BLOCK], dtype=tl.int32) + n
                lane_mass = tl.zeros([BLOCK], dtype=tl.float32)
                for start in tl.range(0, n, BLOCK, num_stages=STAGES):
                    ids = start + offs
                    z = _load_z(z_ptr, ids, n)
                    e = tl.exp2((z - peak) * log2e_over_t)
                    noise = tl.load(noise_ptr + ids, mask=ids < n, other=1.0)
                    live = ((z > cut_z) | ((z == cut_z) & (ids < cut_id))) & (e >= min_p) & (ids < n)
                    score = tl.where(live, e / tl.maximum(noise, 1.1754943508222875e-38), float("-inf"))
                    better = score > lane_best  # strictly: a later chunk's ids are larger
                    lane_c = tl.where(better, ids, lane_c)
                    lane_best = tl.where(better, score, lane_best)
                    lane_mass += e
                mass = tl.where(mass < 0, tl.sum(lane_mass, axis=0), mass)  # without top_k: the whole row's
                best = tl.max(lane_best, axis=0)
                found = best > float("-inf")  # always, as the top token stays in play; guards the load below
                c = tl.minimum(tl.min(tl.where(lane_best == best, lane_c, n), axis=0), n - 1)
                z_c = _load_z(z_ptr, c, n)
                kept = found.to(tl.int32)  # top_k and min_p are in the race's mask already
                if top_p < 1.0:
                    lane_tied = tl.zeros([BLOCK], dtype=tl.int32)
                    lane_mass = tl.zeros([BLOCK], dtype=tl.float32)
                    for start in tl.range(0, n, BLOCK, num_stages=STAGES):
                        ids = start + offs
                        z = _load_z(z_ptr, ids, n)
                        lane_tied += ((z == z_c) & (ids < c)).to(tl.int32)
                        lane_mass += tl.where(z > z_c, tl.exp2((z - peak) * log2e_over_t), 0.0)
                    e_c = tl.exp2((z_c - peak) * log2e_over_t)
                    before = tl.sum(lane_mass, axis=0) + e_c * tl.sum(lane_tied, axis=0).to(tl.float32)
                    kept = kept & (before / mass < top_p).to(tl.int32)
                token = tl.where(found, c, -1).to(tl.int64)
                searching = tl.where(found, 1 - kept, 0)
                cut_z = z_c
                cut_id = c
    tl.store(out_ptr, token)


_PLACEHOLDERS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (uint8, int32) rows of one


def pick(
    logits: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    bias: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> torch.Tensor:
    """logits: (V,) raw, any float dtype, contiguous    noise: (V,) fp32 Exp(1) draws, or None for greedy (then the
    temperature and the filters do not apply)    bias: (V,) fp32 added first    banned: (V,) bool, ids that may not
    be picked    prompt_mask: (V,) bool and counts: (V,) int32, the prompt's ids and the output's counts (repetition
    needs both, presence and frequency need counts)    top_k 0 and top_p 1 and min_p 0 are off.
    Returns a 0-d int64 tensor on the logits' device: the token id, or -1."""
    _check(logits, noise, temperature, top_k, top_p, min_p, prompt_mask, counts, repetition, presence, frequency)
    n, device = logits.numel(), logits.device
    is_penalized = bias is not None or banned is not None or repetition != 1.0 or presence != 0.0 or frequency != 0.0
    # An absent row is read from a placeholder of its type (masked off: nothing loads), so every combination of
    # penalties is one compiled kernel.
    if device not in _PLACEHOLDERS:
        _PLACEHOLDERS[device] = (
            torch.zeros(1, dtype=torch.uint8, device=device),
            torch.zeros(1, dtype=torch.int32, device=device),
        )
    no_mask, no_counts = _PLACEHOLDERS[device]
    has_prompt = prompt_mask is not None and repetition != 1.0
    flags = (bias is not None) | (banned is not None) << 1 | has_prompt << 2 | (counts is not None) << 3
    out = torch.empty((), dtype=torch.int64, device=device)
    # a draw from a penalized row keeps it (fp32) for its later passes; otherwise they read the raw row
    z = torch.empty(n, dtype=torch.float32, device=device) if is_penalized and noise is not None else logits
    log2e_over_t = 0.0 if noise is None else LOG2E / temperature  # a greedy request's temperature may be 0
    _pick_kernel[(1,)](
        logits, logits if noise is None else noise, z, out, n, logits if bias is None else bias,
        no_mask if banned is None else banned.view(torch.uint8),
        no_mask if prompt_mask is None else prompt_mask.view(torch.uint8), no_counts if counts is None else counts,
        flags, float(repetition), float(presence), float(frequency), log2e_over_t, int(top_k), float(top_p),
        float(min_p), GREEDY=noise is None, PENALIZED=is_penalized, BLOCK=BLOCK,
        SEARCH_BLOCK=SEARCH_BLOCK, STAGES=STAGES, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def _check(logits, noise, temperature, top_k, top_p, min_p, prompt_mask, counts, repetition, presence, frequency):
    assert logits.dim() == 1 and logits.is_contiguous(), f"one contiguous row, got {tuple(logits.shape)}"
    assert noise is None or (noise.shape == logits.shape and noise.dtype == torch.float32 and noise.is_contiguous())
    assert noise is None or temperature > 0, f"temperature {temperature}: greedy decoding passes no noise"
    assert top_k >= 0 and 0 < top_p <= 1 and 0 <= min_p <= 1 and repetition > 0, (top_k, top_p, min_p, repetition)
    assert repetition == 1.0 or (prompt_mask is not None and counts is not None), "repetition needs the seen ids"
    assert (presence == 0.0 and frequency == 0.0) or counts is not None, "presence and frequency need the counts"


def pick_ref(
    logits: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    bias: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> torch.Tensor:
    """The same contract in PyTorch ops: penalties, then a stable sort for top_k / top_p."""
    _check(logits, noise, temperature, top_k, top_p, min_p, prompt_mask, counts, repetition, presence, frequency)
    z = logits.to(torch.float32, copy=True)  # (V,) ours to modify in place
    if bias is not None:
        z += bias
    if banned is not None:
        z.masked_fill_(banned, -math.inf)
    if repetition != 1.0:
        z = apply_repetition_penalty(z, prompt_mask | (counts > 0), repetition)
    if presence != 0.0 or frequency != 0.0:
        z = apply_presence_frequency(z, counts, presence, frequency)
    # torch.max propagates NaN, so a finite max means: no NaN, no +inf, and some token left to pick. The raw row is
    # checked too because a ban may have overwritten its NaN; the sum is finite only if both are.
    peak = z.max()
    is_valid = (logits.max().float() + peak).abs() < math.inf  # 0-d bool
    if noise is None:
        return torch.where(is_valid, torch.argmax(z), -1)
    if temperature != 1.0:
        # Shifting by the max first keeps a tiny temperature from overflowing to inf (softmax is shift-invariant).
        z = (z - peak) / temperature
    order = None
    if top_k > 0 or top_p < 1.0:
        z, order = torch.sort(z, descending=True, stable=True)  # stable: equal logits rank by id
        if top_k > 0:
            mask_top_k_(z, top_k)
    probs = torch.softmax(z, dim=-1)  # (V,)
    if top_p < 1.0:
        mask_top_p_(probs, top_p)
    if min_p > 0.0:
        mask_min_p_(probs, min_p)
    if order is not None:
        noise = noise[order]  # each token keeps the noise of its id
    token = torch.argmax(probs / noise.clamp_min(TINY))
    if order is not None:
        token = order[token]
    return torch.where(is_valid, token, -1)


def apply_repetition_penalty(logits: torch.Tensor, is_seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: a seen token's logit is divided by `penalty` when positive, multiplied when negative.

    logits: (V,) fp32    is_seen: (V,) bool    returns a new (V,) fp32
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    # A tiny penalty must not overflow a logit to +inf (NaN after softmax); -inf stays a ban.
    return torch.where(is_seen, penalized.clamp_max(FLOAT_MAX), logits)


def apply_presence_frequency(
    logits: torch.Tensor, output_counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's definition: logit[j] -= counts[j] * frequency + (counts[j] > 0) * presence.

    logits: (V,) fp32    output_counts: (V,) int    returns a new (V,) fp32
    """
    counts = output_counts.to(torch.float32)
    return logits - (counts * frequency + (counts > 0) * presence)


def mask_top_k_(sorted_logits: torch.Tensor, k: int) -> None:
    """Keep exactly the first k entries of a descending row; set the rest to -inf in place.

    sorted_logits: (V,) fp32, descending
    """
    sorted_logits[k:] = -math.inf


def mask_top_p_(sorted_probs: torch.Tensor, top_p: float) -> None:
    """Nucleus: keep the smallest leading set whose mass reaches top_p; zero the rest in place.

    A token is kept when the mass strictly before it is below top_p, so the top token always stays and a set
    that reaches top_p exactly takes nothing more. top_p is compared in fp32.
    sorted_probs: (V,) fp32, descending, summing to 1; left unnormalized
    """
    mass_through = torch.cumsum(sorted_probs, dim=0)  # (V,) mass of entries 0..i
    sorted_probs[1:].masked_fill_(mass_through[:-1] >= top_p, 0.0)


def mask_min_p_(probs: torch.Tensor, min_p: float) -> None:
    """Zero, in place, the tokens whose probability is below min_p times the largest one.

    probs: (V,) fp32, any order; left unnormalized
    """
    probs.masked_fill_(probs < min_p * probs.max(), 0.0)
