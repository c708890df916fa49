"""Pure statistics over RequestRecords: the per-run metrics, named and defined as in vLLM's benchmark_serving.

TTFT, TPOT and E2EL are one value per completed request; ITL pools every gap between consecutive text chunks
of every completed request. Throughputs divide by the run's wall time (first send to last response).
Latencies are reported in milliseconds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from loadtest.record import RequestRecord

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """q-th percentile (0-100) of ascending values, interpolating linearly between the two nearest ranks."""
    assert sorted_values, "percentile of no values"
    rank = (len(sorted_values) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of one latency, in ms. Every field but count is None when there were no samples."""

    count: int
    mean: float | None = None
    std: float | None = None  # population standard deviation
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, samples_s: Sequence[float]) -> Distribution:
        values = sorted(x * 1e3 for x in samples_s)
        if not values:
            return cls(count=0)
        mean = sum(values) / len(values)
        std = math.sqrt(sum((x - mean) ** 2 for x in values) / len(values))
        p50, p90, p99 = (percentile(values, q) for q in PERCENTILES)
        return cls(len(values), mean, std, p50, p90, p99)


@dataclass(frozen=True, slots=True)
class RunMetrics:
    completed: int
    failed: int  # every request that did not complete, 429s included
    rejected: int  # of those, the 429s (queue full)
    errors_by_status: dict[str, int]
    duration: float  # seconds
    total_input_tokens: int  # usage.prompt_tokens of the completed requests
    total_output_tokens: int  # usage.completion_tokens of the completed requests (chunks where no usage came)
    request_throughput: float  # completed requests per second
    output_throughput: float  # output tokens per second
    total_token_throughput: float  # input + output tokens per second
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution
    num_with_usage: int  # completed requests whose stream carried usage
    total_chunks: int  # text chunks of the completed requests
    num_chunks_differ: int  # completed requests whose chunk count differs from usage.completion_tokens

    def to_json(self) -> dict:
        """Flat keys with vLLM's names (mean_ttft_ms, p99_itl_ms, request_throughput, ...)."""
        out = {
            "completed": self.completed,
            "failed": self.failed,
            "rejected_429": self.rejected,
            "errors_by_status": self.errors_by_status,
            "duration": self.duration,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
        }
        for name in LATENCY_METRICS:
            d: Distribution = getattr(self, name)
            out |= {f"mean_{name}_ms": d.mean, f"median_{name}_ms": d.p50, f"std_{name}_ms": d.std}
            out |= {f"p{q}_{name}_ms": getattr(d, f"p{q}") for q in PERCENTILES}
        out["token_check"] = {
            "requests_with_usage": self.num_with_usage,
            "total_chunks": self.total_chunks,
            "requests_where_chunks_differ_from_usage": self.num_chunks_differ,
        }
        return out


def summarize(records: Sequence[RequestRecord], duration: float) -> RunMetrics:
    done = [r for r in records if r.is_completed]
    errors = Counter(str(r.status) for r in records if not r.is_completed)
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    with_usage = [r for r in done if r.usage_output_tokens is not None]

    def per_second(n: float) -> float:
        return n / duration if duration > 0 else 0.0

    return RunMetrics(
        completed=len(done),
        failed=len(records) - len(done),
        rejected=errors.get("429", 0),
        errors_by_status=dict(sorted(errors.items())),
        duration=duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=per_second(len(done)),
        output_throughput=per_second(output_tokens),
        total_token_throughput=per_second(input_tokens + output_tokens),
        ttft=Distribution.of([r.ttft for r in done if r.ttft is not None]),
        tpot=Distribution.of([r.tpot for r in done if r.tpot is not None]),
        itl=Distribution.of([gap for r in done for gap in r.itls]),
        e2el=Distribution.of([r.e2el for r in done if r.e2el is not None]),
        num_with_usage=len(with_usage),
        total_chunks=sum(len(r.chunk_offsets) for r in done),
        num_chunks_differ=sum(len(r.chunk_offsets) != r.usage_output_tokens for r in with_usage),
    )


@dataclass(frozen=True, slots=True)
class QueueSample:
    t: float  # seconds since the run started
    in_flight: int  # requests this client had sent and not yet finished
    waiting: float | None  # the server's waiting-requests gauge, when it exports one
    running: float | None


def queue_summary(samples: Sequence[QueueSample], gauge: str | None) -> dict:
    waiting = [s.waiting for s in samples if s.waiting is not None]
    in_flight = [s.in_flight for s in samples]
    return {
        "gauge": gauge,
        "max_waiting": max(waiting) if waiting else None,
        "mean_waiting": sum(waiting) / len(waiting) if waiting else None,
        "max_in_flight": max(in_flight) if in_flight else None,
        "samples": [[round(s.t, 3), s.in_flight, s.waiting, s.running] for s in samples],
    }
