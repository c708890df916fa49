"""Overload: ten times the queue's capacity of concurrent clients, in rounds. Everything past capacity gets 429 with
Retry-After at once; everything admitted completes with its full output; nothing is left behind between rounds."""

from __future__ import annotations

import asyncio
import gc
import json

import httpx

from server.queue import Job
from tests.hardening.conftest import COMPLETIONS, rss_bytes
from tests.server.conftest import wait_until

MAX_QUEUE = 4
CAPACITY = MAX_QUEUE + 1  # the waiting requests plus the one the worker runs
NUM_CLIENTS = 10 * CAPACITY
NUM_ROUNDS = 6  # the first warms up; RSS is compared between the end of it and the end of the last
RSS_TOLERANCE = 8 * 2**20  # allocator noise over a few hundred requests; a leak of a job per request is far larger
GREEDY = {"prompt": "t5", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


async def flood(url: str, hook) -> list[tuple[int, dict, str]]:
    """NUM_CLIENTS at once, every other one streaming: (status, headers, text or joined stream text) each. The
    worker is held after its first token until every client past capacity has been answered."""

    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, dict, str]:
        if i % 2:
            r = await c.post(COMPLETIONS, json=GREEDY)
            text = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
            return r.status_code, dict(r.headers), text
        async with c.stream("POST", COMPLETIONS, json={**GREEDY, "stream": True}) as r:
            raw = (await r.aread()).decode()
        if r.status_code != 200:
            return r.status_code, dict(r.headers), raw
        assert raw.endswith("data: [DONE]\n\n"), raw
        chunks = [json.loads(line.removeprefix("data: ")) for line in raw.split("\n\n") if line.startswith("data: {")]
        return 200, dict(r.headers), "".join(chunk["choices"][0]["text"] for chunk in chunks)

    limits = httpx.Limits(max_connections=NUM_CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        tasks = [asyncio.create_task(one(c, i)) for i in range(NUM_CLIENTS)]
        deadline = asyncio.get_running_loop().time() + 30
        while sum(t.done() for t in tasks) < NUM_CLIENTS - CAPACITY:
            assert asyncio.get_running_loop().time() < deadline, "the refusals did not come"
            await asyncio.sleep(0.01)
        hook.gate.set()
        return await asyncio.gather(*tasks)


def test_ten_times_capacity_429s_the_rest_completes_the_admitted_and_leaks_nothing(live, decode_hook, oracle):
    server = live(max_queue=MAX_QUEUE)
    hook = decode_hook(server.engine)
    expected = oracle.complete(GREEDY["prompt"], **{k: v for k, v in GREEDY.items() if k != "prompt"}).text
    rss = []
    for round_idx in range(NUM_ROUNDS):
        hook.gate.clear()
        results = asyncio.run(flood(server.url, hook))
        refused = [(h, text) for status, h, text in results if status == 429]
        admitted = [text for status, _, text in results if status == 200]
        assert len(refused) == NUM_CLIENTS - CAPACITY and len(admitted) == CAPACITY, [s for s, _, _ in results]
        assert all(h["retry-after"] == "1" and '"code":"queue_full"' in text for h, text in refused)
        assert admitted == [expected] * CAPACITY  # full output: greedy, so every admitted one is the oracle's
        wait_until(lambda: server.metric("hymba_requests_running") == 0)
        gc.collect()
        queue = server.ctx.queue  # a count, not a list, which would keep them alive; other servers' jobs not counted
        num_jobs = sum(type(o) is Job and o.group._queue is queue for o in gc.get_objects())
        assert num_jobs <= 1, f"round {round_idx}: {num_jobs} jobs alive"  # the worker's loop holds its last one
        rss.append(rss_bytes())
    num_refused = NUM_ROUNDS * (NUM_CLIENTS - CAPACITY)
    assert server.metric("hymba_requests_total", endpoint=COMPLETIONS, status="429") == num_refused
    assert server.metric("hymba_requests_total", endpoint=COMPLETIONS, status="200") == NUM_ROUNDS * CAPACITY
    assert server.metric("hymba_errors_total", type="rate_limit_error") == num_refused
    assert rss[-1] - rss[0] < RSS_TOLERANCE, f"RSS after each round (MiB): {[round(b / 2**20, 1) for b in rss]}"
    print(f"overload: {num_refused} x 429 over {NUM_ROUNDS} rounds; RSS MiB {[round(b / 2**20, 1) for b in rss]}")
