"""loadtest/runner.py scheduling, with a stand-in for the request: who is in flight when, and Poisson arrivals."""

from __future__ import annotations

import asyncio
import itertools
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.config import parse_args
from loadtest.runner import arrival_times, closed_loop, make_client, open_loop


class Load:
    """Records which requests ran and the most ever in flight; each takes `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.done, self.in_flight, self.max_in_flight = seconds, [], 0, 0
        self.started: dict[int, float] = {}

    async def one(self, i: int) -> None:
        self.started[i] = time.perf_counter()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.seconds)
        self.in_flight -= 1
        self.done.append(i)


@pytest.mark.parametrize("concurrency, num_requests", [(1, 5), (3, 10), (8, 4)])
def test_closed_loop_keeps_concurrency_in_flight(concurrency, num_requests):
    load = Load(0.01)
    asyncio.run(closed_loop(load.one, num_requests, concurrency))
    assert sorted(load.done) == list(range(num_requests))
    assert load.max_in_flight == min(concurrency, num_requests)


def test_arrival_times_are_a_seeded_poisson_process():
    times = arrival_times(20_000, 4.0, random.Random(1))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 0 and all(g >= 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.03)
    assert sum(g > 0.25 for g in gaps) / len(gaps) == pytest.approx(0.3679, abs=0.02)  # P(gap > mean) = 1/e
    assert arrival_times(5, 4.0, random.Random(1)) == times[:5]


def test_open_loop_sends_on_schedule_regardless_of_load():
    load = Load(0.2)  # each request outlasts the gaps, so an open loop piles them up
    asyncio.run(open_loop(load.one, 6, 50.0, None, random.Random(0)))
    assert sorted(load.done) == list(range(6)) and load.max_in_flight >= 4


def test_open_loop_cap_bounds_requests_in_flight():
    load = Load(0.02)
    asyncio.run(open_loop(load.one, 6, 500.0, 2, random.Random(0)))
    assert sorted(load.done) == list(range(6)) and load.max_in_flight == 2


def test_the_api_key_goes_in_a_bearer_header():
    base = ["--url", "http://127.0.0.1:8000", "--model", "m", "--out", "o", "--prompt-tokens", "8"]
    assert make_client(parse_args([*base, "--api-key", "k"]), 4).headers["authorization"] == "Bearer k"
    assert "authorization" not in make_client(parse_args(base), 4).headers


def test_loadtest_needs_neither_torch_nor_the_server():
    code = "import sys, loadtest.__main__, loadtest.plots; assert not {'torch', 'server', 'engine'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], check=True, timeout=60)
