"""The greedy pick of one logits row in one launch: the id of the largest logit (the lowest id among equal ones, as
torch.argmax), or -1 when the row holds a NaN, a +inf or nothing but -inf (engine/sampling.py's INVALID_TOKEN_ID rule).

Why a kernel: torch's argmax of a 32k row is one 512-thread block walking the row (12 µs on the H100), and
sampling.sample's greedy path ran three such reductions per token (the validity check's two maxima and the argmax),
about 40 µs beside a 1.6 ms decode step. One program of 16 warps reads the row (fresh in L2 from the LM head) a
chunk at a time and carries (max, its id, any NaN) along.
Triton kernel + launcher greedy_pick for CUDA (and TRITON_INTERPRET=1); greedy_pick_ref is the twin.
"""

from __future__ import annotations

import math

import torch

from kernels._triton import tl, triton

BLOCK = 4096  # logits per chunk: 8 chunks for a 32k vocabulary
NUM_WARPS = 16


@triton.jit
def _greedy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    best = float("-inf")
    best_id = n  # past every id: stays only if the row is all -inf (then invalid anyway)
    has_nan = 0
    for start in tl.range(0, n, BLOCK, num_stages=3):
        ids = start + offs
        x = tl.load(x_ptr + ids, mask=ids < n, other=float("-inf")).to(tl.float32)
        is_nan = x != x
        has_nan = tl.maximum(has_nan, tl.max(is_nan.to(tl.int32), axis=0))
        x = tl.where(is_nan, float("-inf"), x)
        chunk_max = tl.max(x, axis=0)
        chunk_id = tl.min(tl.where(x == chunk_max, ids, n), axis=0)
        better = chunk_max > best  # strictly: an equal maximum in a later chunk has a larger id
        best_id = tl.where(better, chunk_id, best_id)
        best = tl.maximum(best, chunk_max)
    valid = (has_nan == 0) & (best < float("inf")) & (best > float("-inf"))
    tl.store(out_ptr, tl.where(valid, best_id, -1).to(tl.int64))


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """logits: (V,) any float dtype, contiguous. Returns a 0-d int64 tensor on the same device: the argmax, or -1."""
    assert logits.dim() == 1 and logits.is_contiguous(), f"one contiguous row, got {tuple(logits.shape)}"
    out = torch.empty((), dtype=torch.int64, device=logits.device)
    _greedy_kernel[(1,)](logits, out, logits.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def greedy_pick_ref(logits: torch.Tensor) -> torch.Tensor:
    """Same contract, as sampling.sample computes it: max's NaN propagation decides validity, then argmax."""
    peak = logits.max()
    return torch.where(peak.float().abs() < math.inf, torch.argmax(logits), -1)
