"""What a Benchmark becomes for people and programs: the printed tables (also summary.txt) and results.json."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from loadtest.runner import Benchmark, RunResult
from loadtest.stats import LATENCY_METRICS, Distribution, queue_summary

LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain text columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded)

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _throughput_row(run: RunResult) -> list[str]:
    m = run.metrics
    waiting = [s.waiting for s in run.samples if s.waiting is not None]
    return [
        run.spec.label,
        str(m.completed),
        str(m.rejected),
        str(m.failed - m.rejected),
        _num(m.duration),
        _num(m.request_throughput),
        _num(m.output_throughput, 1),
        _num(m.total_token_throughput, 1),
        _num(m.total_input_tokens / m.completed, 1) if m.completed else "-",
        _num(m.total_output_tokens / m.completed, 1) if m.completed else "-",
        _num(max(waiting), 0) if waiting else "-",
    ]


def _latency_rows(run: RunResult) -> list[list[str]]:
    rows = []
    for name in LATENCY_METRICS:
        d: Distribution = getattr(run.metrics, name)
        label = run.spec.label if name == LATENCY_METRICS[0] else ""
        rows.append([label, LATENCY_NAMES[name], str(d.count), *(_num(v) for v in (d.mean, d.p50, d.p90, d.p99))])
    return rows


def _notes(bench: Benchmark) -> list[str]:
    notes = []
    for run in bench.runs:
        m = run.metrics
        for status, n in m.errors_by_status.items():
            example = next(r.error for r in run.records if str(r.status) == status)
            notes.append(f"{run.spec.label}: {n} x {status}: {example}")
        if m.completed and m.num_with_usage < m.completed:
            notes.append(f"{run.spec.label}: {m.completed - m.num_with_usage} completed requests sent no usage; their "
                         "output tokens are counted as chunks")  # fmt: skip
        if m.num_chunks_differ:
            notes.append(f"{run.spec.label}: {m.num_chunks_differ} of {m.completed} requests streamed a number of text "
                         f"chunks other than usage.completion_tokens ({m.total_chunks} chunks, {m.total_output_tokens} "
                         "tokens in all); ITL is per chunk, TPOT per token")  # fmt: skip
    return notes


SOURCES = {"tokenize": "counted by /tokenize", "estimate": "estimated from words"}


def format_report(bench: Benchmark) -> str:
    cfg = bench.cfg
    mode = "open loop (Poisson arrivals)" if cfg.runs[0].is_open_loop else "closed loop (fixed concurrency)"
    if cfg.dataset is not None:
        workload = f"prompts from {cfg.dataset}"
    else:
        workload = f"{cfg.prompt_tokens}-token prompts ({SOURCES[bench.prompts.source]}), max_tokens {cfg.max_tokens}"
    head = f"{cfg.url}{cfg.path}  model {cfg.model}\n{mode}, {cfg.num_requests} requests per run, {workload}"
    headers = ["run", "ok", "429", "err", "duration s", "req/s", "out tok/s", "total tok/s", "in tok", "out tok"]
    throughput = table([*headers, "max waiting"], [_throughput_row(r) for r in bench.runs])
    lat_headers = ["run", "metric", "n", "mean ms", "p50 ms", "p90 ms", "p99 ms"]
    latency = table(lat_headers, [row for r in bench.runs for row in _latency_rows(r)])
    notes = _notes(bench)
    return "\n\n".join([head, throughput, latency, *(["\n".join(notes)] if notes else [])])


def to_json(bench: Benchmark) -> dict:
    cfg = bench.cfg
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("api_key", "runs")}
    prompt_tokens = [p.num_tokens for p in bench.prompts.prompts if p.num_tokens is not None]
    return {
        "tool": "hymba-serve loadtest",
        "date": bench.date,
        "config": config | {"api_key_given": cfg.api_key is not None},
        "server": {"model_ids": list(bench.server.model_ids), "max_model_len": bench.server.max_model_len},
        "prompts": {
            "source": bench.prompts.source,
            "num": len(bench.prompts.prompts),
            "mean_tokens_by_tokenize": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
        },
        "runs": [_run_json(run) for run in bench.runs],
    }


def _run_json(run: RunResult) -> dict:
    spec = run.spec
    head = {"label": spec.label, "mode": "open" if spec.is_open_loop else "closed"}
    head |= {"concurrency": spec.concurrency, "request_rate": spec.rate}
    return (
        head
        | run.metrics.to_json()
        | {
            "queue": queue_summary(run.samples, run.gauge),
            "requests": [r.to_json(run.started_at) for r in sorted(run.records, key=lambda r: r.index)],
        }
    )


def write_json(bench: Benchmark, path: Path) -> None:
    path.write_text(json.dumps(to_json(bench), indent=1) + "\n", encoding="utf-8")
