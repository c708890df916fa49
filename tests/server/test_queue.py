"""The queue under real traffic: overflow (429 + Retry-After), one request per worker at a time, clients that leave
while queued or while generating (freed within one token, counted), and several workers.

The pace comes from a DecodeHook on the real model: a closed gate holds a worker between its first and second token
for as long as a test needs, a delay makes every token slow."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx

from tests.server.conftest import load_engine, wait_until

LONG = {"prompt": "t5", "max_tokens": 100, "ignore_eos": True}  # 5 s at the 50 ms per token these tests set
GREEDY = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}


async def wait_until_async(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def test_overflow_gives_429_and_every_admitted_request_completes(make_server, decode_hook, oracle):
    live = make_server(max_queue=2)
    hook = decode_hook(live.engine)
    hook.gate.clear()  # the first request holds the worker until every other one has been admitted or refused

    async def run():
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
            tasks = [asyncio.create_task(c.post("/v1/completions", json={"prompt": "t5", **GREEDY})) for _ in range(8)]
            await wait_until_async(lambda: sum(t.done() for t in tasks) == 5)
            hook.gate.set()
            return await asyncio.gather(*tasks)

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 3 + [429] * 5  # one running + two waiting
    expected = oracle.complete("t5", **GREEDY)
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
        else:  # one at a time: two generations sharing the engine's decode state would not match
            choice = r.json()["choices"][0]
            assert (choice["text"], choice["finish_reason"]) == (expected.text, "length")
    assert live.metric("hymba_requests_total", endpoint="/v1/completions", status="429") == 5
    assert live.metric("hymba_queue_wait_seconds_count") == 3


def test_n_choices_are_admitted_together_or_not_at_all(make_server):
    live = make_server(max_queue=1)
    with httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.post("/v1/completions", json={"prompt": "t5", "n": 3, "max_tokens": 1}).status_code == 429
        r = c.post("/v1/completions", json={"prompt": "t5", "n": 2, "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_disconnect_mid_stream_frees_the_worker_within_one_token(make_server, decode_hook, oracle):
    live = make_server()
    hook = decode_hook(live.engine)
    hook.delay = 0.05
    with httpx.Client(base_url=live.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: ")
        assert_stopped_within_one_token(live, hook)
        hook.delay = 0
        expected = oracle.complete("t5", **GREEDY)
        assert c.post("/v1/completions", json={"prompt": "t5", **GREEDY}).json()["choices"][0]["text"] == expected.text


def test_disconnect_of_a_non_streaming_request_cancels_it(make_server, decode_hook):
    live = make_server()
    hook = decode_hook(live.engine)
    hook.delay = 0.05

    async def leave_mid_generation() -> None:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
            request = asyncio.create_task(c.post("/v1/completions", json=LONG))
            await wait_until_async(lambda: len(hook.started_at) >= 2)
            request.cancel()  # httpx closes the connection under a cancelled request
            with contextlib.suppress(asyncio.CancelledError):
                await request

    asyncio.run(leave_mid_generation())
    assert_stopped_within_one_token(live, hook)


def assert_stopped_within_one_token(live, hook) -> None:
    """The server saw the client leave (counted), and its worker decoded at most one more token after that."""
    wait_until(lambda: live.metric("hymba_cancellations_total", reason="client_disconnected") == 1)
    cancelled_at = time.monotonic()
    wait_until(lambda: live.metric("hymba_requests_finished_total", finish_reason="cancelled") == 1)
    assert hook.num_started_after(cancelled_at) <= 1
    assert live.metric("hymba_generated_tokens_total") < LONG["max_tokens"]
    assert live.metric("hymba_requests_running") == 0


def test_a_request_whose_client_left_while_queued_never_runs(make_server, decode_hook, oracle):
    live = make_server()
    hook = decode_hook(live.engine)
    hook.gate.clear()  # the busy request holds the worker after its first token
    with httpx.Client(base_url=live.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as busy:
            busy_lines = busy.iter_lines()  # held: a dropped iterator closes the connection
            next(busy_lines)
            with c.stream("POST", "/v1/completions", json={"prompt": "t9", "max_tokens": 5, "stream": True}) as r:
                assert r.status_code == 200
                wait_until(lambda: live.metric("hymba_requests_waiting") == 1)
            wait_until(lambda: live.metric("hymba_requests_waiting") == 0)
            assert live.metric("hymba_cancellations_total", reason="client_disconnected") == 1
            hook.gate.set()
        wait_until(lambda: live.metric("hymba_requests_running") == 0)
    assert live.metric("hymba_queue_wait_seconds_count") == 1  # only the busy request reached the worker
    assert live.metric("hymba_prompt_tokens_total") == len(oracle.tokenizer.encode("t5"))


def test_one_worker_per_engine(make_server, decode_hook, oracle):
    engines = [load_engine(), load_engine()]
    live = make_server(engines, max_queue=0)
    hooks = [decode_hook(e) for e in engines]
    for hook in hooks:
        hook.gate.clear()

    async def run():
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
            body = {"prompt": "t5", **GREEDY}
            tasks = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(2)]
            await wait_until_async(lambda: all(h.started_at for h in hooks))  # both generating at once
            for hook in hooks:
                hook.gate.set()
            return await asyncio.gather(*tasks)

    responses = asyncio.run(run())
    expected = oracle.complete("t5", **GREEDY).text
    assert [(r.status_code, r.json()["choices"][0]["text"]) for r in responses] == [(200, expected)] * 2
    assert [len(h.started_at) for h in hooks] == [GREEDY["max_tokens"] - 1] * 2  # one request each
    assert live.metric("hymba_decode_state_bytes", device="cpu") == engines[0].state_nbytes
