"""The load: prepare prompts, warm up, then each run in turn, closed loop or open loop, sampling the queue.

Closed loop: `concurrency` simulated users, each sending its next request as soon as its last one ends.
Open loop: requests arrive at Poisson times (rate per second, seeded) whether or not earlier ones have ended.
Every run replays the same prompts, so runs differ only in how the load arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TextIO

import httpx

from loadtest.client import request_body, send
from loadtest.config import LoadTestConfig, LoadTestError, RunSpec
from loadtest.progress import Progress
from loadtest.prompts import PromptSet, load_dataset, synthetic_prompts
from loadtest.record import RequestRecord
from loadtest.stats import QueueSample, RunMetrics, summarize
from loadtest.target import ServerInfo, TokenizeUnavailable, count_tokens, probe, scrape_queue

SendOne = Callable[[int], Awaitable[None]]  # sends request i and records it
QUEUE_SAMPLE_S = 0.1
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # the longest wait for one chunk: a request queued behind many long ones needs room


@dataclass
class RunResult:
    spec: RunSpec
    records: list[RequestRecord]  # in the order they finished
    started_at: float  # perf_counter at the run's start
    duration: float  # seconds, first send to last response
    samples: list[QueueSample]
    gauge: str | None  # the server's waiting-requests gauge, when /metrics has one
    metrics: RunMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = summarize(self.records, self.duration)


@dataclass
class Benchmark:
    cfg: LoadTestConfig
    server: ServerInfo
    prompts: PromptSet
    runs: list[RunResult]
    date: str  # ISO 8601, UTC, when it started


def make_client(cfg: LoadTestConfig, max_connections: int | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    return httpx.AsyncClient(
        base_url=cfg.url,
        headers=headers,
        timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        # a pool smaller than the load would queue requests inside the client, where the server cannot be blamed
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


async def run_benchmark(cfg: LoadTestConfig, stream: TextIO | None = None) -> Benchmark:
    stream = stream or sys.stderr
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    async with make_client(cfg, 8) as control:  # probes, /tokenize and /metrics, apart from the measured load
        server = await probe(control, cfg.model)
        prompts = await prepare_prompts(control, cfg, server, stream)
        bodies = [request_body(cfg, p) for p in prompts.prompts]
        caps = [spec.concurrency for spec in cfg.runs]
        max_connections = None if None in caps else max(caps)
        async with make_client(cfg, max_connections) as load:
            await warm_up(load, cfg, bodies)
            runs = [await run_one(load, control, cfg.path, spec, bodies, cfg.seed, stream) for spec in cfg.runs]
    return Benchmark(cfg, server, prompts, runs, date)


async def prepare_prompts(
    control: httpx.AsyncClient, cfg: LoadTestConfig, server: ServerInfo, stream: TextIO
) -> PromptSet:
    if cfg.dataset is not None:
        return load_dataset(cfg.dataset, cfg.endpoint, cfg.num_requests, cfg.max_tokens)
    assert cfg.prompt_tokens is not None
    if server.max_model_len is not None and cfg.prompt_tokens + cfg.max_tokens > server.max_model_len:
        raise LoadTestError(
            f"--prompt-tokens {cfg.prompt_tokens} + --max-tokens {cfg.max_tokens} exceeds the server's "
            f"max_model_len {server.max_model_len}"
        )

    async def count(content: str | list[dict]) -> int:
        return await count_tokens(control, cfg.model, content)

    args = (cfg.num_requests, cfg.prompt_tokens, cfg.max_tokens, cfg.endpoint, cfg.seed)
    try:
        return await synthetic_prompts(count, *args)
    except TokenizeUnavailable as e:
        print(f"loadtest: {e}: prompt lengths are estimated from words; usage gives the real counts", file=stream)
        return await synthetic_prompts(None, *args)


async def warm_up(load: httpx.AsyncClient, cfg: LoadTestConfig, bodies: list[dict]) -> None:
    """A few unmeasured requests (first-request compiles and caches); a failure here stops before any run."""
    for i in range(cfg.warmup):
        record = await send(load, cfg.path, bodies[i % len(bodies)], i)
        if not record.is_completed and record.status != 429:
            raise LoadTestError(f"the warm-up request failed: {record.status}: {record.error}")


async def run_one(
    load: httpx.AsyncClient,
    control: httpx.AsyncClient,
    path: str,
    spec: RunSpec,
    bodies: list[dict],
    seed: int,
    stream: TextIO,
) -> RunResult:
    progress = Progress(spec.label, len(bodies), stream)
    records: list[RequestRecord] = []

    async def one(i: int) -> None:
        progress.sent()
        record = await send(load, path, bodies[i], i)
        records.append(record)
        progress.finished(record)

    stop = asyncio.Event()
    started_at = time.perf_counter()
    sampler = asyncio.create_task(sample_queue(control, progress, started_at, stop))
    try:
        if spec.rate is None:
            assert spec.concurrency is not None
            await closed_loop(one, len(bodies), spec.concurrency)
        else:
            await open_loop(one, len(bodies), spec.rate, spec.concurrency, random.Random(seed))
        duration = time.perf_counter() - started_at
    finally:
        stop.set()
        samples, gauge = await sampler
        progress.close()
    return RunResult(spec, records, started_at, duration, samples, gauge)


async def closed_loop(one: SendOne, num_requests: int, concurrency: int) -> None:
    indices = iter(range(num_requests))  # shared: each user takes the next index as soon as its last request ended

    async def user() -> None:
        for i in indices:
            await one(i)

    await asyncio.gather(*(user() for _ in range(min(concurrency, num_requests))))


def arrival_times(num_requests: int, rate: float, rng: random.Random) -> list[float]:
    """Seconds after the start: the first at 0, then exponential gaps of mean 1/rate (a Poisson process)."""
    times, t = [], 0.0
    for _ in range(num_requests):
        times.append(t)
        t += rng.expovariate(rate)
    return times


async def open_loop(one: SendOne, num_requests: int, rate: float, cap: int | None, rng: random.Random) -> None:
    limit = asyncio.Semaphore(cap) if cap else None

    async def capped(i: int) -> None:
        if limit is None:
            return await one(i)
        async with limit:  # past the cap an arrival waits here, unsent and untimed
            return await one(i)

    start, tasks = time.perf_counter(), []
    for i, at in enumerate(arrival_times(num_requests, rate, rng)):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(capped(i)))
    await asyncio.gather(*tasks)


async def sample_queue(
    control: httpx.AsyncClient, progress: Progress, started_at: float, stop: asyncio.Event
) -> tuple[list[QueueSample], str | None]:
    """Every QUEUE_SAMPLE_S: requests in flight here and the server's waiting/running gauges (scraping stops for
    good if the first scrape finds no gauge). Also ticks the progress bar."""
    samples: list[QueueSample] = []
    gauge, is_scraping = None, True
    while not stop.is_set():
        waiting = running = None
        if is_scraping:
            name, waiting, running = await scrape_queue(control)
            gauge = gauge or name
            is_scraping = gauge is not None
        samples.append(QueueSample(time.perf_counter() - started_at, progress.in_flight, waiting, running))
        progress.refresh()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), QUEUE_SAMPLE_S)
    return samples, gauge
