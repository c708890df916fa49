"""LoadTestConfig: every `python -m loadtest` flag, parsed and checked once; and RunSpec, one run of a sweep."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class LoadTestError(Exception):
    """Anything that stops a load test before it measures: the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class RunSpec:
    """Closed loop: `concurrency` requests always in flight. Open loop: Poisson arrivals at `rate` per second,
    with at most `concurrency` in flight when it is set."""

    concurrency: int | None
    rate: float | None = None

    @property
    def is_open_loop(self) -> bool:
        return self.rate is not None

    @property
    def label(self) -> str:
        if self.rate is None:
            return f"c={self.concurrency}"
        cap = f" c<={self.concurrency}" if self.concurrency else ""
        return f"rate={self.rate:g}/s{cap}"


@dataclass(frozen=True, slots=True)
class LoadTestConfig:
    url: str  # the server's base URL, without /v1
    model: str
    endpoint: str  # completions or chat
    runs: tuple[RunSpec, ...]
    num_requests: int  # per run
    prompt_tokens: int | None  # synthetic prompts of this many tokens; None with a dataset
    max_tokens: int
    dataset: Path | None
    api_key: str | None
    seed: int
    warmup: int  # requests sent (and not measured) before the first run
    ignore_eos: bool
    out: Path

    @property
    def path(self) -> str:
        return ENDPOINTS[self.endpoint]


CONCURRENCY_HELP = "closed loop: requests in flight, one run each (default 1); with --rate: the most in flight"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit; we want one line
        raise LoadTestError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m loadtest", description="Load-test an OpenAI-compatible server with streamed requests.")
    p.add_argument("--url", required=True, metavar="URL", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, metavar="NAME", help="model name the server serves")
    p.add_argument("--endpoint", default="completions", metavar="completions|chat", help="default completions")
    p.add_argument("--concurrency", metavar="C[,C...]", help=CONCURRENCY_HELP)
    p.add_argument("--rate", metavar="R[,R...]", help="open loop: Poisson arrivals per second, one run each")
    p.add_argument("--requests", default="100", metavar="N", help="requests per run (default 100)")
    p.add_argument("--prompt-tokens", metavar="P", help="synthetic prompts of this many tokens (or give --dataset)")
    p.add_argument("--max-tokens", default="128", metavar="T", help="tokens to generate per request (default 128)")
    p.add_argument("--dataset", metavar="FILE.jsonl", help='one {"prompt": ...} or {"messages": [...]} per line')
    p.add_argument("--api-key", metavar="KEY", help="sent as Authorization: Bearer KEY")
    p.add_argument("--seed", default="0", metavar="S", help="seeds synthetic prompts and arrival times (default 0)")
    p.add_argument("--warmup", default="1", metavar="N", help="unmeasured requests before the first run (default 1)")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (a vLLM extension)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for results.json, summary.txt and the PNG plots")
    return p


def _int(flag: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise LoadTestError(f"{flag} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise LoadTestError(f"{flag} must be >= {minimum}, got {value}")
    return value


def _list(flag: str, raw: str, kind: type) -> list:
    try:
        values = [kind(part) for part in raw.split(",")]
    except ValueError:
        values = []
    if not values or not all(v > 0 and v != float("inf") for v in values):
        noun = "integers" if kind is int else "numbers"
        raise LoadTestError(f"{flag} must be comma-separated positive {noun}, got {raw!r}")
    return values


def _runs(concurrency: str | None, rate: str | None) -> tuple[RunSpec, ...]:
    levels = _list("--concurrency", concurrency, int) if concurrency is not None else None
    if rate is None:
        return tuple(RunSpec(c) for c in levels or [1])
    if levels is not None and len(levels) > 1:
        message = f"with --rate, --concurrency is the most requests in flight: one value, got {concurrency!r}"
        raise LoadTestError(message)
    cap = levels[0] if levels else None
    return tuple(RunSpec(cap, r) for r in _list("--rate", rate, float))


def parse_args(argv: Sequence[str] | None = None) -> LoadTestConfig:
    """argv -> LoadTestConfig. Raises LoadTestError (one line naming the flag) on anything unusable."""
    a = _parser().parse_args(argv)
    url = a.url.rstrip("/").removesuffix("/v1")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LoadTestError(f"--url must be an http:// or https:// URL, got {a.url!r}")
    if a.endpoint not in ENDPOINTS:
        raise LoadTestError(f"--endpoint must be completions or chat, got {a.endpoint!r}")
    if (a.prompt_tokens is None) == (a.dataset is None):
        raise LoadTestError("give one of --prompt-tokens N (synthetic prompts) or --dataset FILE.jsonl")
    dataset = Path(a.dataset) if a.dataset is not None else None
    if dataset is not None and not dataset.is_file():
        raise LoadTestError(f"--dataset {a.dataset}: no such file")
    if a.api_key == "":
        raise LoadTestError("--api-key must not be empty")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise LoadTestError(f"--out {a.out}: exists and is not a folder")
    return LoadTestConfig(
        url=url,
        model=a.model,
        endpoint=a.endpoint,
        runs=_runs(a.concurrency, a.rate),
        num_requests=_int("--requests", a.requests, 1),
        prompt_tokens=None if a.prompt_tokens is None else _int("--prompt-tokens", a.prompt_tokens, 1),
        max_tokens=_int("--max-tokens", a.max_tokens, 1),
        dataset=dataset,
        api_key=a.api_key,
        seed=_int("--seed", a.seed, 0),
        warmup=_int("--warmup", a.warmup, 0),
        ignore_eos=not a.no_ignore_eos,
        out=out,
    )
