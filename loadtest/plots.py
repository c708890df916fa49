"""PNG plots of a Benchmark with matplotlib (imported here only): latency distributions, the sweep, the queue."""

from __future__ import annotations

from pathlib import Path

from loadtest.runner import Benchmark, RunResult
from loadtest.stats import LATENCY_METRICS

TITLES = {
    "ttft": "TTFT: time to first token",
    "tpot": "TPOT: time per output token",
    "itl": "ITL: inter-token latency",
    "e2el": "E2EL: end-to-end latency",
}


def _samples_ms(run: RunResult, name: str) -> list[float]:
    done = [r for r in run.records if r.is_completed]
    values = [gap for r in done for gap in r.itls] if name == "itl" else [getattr(r, name) for r in done]
    return sorted(v * 1e3 for v in values if v is not None)


def write_plots(bench: Benchmark, out: Path) -> list[Path]:
    """latency.png, sweep.png and queue.png in `out`; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    paths = [_latency(plt, bench, out / "latency.png"), _sweep(plt, bench, out / "sweep.png")]
    if any(run.samples for run in bench.runs):
        paths.append(_queue(plt, bench, out / "queue.png"))
    return paths


def _latency(plt, bench: Benchmark, path: Path) -> Path:
    """Empirical CDF of each latency, one line per run."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, name in zip(axes.flat, LATENCY_METRICS, strict=True):
        for run in bench.runs:
            values = _samples_ms(run, name)
            if values:
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, fractions, where="post", label=run.spec.label)
        ax.set_title(TITLES[name])
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples ≤ x")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(f"{bench.cfg.model}: latency distributions ({bench.cfg.endpoint})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep(plt, bench: Benchmark, path: Path) -> Path:
    """Throughput and p50/p99 latency against concurrency (closed loop) or request rate (open loop)."""
    runs = bench.runs
    is_open = runs[0].spec.is_open_loop
    xs = [r.spec.rate if is_open else r.spec.concurrency for r in runs]
    xlabel = "request rate (req/s)" if is_open else "concurrency (requests in flight)"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(xs, [r.metrics.output_throughput for r in runs], "o-", color="C0", label="output tok/s")
    left.set_ylabel("output tokens/s", color="C0")
    twin = left.twinx()
    twin.plot(xs, [r.metrics.request_throughput for r in runs], "s--", color="C1", label="requests/s")
    twin.set_ylabel("requests/s", color="C1")
    left.set_ylim(bottom=0)
    twin.set_ylim(bottom=0)
    left.set_title("throughput")
    for i, name in enumerate(("ttft", "tpot", "e2el")):
        p50 = [getattr(r.metrics, name).p50 for r in runs]
        p99 = [getattr(r.metrics, name).p99 for r in runs]
        right.plot(xs, p50, "o-", color=f"C{i}", label=f"{name.upper()} p50")
        right.plot(xs, p99, "^:", color=f"C{i}", label=f"{name.upper()} p99")
    right.set_yscale("log")
    right.set_ylabel("ms")
    right.set_title("latency")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.set_xlabel(xlabel)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{bench.cfg.model}: throughput and latency against {'rate' if is_open else 'concurrency'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _queue(plt, bench: Benchmark, path: Path) -> Path:
    """Per run: the server's waiting gauge (when it has one) and this client's requests in flight, over time."""
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for i, run in enumerate(bench.runs):
        ts = [s.t for s in run.samples]
        ax.plot(ts, [s.in_flight for s in run.samples], ":", color=f"C{i}", label=f"{run.spec.label} in flight")
        if run.gauge is not None:
            waiting = [s.waiting for s in run.samples]
            ax.plot(ts, waiting, "-", color=f"C{i}", label=f"{run.spec.label} waiting ({run.gauge})")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("requests")
    ax.set_title(f"{bench.cfg.model}: queue during each run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
