"""Fixtures for the hardening tests: the server suite's live servers, oracle and decode hook (re-exported here), plus
hooks that make the real model fail or return poisoned logits, and the small readers these tests share.

Servers here run the session's shared engine (`engine`) unless a test needs its own checkpoint: one engine serves
one server at a time, and every server a test starts stops when the test ends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import httpx
import pytest

from engine.generate import Engine
from tests.server import conftest as server_fixtures
from tests.server import test_main
from tests.server.conftest import LiveServer

# The server suite's fixtures, found by pytest under these names here too.
one_torch_thread = server_fixtures.one_torch_thread
engine = server_fixtures.engine
oracle = server_fixtures.oracle
make_server = server_fixtures.make_server
decode_hook = server_fixtures.decode_hook
server = server_fixtures.server
client = server_fixtures.client
processes = test_main.processes

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "t5"}]


@pytest.fixture
def live(make_server, engine: Engine) -> Callable[..., LiveServer]:
    """A server with chosen settings on the shared engine."""

    def start(**settings) -> LiveServer:
        return make_server([engine], **settings)

    return start


@pytest.fixture
def model_hook(monkeypatch) -> Callable[[Engine, str, Callable], None]:
    """Wrap engine.model.<method> (prefill or decode) with `wrapper(real, *args)`; undone when the test ends."""

    def hook(engine: Engine, method: str, wrapper: Callable) -> None:
        real = getattr(engine.model, method)
        monkeypatch.setattr(engine.model, method, lambda *args, **kw: wrapper(real, *args, **kw))

    return hook


def error_of(r: httpx.Response, status: int) -> dict:
    """The OpenAI error body of a response, checked: exactly {message, type, param, code}, nothing else."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"] and body["error"]["type"]
    assert "Traceback" not in r.text and ".py" not in r.text, r.text
    return body["error"]


def sse_payloads(raw: str) -> list[dict | str]:
    """A complete SSE body as its payloads: JSON objects, then the closing "[DONE]"."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-300:]
    blocks = raw.split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks), blocks
    payloads = [b.removeprefix("data: ") for b in blocks]
    return [json.loads(p) for p in payloads[:-1]] + [payloads[-1]]


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    with open(f"/proc/{pid or os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
