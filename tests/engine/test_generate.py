"""Engine.generate end to end on real checkpoints: greedy goldens, every stop condition, logprobs, seeds, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from engine.api import EngineError, FinishReason, GenerationRequest, SamplingParams
from engine.generate import Engine

FOLDER = "tests/data/conformance/hymba-mirror-12L"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(FOLDER, device="cpu")


@pytest.fixture(scope="module")
def vec() -> dict[str, torch.Tensor]:
    return load_file(f"{FOLDER}/vectors.safetensors")


def run(engine: Engine, prompt, should_stop=lambda: False, **params):
    request = GenerationRequest(tuple(int(t) for t in prompt), SamplingParams(**params))
    return list(engine.generate(request, should_stop))


def golden(vec, case: int) -> tuple[torch.Tensor, list[int]]:
    return vec[f"case{case}.prompt_ids"], vec[f"case{case}.gen_ids"].tolist()


def continuation(engine: Engine, prompt, generated: list[int]) -> str:
    """The text a stream adds to the prompt (keeps the leading space a continuation starts with)."""
    prompt = [int(t) for t in prompt]
    return engine.tokenizer.decode(prompt + generated)[len(engine.tokenizer.decode(prompt)) :]


@pytest.mark.parametrize("case", range(5))
def test_greedy_reproduces_the_golden_continuation(engine, vec, case):
    prompt, gen = golden(vec, case)
    events = run(engine, prompt, max_tokens=len(gen), temperature=0, ignore_eos=True)
    assert [e.token_id for e in events] == gen
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert events[-1].num_prompt_tokens == len(prompt) and events[-1].num_completion_tokens == len(gen)
    assert "".join(e.text for e in events) == continuation(engine, prompt, gen)


def test_logprobs_match_the_golden_logits(engine, vec):
    prompt, gen = golden(vec, 1)
    events = run(engine, prompt, max_tokens=8, temperature=0, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    want = torch.log_softmax(vec["case1.gen_logits"][:8].double(), dim=-1)
    for t, event in enumerate(events):
        assert event.logprob.token_id == gen[t]
        assert event.logprob.logprob == pytest.approx(want[t, gen[t]].item(), abs=1e-3)
        top = want[t].topk(5)
        assert [tid for tid, _ in event.logprob.top] == top.indices.tolist()
        assert [lp for _, lp in event.logprob.top] == pytest.approx(top.values.tolist(), abs=1e-3)
    prompt_lp = events[0].prompt_logprobs
    assert prompt_lp[0] is None and len(prompt_lp) == len(prompt)
    want_prompt = torch.log_softmax(vec["case1.prefill_logits"].double(), dim=-1)
    for i in range(1, len(prompt)):
        assert prompt_lp[i].logprob == pytest.approx(want_prompt[i - 1, prompt[i]].item(), abs=1e-3)
    assert all(e.prompt_logprobs is None for e in events[1:])


def test_stop_string_across_token_boundaries_is_cut(engine, vec):
    prompt, gen = golden(vec, 1)
    pieces = [continuation(engine, prompt, gen[: t + 1]) for t in range(len(gen))]  # text after t + 1 tokens
    full = pieces[-1]
    # a stop string made of the end of one token's text and the start of the next one's
    t = next(
        t
        for t in range(2, len(gen) - 1)
        if gen[t] != gen[t + 1] and full.count(full[len(pieces[t]) - 2 : len(pieces[t]) + 3]) == 1
    )
    stop = full[len(pieces[t]) - 2 : len(pieces[t]) + 3]
    events = run(engine, prompt, max_tokens=20, temperature=0, ignore_eos=True, stop=(stop,))
    assert events[-1].finish_reason is FinishReason.STOP
    assert "".join(e.text for e in events) == full[: full.index(stop)]
    assert len(events) == t + 2  # generation ends on the token that completes the stop string


def test_stop_token_ids_and_eos(engine, vec):
    prompt, gen = golden(vec, 2)
    stop_id = gen[4]
    events = run(engine, prompt, max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=(stop_id,))
    assert [e.token_id for e in events] == gen[: gen.index(stop_id) + 1]
    assert events[-1].finish_reason is FinishReason.STOP
    assert "".join(e.text for e in events) == continuation(engine, prompt, gen[: gen.index(stop_id)])
    # min_tokens holds the stop id back: generation goes past the first place it would have stopped
    held = run(engine, prompt, max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=(stop_id,), min_tokens=8)
    assert stop_id not in [e.token_id for e in held] and len(held) == 8


def test_eos_from_generation_config_stops_unless_ignored(vec, tmp_path):
    prompt, gen = golden(vec, 0)
    eos = gen[5]
    folder = tmp_path / "model"
    shutil.copytree(FOLDER, folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, eos]}))
    engine = Engine.load(folder, device="cpu")
    assert engine.eos_token_ids == (2, eos)
    events = run(engine, prompt, max_tokens=32, temperature=0)
    assert [e.token_id for e in events] == gen[: gen.index(eos) + 1]
    assert events[-1].finish_reason is FinishReason.STOP
    assert len(run(engine, prompt, max_tokens=32, temperature=0, ignore_eos=True)) == 32


def test_context_limit_finishes_with_length(engine):
    limit = engine.max_model_len
    events = run(engine, [1] * (limit - 3), max_tokens=50, temperature=0, ignore_eos=True)
    assert len(events) == 3 and events[-1].finish_reason is FinishReason.LENGTH


def test_cancellation_stops_within_one_token(engine, vec):
    prompt, _ = golden(vec, 1)
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    events = run(engine, prompt, should_stop, max_tokens=30, temperature=0, ignore_eos=True)
    assert events[-1].finish_reason is FinishReason.CANCELLED and events[-1].token_id is None
    assert len(events) == 4  # three tokens, then the cancellation


def test_seeded_sampling_is_reproducible(engine, vec):
    prompt, _ = golden(vec, 1)
    a = run(engine, prompt, max_tokens=24, temperature=1.0, seed=11, ignore_eos=True)
    b = run(engine, prompt, max_tokens=24, temperature=1.0, seed=11, ignore_eos=True)
    c = run(engine, prompt, max_tokens=24, temperature=1.0, seed=12, ignore_eos=True)
    assert [e.token_id for e in a] == [e.token_id for e in b]
    assert [e.token_id for e in a] != [e.token_id for e in c]


@pytest.mark.parametrize(
    "prompt, message",
    [([], "at least one token"), ([1, 512], "outside the vocabulary"), ([1] * 120, "context limit")],
    ids=["empty", "out-of-vocab", "too-long"],
)
def test_bad_prompts_are_value_errors(engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        run(engine, prompt, max_tokens=2)


def test_non_finite_logits_raise_and_the_engine_recovers(engine, vec, monkeypatch):
    prompt, gen = golden(vec, 1)
    real_decode = engine.model.decode
    monkeypatch.setattr(
        engine.model, "decode", lambda token, state: torch.full_like(real_decode(token, state), torch.nan)
    )
    with pytest.raises(EngineError, match="non-finite"):
        run(engine, prompt, max_tokens=5, temperature=0)
    monkeypatch.undo()
    assert [e.token_id for e in run(engine, prompt, max_tokens=5, temperature=0, ignore_eos=True)] == gen[:5]


def test_utf8_streaming_through_byte_fallback_pieces(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """Characters spread over byte-fallback pieces are held back until whole, through the engine's own loop."""
    folder = tmp_path / "model"
    shutil.copytree(FOLDER, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_tokenizer_dir / name, folder / name)
    engine = Engine.load(folder, device="cpu")
    script = engine.tokenizer.encode("héllo wörld ✓ 日本語 🙂 done", add_special_tokens=False)
    text = continuation(engine, [1, 5, 6], script)  # valid UTF-8, so one decode is the oracle
    assert text.strip() == "héllo wörld ✓ 日本語 🙂 done"
    assert any(engine.tokenizer.id_to_token(t).startswith("<0x") for t in script), "needs byte-fallback pieces"
    picks = iter(script)
    monkeypatch.setattr("engine.sampling.sample", lambda *args, **kwargs: torch.tensor(next(picks)))
    events = run(engine, [1, 5, 6], max_tokens=len(script), temperature=0)
    streamed = ""
    for event in events:
        assert "\ufffd" not in event.text
        streamed += event.text
        assert text.startswith(streamed)
    assert streamed == text and events[-1].finish_reason is FinishReason.LENGTH
