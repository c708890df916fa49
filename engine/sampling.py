"""Sampling: one request's logits row -> the next token id, and logits -> logprobs for the API.

Pure functions of tensors on any device, free of host syncs on the sampling path, so the engine can run them
right after a CUDA-graph decode step. The pick itself is kernels.pick (one launch on CUDA, its PyTorch twin
elsewhere); this module turns a request's parameters and history into its inputs. Stopping (EOS, stop ids,
min_tokens) is the engine's; it bans ids here.
"""

from __future__ import annotations

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
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick the next token from one row of raw logits; returns a 0-d int64 tensor on the logits' device.

    logits: (V,) raw model output, any float dtype; left unchanged.
    banned: (V,) bool on the same device, ids that may not be picked at this step (the engine bans EOS and stop ids
    this way until min_tokens); build it once per request, not per step.

    Order: logit_bias -> banned ids to -inf -> repetition penalty (prompt and output tokens) -> presence and
    frequency penalties (output tokens) -> greedy argmax if params.is_greedy, else temperature -> top_k -> top_p ->
    min_p -> an exponential race on Exp(1) noise drawn from `generator`, one draw per token id (kernels.pick, one
    launch on CUDA). Equal logits at a top_k / top_p cut keep the lower id.

    Returns INVALID_TOKEN_ID (-1) instead of a token when the raw row holds NaN or +inf or nothing finite, or
    when the bans leave no token: the engine reads the id anyway, so it checks for -1 there at no extra sync,
    and must not feed -1 to the model or to PenaltyState.update.
    """
    assert logits.dim() == 1, f"logits must be one row (V,), got {tuple(logits.shape)}"
    assert bool(params.logit_bias) == (penalties.logit_bias is not None), "build PenaltyState with params.logit_bias"
    noise = None
    if not params.is_greedy:  # the same generator call for every path, so a seed draws the same noise
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(generator=generator)
    repetition = params.repetition_penalty
    is_counted = repetition != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    return kernels.pick(
        logits.contiguous(),
        noise,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        bias=penalties.logit_bias,
        banned=banned,
        prompt_mask=penalties.prompt_mask if repetition != 1.0 else None,
        counts=penalties.output_counts if is_counted else None,
        repetition=repetition,
        presence=params.presence_penalty,
        frequency=params.frequency_penalty,
    )


def warm_up(vocab_size: int, device: torch.device) -> None:
    """Compile the pick's four kernels (greedy or a draw, from the raw row or a penalized one) now, so the first
    request that needs each does not wait for Triton. Nothing to do off CUDA."""
    if device.type != "cuda":
        return
    logits = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    penalties = PenaltyState(torch.zeros(1, dtype=torch.int64, device=device), vocab_size)
    for temperature in (0.0, 1.0):
        for presence in (0.0, 1.0):
            sample(logits, SamplingParams(temperature=temperature, presence_penalty=presence), penalties, None)
    torch.cuda.synchronize(device)


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
