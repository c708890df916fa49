"""engine/tiny, the checkpoint that ships in the package: it loads through the normal path, predicts held-out
Shakespeare far better than a unigram model, follows the reference's prefill/decode rules, chats in the trained
format, and its training forward (tools/batched_forward.py) is the engine's model."""

from __future__ import annotations

import collections
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from engine.api import FinishReason, GenerationRequest, SamplingParams
from engine.config import HymbaConfig
from engine.generate import Engine
from tools.batched_forward import build_model, chunked_scan, forward, max_logit_gap
from tools.corpus import CHAT_TEMPLATE

TINY = Path(__file__).resolve().parents[2] / "engine" / "tiny"
HELDOUT = Path(__file__).resolve().parents[1] / "data" / "tiny" / "heldout_twelfth_night.txt"  # a held-out play
CONFORMANCE = Path(__file__).resolve().parents[1] / "data" / "conformance" / "hymba-mirror-12L"
FUNCTION_WORDS = {"the", "and", "i", "to", "of", "a", "you", "my", "that", "is", "not", "be", "in", "it", "me", "your"}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(TINY, device="cpu")


def greedy(engine: Engine, prompt: list[int], num_tokens: int) -> tuple[list[int], torch.Tensor, float]:
    """Prefill, then decode one token at a time: the tokens, each step's logits (num_tokens, V) and decode tokens/s."""
    engine.state.reset()
    logits = engine.model.prefill(torch.tensor(prompt), engine.state)
    tokens, rows = [], []
    start = time.perf_counter()
    for t in range(num_tokens):
        rows.append(logits)
        tokens.append(int(logits.argmax()))
        if t + 1 < num_tokens:
            logits = engine.model.decode(torch.tensor(tokens[-1]), engine.state)
    return tokens, torch.stack(rows), (num_tokens - 1) / (time.perf_counter() - start)


def generate_text(engine: Engine, prompt: list[int], **params) -> tuple[str, FinishReason]:
    events = list(engine.generate(GenerationRequest(tuple(prompt), SamplingParams(**params))))
    return "".join(e.text for e in events), events[-1].finish_reason


def test_folder_is_a_complete_hf_checkpoint_under_30_mb():
    sizes = {p.name: p.stat().st_size for p in TINY.iterdir()}
    wanted = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert wanted | {"README.md"} <= set(sizes)
    assert sum(sizes.values()) < 30_000_000, sizes


def test_config_has_the_real_key_set_and_a_scaled_down_hymba_layout():
    raw = json.loads((TINY / "config.json").read_text())
    assert set(raw) == set(json.loads((CONFORMANCE / "config.json").read_text()))
    c = HymbaConfig.from_json(TINY / "config.json")
    assert c.num_memory_tokens > 0 and c.sliding_window is not None
    L = c.num_hidden_layers
    assert {0, L - 1} < set(c.global_attn_idx) and len(c.global_attn_idx) == 3  # first, middle, last
    assert any(p != i for i, p in enumerate(c.kv_producer))  # cross-layer KV sharing
    assert c.num_attention_heads // c.num_key_value_heads in (4, 5) and c.v_head_dim == 2 * c.head_dim
    assert (c.rope, c.rope_type, c.mlp_hidden_act, c.tie_word_embeddings) == (True, "ntk", "silu", True)
    num_params = sum(math.prod(s) for s in _shapes(c).values())
    assert 5e6 <= num_params <= 15e6, num_params


def _shapes(config: HymbaConfig) -> dict[str, tuple[int, ...]]:
    from engine.weights import expected_shapes

    return expected_shapes(config)


def test_tokenizer_is_llama2_shaped_with_the_hymba_chat_template(engine):
    tok = engine.tokenizer
    assert [tok.id_to_token(i) for i in (0, 1, 2, 13)] == ["<unk>", "<s>", "</s>", "<0x0A>"]
    assert tok.vocab_size == engine.config.vocab_size
    assert tok.chat_templates["default"] == CHAT_TEMPLATE
    assert CHAT_TEMPLATE == json.loads((CONFORMANCE / "tokenizer_config.json").read_text())["chat_template"]
    assert tok.encode("To be")[0] == 1  # completions start with BOS
    chat = tok.encode_chat([{"role": "user", "content": "Hail!"}])
    assert tok.id_to_token(chat[0]) == "<extra_id_0>"  # one token per marker, no BOS
    assert sum(tok.id_to_token(i) == "<extra_id_1>" for i in chat) == 2


def test_heldout_perplexity_is_far_below_the_unigram_baseline(engine):
    """Twelfth Night is one of the held-out plays. The baseline is the slice's own token frequencies: the best any
    unigram model can do on it (lower than the training-frequency unigram of the model card)."""
    passages, current = [], []
    for block in HELDOUT.read_text().strip().split("\n\n"):  # passages of at most 1500 characters, as in training
        if current and len("\n\n".join([*current, block])) > 1500:
            passages.append("\n\n".join(current))
            current = []
        current.append(block)
    passages.append("\n\n".join(current))
    nll, counts = 0.0, collections.Counter()
    for passage in passages:
        ids = engine.tokenizer.encode(passage)
        engine.state.reset()
        logits = engine.model.prefill(torch.tensor(ids), engine.state, all_logits=True)
        nll += F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        counts.update(ids[1:])
    n = sum(counts.values())
    perplexity = math.exp(nll / n)
    unigram = math.exp(-sum(k / n * math.log(k / n) for k in counts.values()))
    print(f"held-out perplexity {perplexity:.1f} vs unigram {unigram:.1f} over {n} tokens")
    assert perplexity < unigram / 3  # measured: 75 vs 277 (the model card: 78 vs 798 on all held-out plays)


def test_training_forward_gives_the_engines_prefill_logits():
    ids = Engine.load(TINY, device="cpu").tokenizer.encode(HELDOUT.read_text())[:400]  # past W + M: windows matter
    assert max_logit_gap(TINY, torch.tensor(ids)) < 1e-3


@pytest.mark.parametrize("name", ["hymba-mirror-12L", "hymba-gqa-untied-7L", "hymba-odd-6L"])
def test_training_forward_is_the_engine_model_and_trains_every_parameter(name, monkeypatch):
    folder = CONFORMANCE.parent / name
    config = HymbaConfig.from_json(folder / "config.json")
    ids = torch.randint(
        3, config.vocab_size, (2 * config.sliding_window + 9,), generator=torch.Generator().manual_seed(0)
    )
    assert max_logit_gap(folder, ids) < 1e-4
    for op in kernels.__all__:  # on CUDA the serving kernels are forward-only: training must not call them
        monkeypatch.setattr(kernels, op, _no_serving_kernels)
    torch.manual_seed(0)
    model = build_model(config, "cpu")
    rows = ids[: len(ids) // 2 * 2].view(2, -1)  # a batch of two sequences
    logits = forward(model, rows[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def _no_serving_kernels(*args, **kwargs):
    raise AssertionError("the training forward called a serving kernel")


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_scan_is_the_recurrence(chunk):
    g = torch.Generator().manual_seed(chunk)
    a, b = (
        torch.rand(2, 37, 3, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 37, 3, 4, generator=g, dtype=torch.float64),
    )
    state, expected = torch.zeros(2, 3, 4, dtype=torch.float64), []
    for t in range(37):
        state = a[:, t] * state + b[:, t]
        expected.append(state)
    torch.testing.assert_close(chunked_scan(a, b, chunk), torch.stack(expected, dim=1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("prompt_tokens", [None, 240], ids=["short", "crossing-window"])
def test_greedy_decode_equals_teacher_forced_rows_where_the_reference_agrees(engine, prompt_tokens):
    """Spec 7.3: a decode query at index p sees what the same row of one prefill sees while p < W + M; after that
    decode sees one window token fewer. Rows before that point must agree, later ones may not."""
    tok = engine.tokenizer
    if prompt_tokens is None:
        prompt = tok.encode("To be, or not to be")
    else:
        prompt = tok.encode(HELDOUT.read_text())[:prompt_tokens]
    num_new = 40
    tokens, decoded, tokens_per_s = greedy(engine, prompt, num_new)
    engine.state.reset()
    teacher = engine.model.prefill(torch.tensor(prompt + tokens[:-1]), engine.state, all_logits=True)
    M, W, n = engine.config.num_memory_tokens, engine.config.sliding_window, len(prompt)
    must_agree = [t for t in range(num_new) if M + n - 1 + t < W + M]  # the query index of generated token t
    assert must_agree, "the case must hold rows the rule covers"
    rows = teacher[n - 1 :]
    torch.testing.assert_close(decoded[must_agree], rows[must_agree], atol=1e-3, rtol=0)
    assert [int(r.argmax()) for r in rows[must_agree]] == [tokens[t] for t in must_agree]
    request = GenerationRequest(tuple(prompt), SamplingParams(max_tokens=num_new, temperature=0, ignore_eos=True))
    assert [e.token_id for e in engine.generate(request)] == tokens  # the server's loop gives the same tokens
    print(f"CPU decode: {tokens_per_s:.1f} tokens/s ({len(must_agree)} of {num_new} rows under the agreement rule)")


def test_to_be_or_not_to_be_continues_in_english(engine):
    text, _ = generate_text(engine, engine.tokenizer.encode("To be, or not to be"), max_tokens=40, temperature=0)
    print(f"To be, or not to be{text}")
    words = re.findall(r"[A-Za-z']+", text)
    assert len(words) >= 15 and text.isascii()
    assert len(FUNCTION_WORDS & {w.lower() for w in words}) >= 4, text


def test_chat_answers_a_line_of_dialogue_with_english(engine):
    messages = [{"role": "user", "content": "Good morrow, my lord. How fares the king?"}]
    prompt = engine.tokenizer.encode_chat(messages)
    params = {**engine.defaults, "seed": 1}  # generation_config.json's sampling, as the server applies it
    text, finish = generate_text(engine, prompt, max_tokens=60, **params)
    print(f"chat: {text!r} ({finish.value})")
    words = re.findall(r"[A-Za-z']+", text)
    assert len(words) >= 3 and text.isascii(), text
    assert "<extra_id" not in text and "Assistant" not in text and "User" not in text
    assert FUNCTION_WORDS & {w.lower() for w in words}, text
