"""Disconnect storm: 100 clients leave at random points (before their first chunk, while queued, mid-stream, or while
waiting for a whole response). Each generation is cancelled within one token, every cancellation is counted, and the
server is healthy and exact afterwards.

"Within one token" is read off the real model's decode calls: each is logged with the request it serves, and after
the server counted a request's cancellation, that request may start at most one more decode (the one it may have
been about to begin when the flag was set).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import httpx

from server.queue import CancelReason
from tests.hardening.conftest import CHAT, COMPLETIONS, USER
from tests.server.conftest import wait_until

NUM_CLIENTS = 100
NUM_WHOLE = 20  # of which wait for a whole (non-streamed) response and give up after a random delay
MAX_CHUNKS = 6  # a streaming client reads 0..MAX_CHUNKS chunks, then closes; generations are far longer
LONG = {"max_tokens": 100, "ignore_eos": True, "temperature": 0}


class RequestLog:
    """Which request each decode call served (one worker: one request at a time), and when each was cancelled."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.decodes: list[tuple[float, str]] = []
        self.cancelled_at: dict[str, float] = {}
        self.ended_at: dict[str, float] = {}  # when the engine's generator returned
        self.admitted: list[str] = []

    def num_decodes_after_cancel(self, request_id: str) -> int:
        at = self.cancelled_at[request_id]
        return sum(1 for t, rid in self.decodes if rid == request_id and t > at)


def install(live, monkeypatch, model_hook) -> RequestLog:
    log = RequestLog()
    engine, queue = live.engine, live.ctx.queue
    generate, cancel, submit = engine.generate, queue.cancel, queue.submit

    def logged_generate(request, should_stop=lambda: False):
        log.current = request.request_id
        try:
            yield from generate(request, should_stop)
        finally:
            log.ended_at[request.request_id] = time.monotonic()

    def logged_decode(real, *args):
        log.decodes.append((time.monotonic(), log.current))
        return real(*args)

    def logged_cancel(job, reason):
        if reason == CancelReason.CLIENT_GONE and not job.is_done and not job.cancelled.is_set():
            log.cancelled_at[job.request.request_id] = time.monotonic()  # before the flag: a later decode is after
        cancel(job, reason)

    def logged_submit(requests, timeout):
        group = submit(requests, timeout)
        log.admitted += [job.request.request_id for job in group.jobs]
        return group

    monkeypatch.setattr(engine, "generate", logged_generate)
    monkeypatch.setattr(queue, "submit", logged_submit)
    monkeypatch.setattr(queue, "cancel", logged_cancel)
    model_hook(engine, "decode", logged_decode)
    return log


async def storm(url: str, rng: random.Random) -> list[str]:
    """Every client leaves early; returns how each left."""

    async def streaming(c: httpx.AsyncClient, i: int) -> str:
        num_chunks = rng.randint(0, MAX_CHUNKS)
        path, body = (CHAT, {"messages": USER}) if i % 3 == 0 else (COMPLETIONS, {"prompt": "t5"})
        async with c.stream("POST", path, json={**body, **LONG, "stream": True}) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if seen >= num_chunks:
                    break
                seen += line.startswith("data: ")
            assert seen == num_chunks  # every client leaves before its generation ends
        return f"stream-after-{num_chunks}"

    async def whole(c: httpx.AsyncClient) -> str:
        request = asyncio.create_task(c.post(COMPLETIONS, json={"prompt": "t9", **LONG}))
        await asyncio.sleep(rng.uniform(0.05, 0.5))
        assert not request.done()
        request.cancel()  # httpx closes the connection under a cancelled request
        with contextlib.suppress(asyncio.CancelledError):
            await request
        return "whole"

    limits = httpx.Limits(max_connections=NUM_CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        jobs = [whole(c) if i < NUM_WHOLE else streaming(c, i) for i in range(NUM_CLIENTS)]
        rng.shuffle(jobs)
        return await asyncio.gather(*jobs)


def test_a_storm_of_100_disconnects(live, monkeypatch, model_hook, oracle):
    server = live(max_queue=NUM_CLIENTS)
    log = install(server, monkeypatch, model_hook)
    ways = asyncio.run(storm(server.url, random.Random(9)))
    assert len(ways) == NUM_CLIENTS

    wait_until(lambda: server.metric("hymba_requests_running") == 0 and server.metric("hymba_requests_waiting") == 0)
    num_started = server.metric("hymba_queue_wait_seconds_count")  # generations a worker began
    # A client that gives up before its request arrives is no request (on a busy machine some whole-response ones
    # do): count what the server admitted. Every streaming client was admitted, having read its 200.
    assert len(log.admitted) >= NUM_CLIENTS - NUM_WHOLE and sorted(log.cancelled_at) == sorted(log.admitted)
    assert server.metric("hymba_cancellations_total", reason="client_disconnected") == len(log.admitted)
    assert server.metric("hymba_requests_finished_total", finish_reason="cancelled") == num_started
    assert server.metric("hymba_requests_finished_total", finish_reason="length") == 0
    late = {rid: n for rid in log.cancelled_at if (n := log.num_decodes_after_cancel(rid)) > 1}
    assert not late, f"decodes after the cancel was counted: {late}"
    num_after = [log.num_decodes_after_cancel(rid) for rid in log.cancelled_at]
    lags = sorted(log.ended_at[rid] - at for rid, at in log.cancelled_at.items() if rid in log.ended_at)
    print(
        f"storm: {len(log.admitted)} admitted, all cancelled ({int(num_started)} while generating, "
        f"{len(log.admitted) - int(num_started)} while queued); decodes after the cancel: "
        f"0 x{num_after.count(0)}, 1 x{num_after.count(1)}; {len(log.decodes)} decodes in all; cancel to generator "
        f"end p50 {1000 * lags[len(lags) // 2]:.1f} ms, max {1000 * lags[-1]:.1f} ms"
    )

    assert httpx.get(server.url + "/health").status_code == 200
    out = httpx.post(server.url + COMPLETIONS, json={"prompt": "t5", "max_tokens": 4, "temperature": 0}, timeout=30)
    assert out.json()["choices"][0]["text"] == oracle.complete("t5", max_tokens=4, temperature=0).text
