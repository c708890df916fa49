"""loadtest/prompts.py: fitting a prompt to a token length (against an in-memory tokenizer), estimates, JSONL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loadtest.config import LoadTestError
from loadtest.prompts import TOKENS_PER_WORD, fit, load_dataset, synthetic_prompts

LONG_WORDS = {"important", "different", "sometimes", "following", "children", "together", "sentence"}


def tokens_of(content) -> int:
    """A stand-in tokenizer: BOS, then one token per word and two for long words; chat adds 5 template tokens."""
    text = content if isinstance(content, str) else content[0]["content"]
    overhead = 1 if isinstance(content, str) else 6
    return overhead + sum(2 if w in LONG_WORDS else 1 for w in text.split())


def counter(calls: list | None = None):
    async def count(content) -> int:
        if calls is not None:
            calls.append(content)
        return tokens_of(content)

    return count


@pytest.mark.parametrize(
    "endpoint, target",
    [("completions", 2), ("completions", 17), ("completions", 300), ("chat", 7), ("chat", 64)],
    ids=["completions-2", "completions-17", "completions-300", "chat-7", "chat-64"],
)
def test_fit_hits_the_target_exactly(endpoint, target):
    words = ["the", "important", "of", "children", "and"] * 200
    calls: list = []
    text, num_tokens = asyncio.run(fit(counter(calls), words, target, 0.8, endpoint))
    content = text if endpoint == "completions" else [{"role": "user", "content": text}]
    assert num_tokens == target == tokens_of(content)
    assert len(calls) <= 14


def test_fit_falls_short_when_every_word_is_two_tokens():
    async def two_per_word(content) -> int:  # BOS + 2 per word: only odd counts exist
        return 1 + 2 * len(content.split())

    text, num_tokens = asyncio.run(fit(two_per_word, ["big"] * 50, 10, 0.5, "completions"))
    assert (len(text.split()), num_tokens) == (4, 9)


def test_fit_refuses_a_target_below_one_word():
    with pytest.raises(LoadTestError, match="--prompt-tokens 3 is too few"):
        asyncio.run(fit(counter(), ["the"] * 20, 3, 1.0, "chat"))


def test_synthetic_prompts_are_exact_distinct_and_seeded():
    a = asyncio.run(synthetic_prompts(counter(), 20, 33, 16, "completions", seed=7))
    b = asyncio.run(synthetic_prompts(counter(), 20, 33, 16, "completions", seed=7))
    assert a.source == "tokenize" and a == b
    assert all(p.num_tokens == 33 == tokens_of(p.content) and p.max_tokens == 16 for p in a.prompts)
    assert len({p.content.split()[0] + p.content.split()[1] + p.content.split()[2] for p in a.prompts}) > 15


def test_without_tokenize_lengths_are_estimated():
    prompts = asyncio.run(synthetic_prompts(None, 3, 130, 8, "chat", seed=0))
    assert prompts.source == "estimate"
    for p in prompts.prompts:
        assert p.num_tokens is None and len(p.content[0]["content"].split()) == round(130 / TOKENS_PER_WORD)


def test_dataset_lines_in_order_repeated(tmp_path: Path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "one", "max_tokens": 3}\n\n{"prompt": "two"}\n')
    prompts = load_dataset(data, "completions", 5, max_tokens=9)
    assert [(p.content, p.max_tokens) for p in prompts.prompts] == [
        ("one", 3), ("two", 9), ("one", 3), ("two", 9), ("one", 3)
    ]  # fmt: skip
    chat = load_dataset(data, "chat", 1, max_tokens=9).prompts[0]
    assert chat.content == [{"role": "user", "content": "one"}]


def test_dataset_messages_for_chat(tmp_path: Path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}\n')
    assert load_dataset(data, "chat", 1, 4).prompts[0].content[1] == {"role": "user", "content": "hi"}
    with pytest.raises(LoadTestError, match=r"d.jsonl:1: has messages, which need --endpoint chat"):
        load_dataset(data, "completions", 1, 4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no prompts"),
        ("{oops\n", ":1: not JSON"),
        ('{"prompt": "a"}\n[1]\n', ":2: expected a JSON object, got list"),
        ('{"prompt": 3}\n', ':1: expected "prompt" (a string) or "messages"'),
        ('{"prompt": "a", "max_tokens": 0}\n', ":1: max_tokens must be a positive integer, got 0"),
        ('{"prompt": "a", "max_tokens": true}\n', ":1: max_tokens must be a positive integer, got True"),
    ],
    ids=["empty", "not-json", "not-object", "no-prompt", "zero-max-tokens", "bool-max-tokens"],
)
def test_dataset_errors_name_the_line(tmp_path: Path, text, message):
    data = tmp_path / "d.jsonl"
    data.write_text(text)
    with pytest.raises(LoadTestError) as e:
        load_dataset(data, "completions", 2, 4)
    assert message in str(e.value) and str(data) in str(e.value)
