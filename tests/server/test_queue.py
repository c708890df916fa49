"""The queue under real traffic: overflow (429 + Retry-After), one request per worker at a time, clients that leave
while queued or while generating (freed within one token, counted), and several workers."""

from __future__ import annotations

import asyncio
import time

import httpx

from engine.api import FinishReason
from tests.server.fake_engine import FakeEngine

TOKEN_DELAY = 0.05


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_overflow_gives_429_and_every_admitted_request_completes(make_server):
    engine = FakeEngine(token_delay=0.1)
    live = make_server([engine], max_queue=2)

    async def run():
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
            body = {"prompt": "t5", "max_tokens": 5}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(8)))

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 3 + [429] * 5  # one running + two waiting
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
        else:
            choice = r.json()["choices"][0]
            assert choice["text"] == "t6 t7 t8 t9 t10" and choice["finish_reason"] == "length"
    assert engine.max_active == 1
    assert live.metric("hymba_requests_total", endpoint="/v1/completions", status="429") == 5
    assert live.metric("hymba_queue_wait_seconds_count") == 3


def test_n_choices_are_admitted_together_or_not_at_all(make_server):
    live = make_server(max_queue=1)
    with httpx.Client(base_url=live.url) as c:
        assert c.post("/v1/completions", json={"prompt": "t5", "n": 3, "max_tokens": 1}).status_code == 429
        assert c.post("/v1/completions", json={"prompt": "t5", "n": 2, "max_tokens": 1}).status_code == 200


def test_disconnect_mid_stream_frees_the_worker_within_one_token(make_server):
    engine = FakeEngine(token_delay=TOKEN_DELAY)
    live = make_server([engine])
    with httpx.Client(base_url=live.url, timeout=10) as c:
        body = {"prompt": "t5", "max_tokens": 60, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        closed_at = time.monotonic()
        wait_until(lambda: engine.runs[-1].stopped_at is not None)
        run = engine.runs[-1]
        assert run.finish_reason == FinishReason.CANCELLED and run.num_tokens < 10
        assert run.stopped_at - closed_at < 4 * TOKEN_DELAY
        wait_until(lambda: live.metric("hymba_cancellations_total", reason="client_disconnected") == 1)
        started = time.monotonic()
        assert c.post("/v1/completions", json={"prompt": "t5", "max_tokens": 1}).status_code == 200
        assert time.monotonic() - started < 4 * TOKEN_DELAY  # the worker was free: no queueing behind the old one
    assert live.metric("hymba_requests_running") == 0


def test_disconnect_of_a_non_streaming_request_cancels_it(make_server):
    engine = FakeEngine(token_delay=TOKEN_DELAY)
    live = make_server([engine])
    with httpx.Client(base_url=live.url, timeout=0.3) as c:
        try:
            c.post("/v1/completions", json={"prompt": "t5", "max_tokens": 60})
            raise AssertionError("the request should have timed out on the client side")
        except httpx.ReadTimeout:
            pass
    closed_at = time.monotonic()
    wait_until(lambda: engine.runs[-1].stopped_at is not None)
    assert engine.runs[-1].finish_reason == FinishReason.CANCELLED
    assert engine.runs[-1].stopped_at - closed_at < 4 * TOKEN_DELAY
    assert live.metric("hymba_cancellations_total", reason="client_disconnected") == 1


def test_a_request_whose_client_left_while_queued_never_runs(make_server):
    engine = FakeEngine(token_delay=TOKEN_DELAY)
    live = make_server([engine])
    with httpx.Client(base_url=live.url, timeout=10) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "t5", "max_tokens": 40, "stream": True}) as busy:
            busy_lines = busy.iter_lines()  # held: a dropped iterator closes the connection
            next(busy_lines)
            with c.stream("POST", "/v1/completions", json={"prompt": "t9", "max_tokens": 5, "stream": True}) as r:
                assert r.status_code == 200
                wait_until(lambda: live.metric("hymba_requests_waiting") == 1)
            wait_until(lambda: live.metric("hymba_requests_waiting") == 0)
            assert live.metric("hymba_cancellations_total", reason="client_disconnected") == 1
        wait_until(lambda: live.metric("hymba_requests_running") == 0)
    assert [run.request.prompt_ids for run in engine.runs] == [(1, 5)]


def test_one_worker_per_engine(make_server):
    engines = [FakeEngine(token_delay=TOKEN_DELAY, device=f"cuda:{i}") for i in range(2)]
    live = make_server(engines, max_queue=0)

    async def run():
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
            body = {"prompt": "t5", "max_tokens": 6}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(2)))

    started = time.monotonic()
    assert [r.status_code for r in asyncio.run(run())] == [200, 200]
    assert time.monotonic() - started < 10 * TOKEN_DELAY  # in parallel: 6 tokens each, not 12 in a row
    assert [len(e.runs) for e in engines] == [1, 1] and all(e.max_active == 1 for e in engines)
    assert live.metric("hymba_decode_state_bytes", device="cuda:1") == 123_456
