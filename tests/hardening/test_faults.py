"""Fault injection into the real model: an exception mid-stream, NaN or Inf logits, out of memory during prefill.
Each ends its request with one clear error (in-band once a stream has begun, then [DONE]), never with garbage text
or internals, and the same worker then serves the next request exactly."""

from __future__ import annotations

import math

import pytest
import torch

from tests.hardening.conftest import CHAT, COMPLETIONS, USER, error_of, sse_payloads
from tests.server.conftest import wait_until

LONG = {"prompt": "t5", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
INTERNAL = {"message": "The server failed while generating.", "type": "server_error", "param": None,
            "code": "internal_error"}  # fmt: skip


def fail_on_call(k: int, exc: BaseException):
    """A wrapper for model_hook: the k-th call (1-based) raises `exc`; the others run the real method."""
    calls = [0]

    def wrapper(real, *args, **kw):
        calls[0] += 1
        if calls[0] == k:
            raise exc
        return real(*args, **kw)

    return wrapper


def poison_on_call(k: int, poison):
    """The k-th call returns the real logits passed through `poison`."""
    calls = [0]

    def wrapper(real, *args, **kw):
        calls[0] += 1
        logits = real(*args, **kw)
        return poison(logits.clone()) if calls[0] == k else logits

    return wrapper


def assert_serves_the_next_request(client, server, oracle) -> None:
    wait_until(lambda: server.metric("hymba_requests_running") == 0)
    out = client.post(COMPLETIONS, json={"prompt": "t9", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert out.json()["choices"][0]["text"] == oracle.complete("t9", max_tokens=4, temperature=0, ignore_eos=True).text


def stream(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return sse_payloads(r.read().decode())


EXCEPTIONS = [
    RuntimeError("CUDA error: an illegal memory access was encountered at /src/kernels/attention.py:88"),
    ValueError("shapes (3, 7) and (5,) are not aligned"),  # not a refusal: it came after the first token
    KeyError("layers.3.attn"),
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    AssertionError("kv ring slot out of range"),
]


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_an_exception_mid_stream_is_one_error_event_then_done(client, server, oracle, model_hook, exc):
    model_hook(server.engine, "decode", fail_on_call(3, exc))  # tokens 1-3 come out, decoding the 4th fails
    payloads = stream(client, COMPLETIONS, LONG)
    expected = oracle.complete("t5", **{k: v for k, v in LONG.items() if k != "prompt"})
    assert [p["choices"][0]["text"] for p in payloads[:-2]] == expected.texts[:3]
    assert payloads[-2:] == [{"error": INTERNAL}, "[DONE]"]
    assert_serves_the_next_request(client, server, oracle)


def test_an_exception_mid_chat_stream_is_one_error_event_then_done(client, server, oracle, model_hook):
    model_hook(server.engine, "decode", fail_on_call(2, RuntimeError("boom")))
    payloads = stream(client, CHAT, {"messages": USER, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    deltas = [p["choices"][0]["delta"] for p in payloads[:-2]]
    expected = oracle.chat(USER, max_tokens=8, temperature=0, ignore_eos=True)
    assert deltas[0] == {"role": "assistant", "content": ""}  # chunks with no text are not sent: compare the text
    assert "".join(d["content"] for d in deltas[1:]) == "".join(expected.texts[:2])
    assert payloads[-2:] == [{"error": INTERNAL}, "[DONE]"]
    assert_serves_the_next_request(client, server, oracle)


def test_a_failure_of_one_choice_fails_the_request_and_cancels_its_siblings(client, server, oracle, model_hook):
    model_hook(server.engine, "decode", fail_on_call(2, RuntimeError("boom")))
    before = server.metric("hymba_cancellations_total", reason="sibling_failed")
    r = client.post(COMPLETIONS, json={**LONG, "n": 3})
    assert error_of(r, 500) == INTERNAL
    assert server.metric("hymba_cancellations_total", reason="sibling_failed") - before == 2
    assert_serves_the_next_request(client, server, oracle)


POISONS = {
    "all-nan": lambda x: x.fill_(math.nan),
    "one-nan": lambda x: x.index_fill_(-1, torch.tensor([7]), math.nan),
    "one-plus-inf": lambda x: x.index_fill_(-1, torch.tensor([7]), math.inf),
    "all-minus-inf": lambda x: x.fill_(-math.inf),
}


@pytest.mark.parametrize("poison", POISONS.values(), ids=POISONS.keys())
@pytest.mark.parametrize("method, k, num_good", [("prefill", 1, 0), ("decode", 2, 2)], ids=["prefill", "decode"])
def test_non_finite_logits_end_the_request_with_an_error(client, server, oracle, model_hook, poison, method, k,
                                                         num_good):  # fmt: skip
    """Never a token sampled from a poisoned row: the text is exactly the good tokens before it, then the error."""
    model_hook(server.engine, method, poison_on_call(k, poison))
    payloads = stream(client, COMPLETIONS, LONG)
    expected = oracle.complete("t5", **{key: v for key, v in LONG.items() if key != "prompt"})
    assert [p["choices"][0]["text"] for p in payloads[:-2]] == expected.texts[:num_good]
    assert payloads[-2:] == [{"error": INTERNAL}, "[DONE]"]
    model_hook(server.engine, method, poison_on_call(k, poison))  # the same fault, not streamed: a plain 500
    assert error_of(client.post(COMPLETIONS, json=LONG), 500) == INTERNAL
    assert_serves_the_next_request(client, server, oracle)


def test_out_of_memory_in_prefill_is_500_releases_memory_and_the_worker_recovers(
    client, server, oracle, model_hook, monkeypatch
):
    releases = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: releases.append(1))
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")
    model_hook(server.engine, "prefill", fail_on_call(1, oom))
    state, state_nbytes = server.engine.state, server.engine.state.nbytes
    r = client.post(COMPLETIONS, json=LONG)
    assert error_of(r, 500) == INTERNAL and "GiB" not in r.text
    assert releases == [1]  # the engine emptied the CUDA cache before reporting
    assert server.engine.state is state and state.nbytes == state_nbytes  # one preallocated state, reset per request
    payloads = stream(client, COMPLETIONS, LONG)  # the hook fired once: this request is whole
    expected = oracle.complete("t5", **{k: v for k, v in LONG.items() if k != "prompt"})
    assert "".join(p["choices"][0]["text"] for p in payloads[:-1]) == expected.text
    assert_serves_the_next_request(client, server, oracle)


def test_out_of_memory_in_prefill_while_streaming_is_one_error_event(client, server, oracle, model_hook):
    model_hook(server.engine, "prefill", fail_on_call(1, torch.cuda.OutOfMemoryError("CUDA out of memory")))
    assert stream(client, COMPLETIONS, LONG) == [{"error": INTERNAL}, "[DONE]"]
    assert_serves_the_next_request(client, server, oracle)


def test_no_fault_leaks_into_metrics_as_anything_but_server_errors(client, server):
    """Every fault above was reported as a server_error, and nothing was left running."""
    assert server.metric("hymba_errors_total", type="server_error") > 0
    assert server.metric("hymba_errors_total", type="invalid_request_error") == 0
    assert server.metric("hymba_requests_running") == 0 and server.metric("hymba_requests_waiting") == 0
