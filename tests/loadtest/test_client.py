"""loadtest/client.py without a network: request bodies, SSE lines and chunk text for both endpoints."""

from __future__ import annotations

import pytest

from loadtest.client import DONE, chunk_text, parse_sse_line, request_body
from loadtest.config import parse_args
from loadtest.prompts import Prompt

BASE = ["--url", "http://127.0.0.1:8000", "--model", "m", "--out", "o", "--prompt-tokens", "8"]


def test_completions_body_streams_with_usage():
    body = request_body(parse_args(BASE), Prompt("hello", 7, 3))
    assert body == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "prompt": "hello",
        "max_tokens": 7,
        "ignore_eos": True,
    }


def test_chat_body_without_ignore_eos():
    messages = [{"role": "user", "content": "hi"}]
    body = request_body(parse_args([*BASE, "--endpoint", "chat", "--no-ignore-eos"]), Prompt(messages, 5, None))
    assert body["messages"] == messages and body["max_completion_tokens"] == 5 and "ignore_eos" not in body


@pytest.mark.parametrize(
    "line, expected",
    [
        ("data: [DONE]", DONE),
        ('data: {"a": 1}', {"a": 1}),
        ('data:{"a": 1}', {"a": 1}),
        ("", None),
        (": keep-alive", None),
        ("event: message", None),
    ],
    ids=["done", "event", "no-space", "blank", "comment", "other-field"],
)
def test_parse_sse_line(line, expected):
    assert parse_sse_line(line) == expected


@pytest.mark.parametrize("line", ["data: [1, 2]", "data: not json"], ids=["not-object", "not-json"])
def test_parse_sse_line_rejects_bad_data(line):
    with pytest.raises(ValueError):
        parse_sse_line(line)


@pytest.mark.parametrize(
    "event, expected",
    [
        ({"choices": [{"index": 0, "text": " t6", "finish_reason": None}]}, (" t6", None)),
        ({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}, ("", "length")),
        ({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, ("", None)),
        ({"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}, ("hi", None)),
        ({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, ("", "stop")),
        ({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 8}}, ("", None)),
    ],
    ids=["completion", "completion-finish", "chat-role", "chat-content", "chat-finish", "usage-only"],
)
def test_chunk_text(event, expected):
    assert chunk_text(event) == expected
