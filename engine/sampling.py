"""Sampling: one request's logits row -> the next token id, and logits -> logprobs for the API.

Pure functions of tensors on any device, free of host syncs on the sampling path, so the engine can run them
right after a CUDA-graph decode step. Stopping (EOS, stop ids, min_tokens) is the engine's; it bans ids here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import kernels
from engine.api import MAX_LOGPROBS, SamplingParams, TokenLogprob

INVALID_TOKEN_ID = -1  # what sample() returns when the row cannot be sampled (NaN, +inf, or every token banned)
_PROMPT_LOGPROBS_ROWS = 1024  # rows per log_softmax chunk: bounds the fp32 copy of a long prompt's (n, V) logits


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator for one request, seeded on `device`; None (the global RNG) when the request has no seed.

    The same seed gives the same tokens for the same logits on the same kind of device (CPU and CUDA streams
    differ)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


class PenaltyState:
    """One request's token history as the penalties see it, plus its logit bias, on the prompt's device.

    prompt_ids: (n,) int64 on the logits' device, the ids the repetition penalty counts as seen from the start
    logit_bias: params.logit_bias (token id -> added to its logit); sample() checks that it was passed
    Built once per request; `update` after every sampled token. The bias lives here as a dense row because
    building it from the params' dict at every step would be a host-to-device copy (a sync) per token.
    """

    __slots__ = ("_one", "logit_bias", "output_counts", "prompt_mask")

    def __init__(self, prompt_ids: torch.Tensor, vocab_size: int, logit_bias: dict[int, float] | None = None) -> None:
        device = prompt_ids.device
        self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # (V,)
        self.prompt_mask.index_fill_(0, prompt_ids, True)
        self.output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)  # (V,)
        self.logit_bias: torch.Tensor | None = None  # (V,) fp32
        if logit_bias:
            assert all(0 <= i < vocab_size for i in logit_bias), f"logit_bias ids outside [0, {vocab_size})"
            ids = torch.tensor(list(logit_bias), dtype=torch.long)
            values = torch.tensor(list(logit_bias.values()), dtype=torch.float32)
            self.logit_bias = torch.zeros(vocab_size).index_put_((ids,), values).to(device)
        self._one = torch.ones(1, dtype=torch.int32, device=device)  # (1,) the index_add_ source, allocated once

    def update(self, token: torch.Tensor) -> None:
        """Count one generated token (a 0-d or (1,) int64 tensor from sample, never INVALID_TOKEN_ID); no sync."""
        self.output_counts.index_add_(0, token.reshape(1), self._one)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    penalties: PenaltyState,
    generator: torch.Generator | None,
    suppress_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick the next token from one row of raw logits; returns a 0-d int64 tensor on the logits' device.

    logits: (V,) raw model output, any float dtype; left unchanged.
    suppress_ids: (S,) int64 on the same device, ids that may not be picked at this step (the engine bans EOS
    and stop ids this way until min_tokens); build it once per request, not per step.

    Order: logit_bias -> suppress_ids to -inf -> repetition penalty (prompt and output tokens) -> presence and
    frequency penalties (output tokens) -> greedy argmax if params.is_greedy, else temperature -> top_k ->
    top_p -> min_p -> an exponential race drawn from `generator`. Equal logits at a top_k / top_p cut keep
    the lower id.

    Returns INVALID_TOKEN_ID (-1) instead of a token when the raw row holds NaN or +inf or nothing finite, or
    when the bans leave no token: the engine reads the id anyway, so it checks for -1 there at no extra sync,
    and must not feed -1 to the model or to PenaltyState.update.
    """
    assert logits.dim() == 1, f"logits must be one row (V,), got {tuple(logits.shape)}"
    assert params.repetition_penalty > 0 and params.top_k >= 0 and 0 <= params.min_p <= 1, params
    assert bool(params.logit_bias) == (penalties.logit_bias is not None), "build PenaltyState with params.logit_bias"
    is_plain = (penalties.logit_bias is None and suppress_ids is None and params.repetition_penalty == 1.0
                and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0)  # fmt: skip
    if params.is_greedy and is_plain:  # the common cases in one launch each: the same token, the same -1 rule
        return kernels.greedy_pick(logits.contiguous())
    if is_plain and params.top_k == 0 and params.top_p >= 1.0 and params.min_p == 0.0:  # temperature only
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(generator=generator)
        return kernels.race_pick(logits.contiguous(), noise, params.temperature)
    raw = logits
    logits = logits.to(torch.float32, copy=True)  # (V,) fp32, ours to modify in place
    if penalties.logit_bias is not None:
        logits += penalties.logit_bias
    if suppress_ids is not None:
        logits.index_fill_(0, suppress_ids, -math.inf)
    if params.repetition_penalty != 1.0:
        is_seen = penalties.prompt_mask | (penalties.output_counts > 0)
        logits = apply_repetition_penalty(logits, is_seen, params.repetition_penalty)
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        logits = apply_presence_frequency(
            logits, penalties.output_counts, params.presence_penalty, params.frequency_penalty
        )
    # torch.max propagates NaN, so a finite max means: no NaN, no +inf, and some token left to pick. The raw
    # row is checked too because suppress_ids may have overwritten its NaN; the sum is finite only if both are.
    peak = logits.max()
    is_valid = (raw.max() + peak).abs() < math.inf  # 0-d bool

    if params.is_greedy:
        token = torch.argmax(logits)
    else:
        if params.temperature != 1.0:
            # Shifting by the max first keeps a tiny temperature from overflowing to inf (softmax is shift-invariant).
            logits = (logits - peak) / params.temperature
        order = None
        if params.top_k > 0 or params.top_p < 1.0:
            # One sort serves top_k and top_p (cheaper than topk + sort on CUDA); the draw then happens in sorted
            # order and maps back through `order`. Stable, so equal logits rank by id.
            logits, order = torch.sort(logits, descending=True, stable=True)  # (V,), (V,)
            if params.top_k > 0:
                mask_top_k_(logits, params.top_k)
        probs = torch.softmax(logits, dim=-1)  # (V,)
        if params.top_p < 1.0:
            mask_top_p_(probs, params.top_p)
        if params.min_p > 0.0:
            mask_min_p_(probs, params.min_p)
        token = sample_from_probs(probs, generator)
        if order is not None:
            token = torch.take(order, token)
    return torch.where(is_valid, token, INVALID_TOKEN_ID)


def apply_repetition_penalty(logits: torch.Tensor, is_seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: a seen token's logit is divided by `penalty` when positive, multiplied when negative.

    logits: (V,) fp32    is_seen: (V,) bool    returns a new (V,) fp32
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    finite = torch.finfo(torch.float32).max  # a tiny penalty must not overflow a logit to +inf (NaN after softmax)
    return torch.where(is_seen, penalized.clamp(-finite, finite), logits)


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


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one index with probability proportional to probs, without a host sync: argmax of probs / Exp(1).

    Each token's probs[i] / E_i is the inverse of an exponential time with rate probs[i]; the first to arrive
    wins with probability probs[i] / sum(probs). Zero-probability tokens never win.
    probs: (V,) fp32, unnormalized is fine    returns a 0-d int64
    """
    noise = torch.empty_like(probs).exponential_(generator=generator)  # (V,)
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)  # an exact 0 would make 0 / 0 = NaN win the argmax
    return torch.argmax(probs / noise)


def token_logprob(logits: torch.Tensor, token_id: int, num_top: int) -> TokenLogprob:
    """The chosen token's logprob and the num_top (0..20) most likely tokens' from the raw logits (before
    penalties and temperature, as vLLM reports them). Syncs: it returns Python floats.

    logits: (V,) raw model output, any float dtype
    """
    return _logprobs_of_rows(logits.unsqueeze(0), torch.tensor([token_id]), num_top)[0]


def prompt_logprobs(
    logits: torch.Tensor, prompt_ids: Sequence[int] | torch.Tensor, num_top: int
) -> tuple[TokenLogprob | None, ...]:
    """Logprobs of each prompt token given the tokens before it; position 0 has none.

    logits: (n, V) from the prefill of the n prompt tokens (meta-token rows excluded); row i predicts token i+1.
    prompt_ids: n ids    returns n entries: None, then position i's logprob from row i-1
    """
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    n = prompt_ids.shape[0]
    assert logits.dim() == 2 and logits.shape[0] == n, f"logits {tuple(logits.shape)} for {n} prompt tokens"
    entries: list[TokenLogprob] = []
    for start in range(0, n - 1, _PROMPT_LOGPROBS_ROWS):
        end = min(start + _PROMPT_LOGPROBS_ROWS, n - 1)
        entries += _logprobs_of_rows(logits[start:end], prompt_ids[start + 1 : end + 1], num_top)
    return (None, *entries)


def _logprobs_of_rows(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> list[TokenLogprob]:
    """logits: (r, V) raw    token_ids: (r,) int64, the token scored in each row    returns r entries"""
    assert 0 <= num_top <= MAX_LOGPROBS, f"num_top must be in [0, {MAX_LOGPROBS}], got {num_top}"
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (r, V) fp32
    chosen = logprobs.gather(1, token_ids.to(logprobs.device).unsqueeze(1)).squeeze(1)  # (r,)
    top = torch.topk(logprobs, min(num_top, logprobs.shape[-1]), dim=-1)  # (r, num_top), most likely first
    chosen, top_values, top_ids = chosen.tolist(), top.values.tolist(), top.indices.tolist()
    return [
        TokenLogprob(token_id, logprob, tuple(zip(ids, values, strict=True)))
        for token_id, logprob, ids, values in zip(token_ids.tolist(), chosen, top_ids, top_values, strict=True)
    ]
