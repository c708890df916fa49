"""The next token from one logits row, in one launch, for sampling.sample's two common paths:

  greedy_pick   the id of the largest logit (the lowest id among equal ones, as torch.argmax);
  race_pick     a draw at a temperature T from the exponential race: argmax_i softmax(logits / T)_i / E_i, with the
                exponential noise E drawn by the caller from its request's generator (sampling.sample_from_probs).

Both return -1 when the row holds a NaN, a +inf or nothing but -inf (engine/sampling.py's INVALID_TOKEN_ID rule).

Why kernels: torch reduces a 32k row with one 512-thread block (12 µs on the H100 for an argmax), and sample() ran
three such reductions for a greedy token and five for a sampled one, 40-50 µs beside a 1.6 ms decode step. One
program of 16 warps reads the row (fresh in L2 from the LM head) a chunk at a time and carries (max, its id, any
NaN) along; the race takes a first pass for the row's maximum. The race skips softmax's division by the sum, which
does not move the argmax, so its picks match the twin's except where two candidates tie to within rounding.
Triton kernel + launchers for CUDA (and TRITON_INTERPRET=1); greedy_pick_ref and race_pick_ref are the twins.
"""

from __future__ import annotations

import math

import torch

from kernels._triton import tl, triton

BLOCK = 4096  # logits per chunk: 8 chunks for a 32k vocabulary
NUM_WARPS = 16


@triton.jit
def _row_max(x_ptr, n, BLOCK: tl.constexpr):
    """(max over the row with NaN skipped, 1 if the row holds a NaN)."""
    offs = tl.arange(0, BLOCK)
    best = float("-inf")
    has_nan = 0
    for start in tl.range(0, n, BLOCK, num_stages=3):
        x = tl.load(x_ptr + start + offs, mask=start + offs < n, other=float("-inf")).to(tl.float32)
        has_nan = tl.maximum(has_nan, tl.max((x != x).to(tl.int32), axis=0))
        best = tl.maximum(best, tl.max(tl.where(x != x, float("-inf"), x), axis=0))
    return best, has_nan


@triton.jit
def _pick_kernel(x_ptr, noise_ptr, out_ptr, n, temperature, RACE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    peak = float("-inf")
    has_nan = 0
    if RACE:
        peak, has_nan = _row_max(x_ptr, n, BLOCK)
    best = float("-inf")
    best_id = n  # past every id: stays only if no score beats -inf (an invalid row, or an all-zero race)
    for start in tl.range(0, n, BLOCK, num_stages=3):
        ids = start + offs
        x = tl.load(x_ptr + ids, mask=ids < n, other=float("-inf")).to(tl.float32)
        is_nan = x != x
        score = tl.where(is_nan, float("-inf"), x)
        if RACE:  # softmax's numerator over the noise: the sum it divides by is the same for every id
            noise = tl.load(noise_ptr + ids, mask=ids < n, other=1.0)
            score = tl.exp((score - peak) / temperature) / tl.maximum(noise, 1.1754943508222875e-38)
        else:
            has_nan = tl.maximum(has_nan, tl.max(is_nan.to(tl.int32), axis=0))
        chunk_best = tl.max(score, axis=0)
        chunk_id = tl.min(tl.where(score == chunk_best, ids, n), axis=0)
        better = chunk_best > best  # strictly: an equal score in a later chunk has a larger id
        best_id = tl.where(better, chunk_id, best_id)
        best = tl.maximum(best, chunk_best)
    if not RACE:  # greedy: the best score is the row's maximum
        peak = best
    valid = (has_nan == 0) & (peak < float("inf")) & (peak > float("-inf"))
    tl.store(out_ptr, tl.where(valid, best_id, -1).to(tl.int64))


def _launch(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float) -> torch.Tensor:
    assert logits.dim() == 1 and logits.is_contiguous(), f"one contiguous row, got {tuple(logits.shape)}"
    assert noise is None or (noise.shape == logits.shape and noise.dtype == torch.float32 and noise.is_contiguous())
    out = torch.empty((), dtype=torch.int64, device=logits.device)
    _pick_kernel[(1,)](logits, logits if noise is None else noise, out, logits.numel(), temperature,
                       RACE=noise is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)  # fmt: skip
    return out


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """logits: (V,) any float dtype, contiguous. Returns a 0-d int64 tensor on the same device: the argmax, or -1."""
    return _launch(logits, None, 1.0)


def race_pick(logits: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits: (V,) any float dtype   noise: (V,) fp32 Exp(1) draws   temperature > 0.
    Returns a 0-d int64 tensor: the sampled id, or -1."""
    assert temperature > 0, f"temperature {temperature}: greedy decoding is greedy_pick"
    return _launch(logits, noise, temperature)


def greedy_pick_ref(logits: torch.Tensor) -> torch.Tensor:
    """Same contract, as sampling.sample computes it: max's NaN propagation decides validity, then argmax."""
    peak = logits.max()
    return torch.where(peak.float().abs() < math.inf, torch.argmax(logits), -1)


def race_pick_ref(logits: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """Same contract, as sampling.sample computes it: temperature, softmax, then the race (sample_from_probs)."""
    x = logits.float()
    peak = x.max()
    if temperature != 1.0:
        x = (x - peak) / temperature
    probs = torch.softmax(x, dim=-1)
    token = torch.argmax(probs / noise.clamp_min(torch.finfo(noise.dtype).tiny))
    return torch.where(peak.abs() < math.inf, token, -1)
