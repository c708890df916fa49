"""Soak: thousands of mixed requests against a real `hymba-serve` process, checking that nothing goes wrong slowly.

    python -m scripts.soak [--requests 2000] [--concurrency 4] [--out soak.json]

Starts the server on the tiny conformance checkpoint (CPU, one thread), then sends a seeded mix: completions and chat,
streamed and not, n 1-2, logprobs, echo, stop strings, seeds and penalties, tokenize/detokenize/models, a share of
requests that must be refused (400/404) and of streams the client drops after the first chunk. Every response is
checked; anything else is an unexpected error. Passes when there are none, the server's RSS grew under 5% after
warm-up, the median per-token latency of the second half of the run (after warm-up) is within 1.5x of the first
half's, and the server
exits 0 on SIGTERM. Figures go to stdout and, with --out, to a JSON file (docs/RELIABILITY.md records a run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[1]
TINY = ROOT / "tests" / "data" / "conformance" / "hymba-odd-6L"
WORDS = ["t5", "t9", "t27", "hello", "the", "café", "42", "\n", "😀", "a b c"]
RSS_LIMIT = 0.05
LATENCY_LIMIT = 1.5


@dataclass
class Outcome:
    kind: str
    seconds: float
    num_tokens: int = 0
    error: str | None = None


@dataclass
class Soak:
    url: str
    pid: int
    rng: random.Random
    outcomes: list[Outcome] = field(default_factory=list)
    rss: list[tuple[int, int]] = field(default_factory=list)  # (requests done, bytes)
    num_dropped: int = 0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prompt_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def sampling(rng: random.Random) -> dict:
    fields: dict = {"max_tokens": rng.randint(1, 16)}
    if rng.random() < 0.5:
        fields["temperature"] = rng.choice([0, 0.3, 0.7, 1.0, 1.8])
    for name, values in (
        ("top_p", [0.1, 0.5, 0.9, 1.0]),
        ("top_k", [-1, 0, 1, 5, 50]),
        ("seed", [0, 7, 2**63 - 1, -5]),
        ("presence_penalty", [-2, -0.5, 0.5, 2]),
        ("frequency_penalty", [-1, 1.5]),
        ("repetition_penalty", [0.5, 1.2, 2.0]),
        ("min_p", [0.05, 0.2]),
        ("stop", [["t2"], ["\n", "t1"], "t9"]),
        ("ignore_eos", [True]),
        ("logit_bias", [{"5": 3.0}, {"9": -100}]),
    ):
        if rng.random() < 0.2:
            fields[name] = rng.choice(values)
    if rng.random() < 0.15:
        fields["n"] = 2
    return fields


def make_request(rng: random.Random) -> tuple[str, str, dict, int]:
    """(kind, path, body, expected status)."""
    roll = rng.random()
    if roll < 0.05:  # must be refused
        path, body, status = rng.choice(
            [
                ("/v1/completions", {"prompt": "t5", "temperature": 3}, 400),
                ("/v1/completions", {"prompt": "t5", "model": "gpt-4"}, 404),
                ("/v1/chat/completions", {"messages": []}, 400),
                ("/v1/completions", {"prompt": [1] * 200, "max_tokens": 1}, 400),
            ]
        )
        return "refused", path, body, status
    if roll < 0.10:
        return "tokenize", "/tokenize", {"prompt": prompt_text(rng)}, 200
    if roll < 0.12:
        return "models", "/v1/models", {}, 200
    stream = rng.random() < 0.5
    if roll < 0.55:
        body = {"prompt": prompt_text(rng), **sampling(rng), "stream": stream}
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 5)
            body["echo"] = rng.random() < 0.5
        path, kind = "/v1/completions", "completion"
    else:
        messages = [{"role": "user", "content": prompt_text(rng)}]
        if rng.random() < 0.3:
            messages = [{"role": "system", "content": "be brief"}, *messages]
        body = {"messages": messages, **sampling(rng), "stream": stream}
        if rng.random() < 0.2:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
        path, kind = "/v1/chat/completions", "chat"
    if stream and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    return f"{kind}-stream" if stream else kind, path, body, 200


def check_json(kind: str, body: dict, out: dict) -> int:
    """Completion tokens of a whole response; raises AssertionError on anything wrong."""
    if kind == "tokenize":
        assert out["count"] == len(out["tokens"]) > 0, out
        return 0
    if kind == "models":
        assert out["data"][0]["id"], out
        return 0
    n = body.get("n", 1)
    assert len(out["choices"]) == n, out
    usage = out["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    assert usage["completion_tokens"] <= n * body["max_tokens"], usage
    assert all(c["finish_reason"] in ("stop", "length") for c in out["choices"]), out
    return usage["completion_tokens"]


async def run_one(soak: Soak, client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    kind, path, body, status = make_request(rng)
    started = time.perf_counter()
    num_tokens = 0
    try:
        if kind == "models":
            r = await client.get(path)
            assert r.status_code == 200, r.text
            check_json(kind, body, r.json())
        elif not body.get("stream"):
            r = await client.post(path, json=body)
            assert r.status_code == status, f"{r.status_code}: {r.text[:300]}"
            if status == 200:
                num_tokens = check_json(kind, body, r.json())
            else:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
        else:
            drop = rng.random() < 0.05
            async with client.stream("POST", path, json=body) as r:
                assert r.status_code == 200, f"{r.status_code}: {(await r.aread())[:300]!r}"
                lines = []
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
                        if drop:
                            soak.num_dropped += 1
                            return Outcome("dropped", time.perf_counter() - started)
            assert lines[-1] == "data: [DONE]", lines[-3:]
            chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
            assert not any("error" in c for c in chunks), chunks
            finishes = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
            assert len(finishes) == body.get("n", 1), chunks
            if body.get("stream_options"):
                num_tokens = chunks[-1]["usage"]["completion_tokens"]
            else:
                num_tokens = sum(1 for chunk in chunks for c in chunk["choices"] if c.get("text") or c.get("delta"))
        return Outcome(kind, time.perf_counter() - started, num_tokens)
    except Exception as e:  # every way a request can go wrong is counted, and the soak goes on
        return Outcome(kind, time.perf_counter() - started, error=f"{type(e).__name__}: {e}"[:500])


async def drive(soak: Soak, num_requests: int, concurrency: int) -> None:
    done = 0
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=soak.url, timeout=120, limits=limits) as client:

        async def worker(worker_idx: int) -> None:
            nonlocal done
            rng = random.Random(soak.rng.random() + worker_idx)
            while done < num_requests:
                done += 1
                soak.outcomes.append(await run_one(soak, client, rng))
                if len(soak.outcomes) % 50 == 0:
                    soak.rss.append((len(soak.outcomes), rss_bytes(soak.pid)))
                    if len(soak.outcomes) % 500 == 0:
                        print(f"{len(soak.outcomes)} requests, rss {soak.rss[-1][1] / 2**20:.1f} MiB", flush=True)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))


def start_server(model: Path, max_queue: int) -> tuple[subprocess.Popen, str, list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "server", "--model", str(model), "--port", "0", "--max-model-len", "128"]
    argv += ["--max-queue", str(max_queue), "--log-level", "info"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not found.wait(120):
            raise RuntimeError("no 'listening on' line from the server:\n" + "".join(lines))
        url = re.search(r"listening on (http://\S+)", "".join(lines)).group(1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url, lines
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server never became healthy:\n" + "".join(lines))
    except BaseException:
        proc.kill()  # never leave a server behind
        raise


def windows(outcomes: list[Outcome], warmup: int, num_windows: int = 10) -> list[dict]:
    """Per tenth of the run after warm-up: p50/p99 seconds per request and p50 seconds per generated token."""
    rest = outcomes[warmup:]
    size = max(1, len(rest) // num_windows)
    out = []
    for i in range(0, len(rest) - size + 1, size):
        part = [o for o in rest[i : i + size] if o.error is None]
        seconds = sorted(o.seconds for o in part)
        per_token = sorted(o.seconds / o.num_tokens for o in part if o.num_tokens)
        out.append(
            {
                "requests": f"{warmup + i + 1}-{warmup + i + size}",
                "p50_s": round(statistics.median(seconds), 4),
                "p99_s": round(seconds[int(0.99 * (len(seconds) - 1))], 4),
                "p50_s_per_token": round(statistics.median(per_token), 5),
            }
        )
    return out


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=TINY)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    proc, url, _ = start_server(args.model, max_queue=64)
    soak = Soak(url, proc.pid, random.Random(args.seed))
    started = time.monotonic()
    try:
        soak.rss.append((0, rss_bytes(proc.pid)))
        asyncio.run(drive(soak, args.requests, args.concurrency))
        soak.rss.append((len(soak.outcomes), rss_bytes(proc.pid)))
        elapsed = time.monotonic() - started
        scrape = httpx.get(url + "/metrics", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)

    errors = [o for o in soak.outcomes if o.error]
    warm_rss = next(b for n, b in soak.rss if n >= args.warmup)
    final_rss = soak.rss[-1][1]
    growth = (final_rss - warm_rss) / warm_rss
    tenths = windows(soak.outcomes, args.warmup)
    half = len(tenths) // 2  # medians of window medians: one window slowed by a neighbour's job does not decide
    drift = statistics.median(w["p50_s_per_token"] for w in tenths[half:]) / statistics.median(
        w["p50_s_per_token"] for w in tenths[:half]
    )
    kinds: dict[str, int] = {}
    for o in soak.outcomes:
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    report = {
        "requests": len(soak.outcomes),
        "seconds": round(elapsed, 1),
        "by_kind": dict(sorted(kinds.items())),
        "unexpected_errors": len(errors),
        "first_errors": [f"{o.kind}: {o.error}" for o in errors[:10]],
        "generated_tokens": int(metric(scrape, "hymba_generated_tokens_total")),
        "server_errors": metric(scrape, "hymba_errors_total", type="server_error"),
        "client_disconnects_counted": metric(scrape, "hymba_cancellations_total", reason="client_disconnected"),
        "streams_dropped": soak.num_dropped,
        "rss_mib": {
            "start": round(soak.rss[0][1] / 2**20, 1),
            "after_warmup": round(warm_rss / 2**20, 1),
            "end": round(final_rss / 2**20, 1),
        },
        "rss_growth_after_warmup": round(growth, 4),
        "latency_windows": tenths,
        "latency_drift_second_half_vs_first": round(drift, 3),
        "exit_code": exit_code,
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    ok = not errors and report["server_errors"] == 0 and growth < RSS_LIMIT and drift < LATENCY_LIMIT and exit_code == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
