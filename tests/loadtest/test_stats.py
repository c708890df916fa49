"""loadtest/stats.py and loadtest/record.py on hand-made timings, where every figure can be worked out by hand."""

from __future__ import annotations

import pytest

from loadtest.record import RequestRecord
from loadtest.stats import Distribution, QueueSample, percentile, queue_summary, summarize


def record(i, chunks=(), e2el=None, status=200, prompt=None, usage=None) -> RequestRecord:
    r = RequestRecord(index=i, sent_at=100.0 + i, chunk_offsets=list(chunks), e2el=e2el)
    r.prompt_tokens, r.usage_output_tokens = prompt, usage
    if status != 200:
        r.fail(status, f"failed with {status}")
    return r


@pytest.mark.parametrize(
    "values, q, expected",
    [
        ([1, 2, 3, 4], 50, 2.5),
        ([1, 2, 3, 4], 90, 3.7),  # rank 2.7: 3 + 0.7 * (4 - 3)
        ([1, 2, 3, 4], 99, 3.97),
        ([1, 2, 3, 4], 0, 1),
        ([1, 2, 3, 4], 100, 4),
        ([7], 99, 7),
        ([0, 10], 25, 2.5),
    ],
    ids=["p50-even", "p90", "p99", "p0", "p100", "one-value", "p25-two"],
)
def test_percentile_interpolates_between_ranks(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


def test_distribution_in_ms_with_population_std():
    d = Distribution.of([0.001, 0.002, 0.003, 0.004])
    assert d.count == 4
    assert d.mean == pytest.approx(2.5)
    assert d.std == pytest.approx(1.118034, rel=1e-6)  # sqrt(((1.5^2 + 0.5^2) * 2) / 4)
    assert (d.p50, d.p90, d.p99) == pytest.approx((2.5, 3.7, 3.97))


def test_distribution_of_nothing_is_empty():
    assert Distribution.of([]) == Distribution(count=0)


def test_record_ttft_itl_tpot():
    r = record(0, chunks=[0.1, 0.15, 0.25], e2el=0.3, usage=3)
    assert r.ttft == 0.1
    assert r.itls == pytest.approx([0.05, 0.10])
    assert r.tpot == pytest.approx((0.3 - 0.1) / 2)


def test_record_counts_chunks_when_no_usage_came():
    r = record(0, chunks=[0.1, 0.2], e2el=0.25)
    assert r.output_tokens == 2
    assert r.tpot == pytest.approx(0.15)


def test_tpot_needs_two_tokens():
    assert record(0, chunks=[0.1], e2el=0.1, usage=1).tpot is None
    assert record(0, e2el=0.1, usage=0).ttft is None


def test_summarize_hand_made_run():
    records = [
        record(0, chunks=[0.1, 0.15, 0.25], e2el=0.3, prompt=10, usage=3),
        record(1, chunks=[0.2, 0.3], e2el=0.4, prompt=20, usage=4),  # 4 tokens in 2 chunks
        record(2, status=429, e2el=0.01),
        record(3, status=429, e2el=0.01),
        record(4, status=500, e2el=0.02),
        record(5, status="ConnectError"),
    ]
    m = summarize(records, duration=2.0)
    assert (m.completed, m.failed, m.rejected) == (2, 4, 2)
    assert m.errors_by_status == {"429": 2, "500": 1, "ConnectError": 1}
    assert (m.total_input_tokens, m.total_output_tokens) == (30, 7)
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(18.5)
    assert (m.ttft.count, m.ttft.mean, m.ttft.p50) == (2, pytest.approx(150), pytest.approx(150))
    assert m.itl.count == 3  # 50, 100 and 100 ms, pooled over requests
    assert (m.itl.mean, m.itl.p50) == (pytest.approx(250 / 3), pytest.approx(100))
    assert m.tpot.mean == pytest.approx((100 + 200 / 3) / 2)
    assert (m.e2el.mean, m.e2el.p99) == (pytest.approx(350), pytest.approx(399))
    assert (m.num_with_usage, m.total_chunks, m.num_chunks_differ) == (2, 5, 1)


def test_json_uses_vllm_names():
    out = summarize([record(0, chunks=[0.1, 0.2], e2el=0.2, prompt=5, usage=2)], duration=1.0).to_json()
    for key in ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput"):
        assert key in out
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert f"{stat}_{name}_ms" in out
    assert out["mean_ttft_ms"] == pytest.approx(100)
    assert out["median_itl_ms"] == pytest.approx(100)


def test_summarize_all_failed_has_no_latencies():
    m = summarize([record(0, status=503)], duration=0.5)
    assert (m.completed, m.request_throughput, m.ttft.mean, m.e2el.p99) == (0, 0.0, None, None)


def test_queue_summary():
    samples = [QueueSample(0.0, 4, 0.0, 1.0), QueueSample(0.1, 4, 2.0, 1.0), QueueSample(0.2, 3, 1.0, 1.0)]
    out = queue_summary(samples, "hymba_requests_waiting")
    assert (out["max_waiting"], out["mean_waiting"], out["max_in_flight"]) == (2.0, 1.0, 4)
    assert out["samples"][1] == [0.1, 4, 2.0, 1.0]
    assert queue_summary([QueueSample(0.0, 1, None, None)], None)["max_waiting"] is None
