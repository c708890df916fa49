"""Pins engine/sampling.py: every transform on hand-computed rows, the sampled distribution, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engine import sampling
from engine.api import SamplingParams, TokenLogprob
from engine.sampling import INVALID_TOKEN_ID, PenaltyState, make_generator, prompt_logprobs, sample, token_logprob
from kernels.pick import apply_presence_frequency, apply_repetition_penalty, mask_min_p_, mask_top_k_, mask_top_p_

NAN, INF = math.nan, math.inf
PROBS = [0.4, 0.3, 0.15, 0.1, 0.05]  # a small vocabulary for distribution checks; logits are their logs
CHI2_CRITICAL_0_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}  # chi-square at p = 0.001 by degrees of freedom


def penalties_for(params: SamplingParams, vocab_size: int, prompt_ids: tuple[int, ...] = ()) -> PenaltyState:
    return PenaltyState(torch.tensor(prompt_ids, dtype=torch.long), vocab_size, params.logit_bias)


def draw(
    logits: torch.Tensor,
    params: SamplingParams,
    num_draws: int,
    seed: int | None = 0,
    banned_ids: list[int] | None = None,
) -> list[int]:
    """num_draws tokens from the same logits and one request's generator (the history is not updated)."""
    penalties = penalties_for(params, logits.shape[-1])
    generator = make_generator(seed, "cpu")
    banned = None if banned_ids is None else banned_row(banned_ids, logits.shape[-1])
    tokens = [sample(logits, params, penalties, generator, banned) for _ in range(num_draws)]
    return torch.stack(tokens).tolist()


def banned_row(ids: list[int], vocab_size: int, device="cpu") -> torch.Tensor:
    banned = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    banned[ids] = True
    return banned


def random_logits(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocab_size, generator=torch.Generator().manual_seed(seed)) * 2.5  # the checkpoints' spread


# --- greedy and temperature ---


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)], ids=["T0", "top_k1"]
)
def test_greedy_is_argmax(params):
    logits = random_logits(50)
    assert set(draw(logits, params, 20)) == {int(torch.argmax(logits))}


def test_greedy_ignores_the_sampling_filters():
    logits = torch.tensor([0.0, 3.0, 1.0])
    params = SamplingParams(temperature=0.0, top_p=0.01, min_p=1.0, top_k=2)
    assert draw(logits, params, 1) == [1]


@pytest.mark.parametrize("temperature", [1e-2, 1e-4, 1e-30], ids=lambda t: f"T{t:g}")
def test_temperature_to_zero_tends_to_argmax(temperature):
    logits = torch.tensor([1.0, 2.0, 2.5, -1.0, 2.0])  # top margin 0.5: at T = 0.01 the runner-up has e^-50
    assert set(draw(logits, SamplingParams(temperature=temperature), 200)) == {2}


# --- top_k, top_p, min_p ---


def masked(mask_, row: list[float], arg: float) -> torch.Tensor:
    """The result of an in-place mask_* transform on a fresh fp32 row."""
    row = torch.tensor(row)
    mask_(row, arg)
    return row


def test_top_k_keeps_exactly_k_of_a_sorted_row():
    assert masked(mask_top_k_, [3.0, 3.0, 3.0, 1.0, 0.0], 2).tolist() == [3.0, 3.0, -INF, -INF, -INF]
    assert masked(mask_top_k_, [3.0, 1.0], 100).tolist() == [3.0, 1.0]


def test_top_k_samples_only_the_k_best():
    logits = random_logits(10)
    expected = set(torch.topk(logits, 3).indices.tolist())
    assert set(draw(logits, SamplingParams(temperature=1.5, top_k=3), 1000)) == expected


def test_top_k_ties_at_the_cut_keep_the_lower_ids():
    logits = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0])
    assert set(draw(logits, SamplingParams(top_k=2), 500)) == {1, 2}


def test_top_k_larger_than_the_vocab_keeps_all():
    logits = torch.log(torch.tensor(PROBS))
    assert set(draw(logits, SamplingParams(top_k=100), 2000)) == set(range(len(PROBS)))


def test_top_p_tiny_keeps_the_top_token():
    assert masked(mask_top_p_, PROBS, 1e-9).tolist() == pytest.approx([0.4, 0, 0, 0, 0])
    logits = random_logits(50)
    assert set(draw(logits, SamplingParams(top_p=1e-9), 200)) == {int(torch.argmax(logits))}


def test_top_p_mass_reached_exactly_takes_nothing_more():
    probs = torch.softmax(torch.tensor([2.0, 1.0, 0.5, 0.0]), dim=-1).tolist()
    top2_mass = float(torch.tensor(probs[0]) + torch.tensor(probs[1]))  # the fp32 sum the cumsum holds: a true tie
    assert (masked(mask_top_p_, probs, top2_mass) > 0).tolist() == [True, True, False, False]
    just_above = float(torch.nextafter(torch.tensor(top2_mass), torch.tensor(1.0)))  # top_p is compared in fp32
    assert (masked(mask_top_p_, probs, just_above) > 0).tolist() == [True, True, True, False]


def test_top_p_ties_at_the_cut_keep_the_smallest_set_lower_ids_first():
    logits = torch.log(torch.tensor([0.2, 0.4, 0.2, 0.2]))  # top_p 0.5: 0.4, then one of the three 0.2s
    assert set(draw(logits, SamplingParams(top_p=0.5), 500)) == {0, 1}


def test_top_p_keeps_the_unfiltered_probabilities():
    assert masked(mask_top_p_, PROBS, 0.6).tolist() == pytest.approx([0.4, 0.3, 0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "min_p, expected",
    [(0.25, [True, True, True, True]), (0.5, [True, False, True, False]), (1.0, [True, False, False, False])],
    ids=["min_p0.25-boundary-kept", "min_p0.5", "min_p1"],
)
def test_min_p_drops_below_a_fraction_of_the_max(min_p, expected):
    probs = [0.5, 0.125, 0.25, 0.125]  # exact in binary, so min_p * max hits 0.125 exactly; any order
    assert (masked(mask_min_p_, probs, min_p) > 0).tolist() == expected


def test_min_p_samples_only_the_survivors():
    logits = torch.log(torch.tensor(PROBS))
    assert set(draw(logits, SamplingParams(min_p=0.5), 500)) == {0, 1}  # threshold 0.2


# --- penalties, logit_bias, banned ids ---


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.0])
    is_seen = torch.tensor([True, True, False, False, True])
    penalized = apply_repetition_penalty(logits, is_seen, 2.0)
    assert penalized.tolist() == [1.0, -4.0, 1.0, -1.0, 0.0]


def test_repetition_penalty_counts_prompt_and_output_tokens():
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    logits = torch.tensor([3.0, 2.0, 1.8, 1.0])  # penalized: token 0 -> 1.5, token 1 -> 1.0, so 2 wins
    penalties = penalties_for(params, 4, prompt_ids=(0,))
    assert int(sample(logits, params, penalties, None)) == 1
    penalties.update(torch.tensor(1))
    assert int(sample(logits, params, penalties, None)) == 2


@pytest.mark.parametrize(
    "presence, frequency, expected",
    [
        (0.5, 0.25, [1.0, 1.0 - 0.5 - 0.25, 1.0 - 0.5 - 3 * 0.25, 1.0]),
        (-0.5, -1.0, [1.0, 1.0 + 0.5 + 1.0, 1.0 + 0.5 + 3 * 1.0, 1.0]),
        (0.0, 2.0, [1.0, 1.0 - 2.0, 1.0 - 3 * 2.0, 1.0]),
    ],
    ids=["positive", "negative", "frequency-only"],
)
def test_presence_frequency_match_the_openai_formula(presence, frequency, expected):
    penalties = PenaltyState(torch.tensor([0, 3]), 4)  # prompt tokens are not penalized by these two
    for token in (1, 2, 2, 2):
        penalties.update(torch.tensor(token))
    assert penalties.output_counts.tolist() == [0, 1, 3, 0]
    penalized = apply_presence_frequency(torch.ones(4), penalties.output_counts, presence, frequency)
    assert penalized.tolist() == pytest.approx(expected)


def test_presence_frequency_change_the_greedy_pick():
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    penalties = penalties_for(params, 4)
    for token in (1, 2, 2, 2):
        penalties.update(torch.tensor(token))
    logits = torch.tensor([1.0, 1.7, 2.2, 0.9])  # penalized: [1.0, 0.95, 0.95, 0.9]
    assert int(sample(logits, params, penalties, None)) == 0


def test_logit_bias_plus_100_forces_a_token():
    logits = random_logits(50)
    weakest = int(torch.argmin(logits))
    assert set(draw(logits, SamplingParams(logit_bias={weakest: 100.0}), 200)) == {weakest}


def test_logit_bias_minus_100_bans_a_token():
    logits = torch.tensor([3.0, 2.9, 2.8])
    assert draw(logits, SamplingParams(temperature=0.0, logit_bias={0: -100.0}), 1) == [1]
    assert 0 not in draw(logits, SamplingParams(logit_bias={0: -100.0}), 500)


def test_logit_bias_must_reach_the_penalty_state():
    params = SamplingParams(logit_bias={0: 5.0})
    with pytest.raises(AssertionError, match="logit_bias"):
        sample(torch.zeros(3), params, PenaltyState(torch.tensor([0]), 3), None)


def test_banned_ids_are_never_picked():
    logits = torch.tensor([3.0, 2.9, 2.8, 0.0])
    assert draw(logits, SamplingParams(temperature=0.0), 1, banned_ids=[0, 2]) == [1]
    assert set(draw(logits, SamplingParams(), 500, banned_ids=[0, 2])) == {1, 3}


def test_penalty_state_marks_the_prompt():
    penalties = PenaltyState(torch.tensor([1, 3, 3]), 5, {4: -1.5})
    assert penalties.prompt_mask.tolist() == [False, True, False, True, False]
    assert penalties.output_counts.tolist() == [0] * 5
    assert penalties.logit_bias.tolist() == [0.0, 0.0, 0.0, 0.0, -1.5]


# --- the sampled distribution and seeds ---


@pytest.mark.parametrize(
    "params, expected, num_draws",
    [
        (SamplingParams(), PROBS, 20_000),
        (SamplingParams(temperature=0.5), [p**2 for p in PROBS], 5_000),
        (SamplingParams(temperature=2.0), [p**0.5 for p in PROBS], 5_000),
        (SamplingParams(top_k=3), [*PROBS[:3], 0, 0], 5_000),
        (SamplingParams(top_p=0.6), [*PROBS[:2], 0, 0, 0], 5_000),
        (SamplingParams(min_p=0.2), [*PROBS[:4], 0], 5_000),
    ],
    ids=["plain", "T0.5", "T2", "top_k3", "top_p0.6", "min_p0.2"],
)
def test_sampled_distribution_matches_the_softmax(params, expected, num_draws):
    logits = torch.log(torch.tensor(PROBS))
    expected = torch.tensor(expected, dtype=torch.float64) / sum(expected)
    counts = torch.bincount(torch.tensor(draw(logits, params, num_draws)), minlength=len(PROBS)).double()
    kept = expected > 0
    assert counts[~kept].sum() == 0, f"drew filtered tokens: {counts.tolist()}"
    chi2 = float(((counts[kept] - num_draws * expected[kept]) ** 2 / (num_draws * expected[kept])).sum())
    assert chi2 < CHI2_CRITICAL_0_001[int(kept.sum()) - 1], f"chi2 {chi2:.1f}, counts {counts.tolist()}"


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = random_logits(50, seed=1) / 2.5  # flat enough that 200 draws cover many tokens
    params = SamplingParams(top_p=0.95, top_k=40)
    first = draw(logits, params, 200, seed=1234)
    assert draw(logits, params, 200, seed=1234) == first
    assert draw(logits, params, 200, seed=1235) != first
    assert len(set(first)) > 10


def test_no_seed_uses_the_global_rng():
    assert make_generator(None, "cpu") is None
    logits = random_logits(50) / 2.5
    torch.manual_seed(7)
    first = draw(logits, SamplingParams(), 50, seed=None)
    torch.manual_seed(7)
    assert draw(logits, SamplingParams(), 50, seed=None) == first


def test_the_callers_logits_are_unchanged():
    logits = random_logits(50)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={3: 5.0},
    )
    penalties = penalties_for(params, 50, prompt_ids=(1, 2, 3))
    penalties.update(torch.tensor(4))
    sample(logits, params, penalties, make_generator(0, "cpu"), banned_row([5, 6], 50))
    token_logprob(logits, 3, 5)
    assert torch.equal(logits, before)


# --- rows that cannot be sampled ---


@pytest.mark.parametrize(
    "row, banned",
    [
        ([1.0, NAN, 2.0], None),
        ([NAN, NAN, NAN], None),
        ([1.0, INF, 2.0], None),
        ([-INF, -INF, -INF], None),
        ([1.0, NAN, 2.0], [1]),
        ([1.0, 2.0, 3.0], [0, 1, 2]),
    ],
    ids=["one-nan", "all-nan", "pos-inf", "all-neg-inf", "nan-under-a-ban", "all-banned"],
)
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_unsampleable_rows_give_the_invalid_id(row, banned, temperature):
    params = SamplingParams(temperature=temperature)
    assert draw(torch.tensor(row), params, 3, banned_ids=banned) == [INVALID_TOKEN_ID] * 3


def test_neg_inf_entries_are_bans_not_errors():
    logits = torch.tensor([-INF, 1.0, -INF, 0.5])
    assert set(draw(logits, SamplingParams(), 300)) == {1, 3}


# --- logprobs ---


@pytest.mark.parametrize("num_top", [0, 1, 5, 20])
def test_token_logprob_values_and_order(num_top):
    logits = random_logits(50)
    expected = torch.log_softmax(logits.double(), dim=-1)
    chosen = int(torch.argmin(logits))  # a token far outside any top list
    result = token_logprob(logits, chosen, num_top)
    assert result.token_id == chosen
    assert result.logprob == pytest.approx(float(expected[chosen]), abs=1e-5)
    assert [token_id for token_id, _ in result.top] == torch.argsort(expected, descending=True)[:num_top].tolist()
    assert [value for _, value in result.top] == pytest.approx(
        [float(expected[token_id]) for token_id, _ in result.top], abs=1e-5
    )
    assert all(isinstance(value, float) for _, value in result.top)


def test_token_logprob_of_a_bfloat16_row():
    logits = random_logits(50).bfloat16()
    expected = torch.log_softmax(logits.float(), dim=-1)
    result = token_logprob(logits, 7, 2)
    assert result.logprob == pytest.approx(float(expected[7]), abs=1e-5)


def test_prompt_logprobs_row_i_minus_1_scores_token_i():
    logits = random_logits(4 * 10).view(4, 10)
    prompt_ids = (1, 7, 2, 9)
    result = prompt_logprobs(logits, prompt_ids, 2)
    expected = torch.log_softmax(logits, dim=-1)
    assert len(result) == 4 and result[0] is None
    for i in range(1, 4):
        assert result[i].token_id == prompt_ids[i]
        assert result[i].logprob == pytest.approx(float(expected[i - 1, prompt_ids[i]]), abs=1e-6)
        assert [t for t, _ in result[i].top] == torch.topk(expected[i - 1], 2).indices.tolist()


def test_prompt_logprobs_of_one_token():
    assert prompt_logprobs(random_logits(10).view(1, 10), (1,), 5) == (None,)


def test_prompt_logprobs_chunks_agree(monkeypatch):
    logits = random_logits(7 * 10).view(7, 10)
    prompt_ids = (1, 4, 4, 8, 0, 3, 9)
    whole = prompt_logprobs(logits, prompt_ids, 3)
    monkeypatch.setattr(sampling, "_PROMPT_LOGPROBS_ROWS", 2)
    assert prompt_logprobs(logits, prompt_ids, 3) == whole
    assert all(isinstance(entry, TokenLogprob) for entry in whole[1:])


# --- on the GPU: no host sync on the per-token path ---


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sample_and_update_do_not_sync_on_cuda():
    params = SamplingParams(
        temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2, presence_penalty=0.3,
        frequency_penalty=0.3, logit_bias={5: 2.0}, seed=0,
    )  # fmt: skip
    logits = random_logits(32001).cuda()
    penalties = PenaltyState(torch.arange(10, device="cuda"), 32001, params.logit_bias)
    generator = make_generator(params.seed, "cuda")
    banned = banned_row([2], 32001, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = []
        for _ in range(20):
            token = sample(logits, params, penalties, generator, banned)
            penalties.update(token)
            tokens.append(token)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert INVALID_TOKEN_ID not in torch.stack(tokens).tolist()
    assert int(penalties.output_counts.sum()) == 20
