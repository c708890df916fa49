"""loadtest/target.py without a network: queue gauges out of Prometheus text, messages out of error bodies."""

from __future__ import annotations

import httpx

from loadtest.target import RUNNING_GAUGES, WAITING_GAUGES, error_message, parse_gauges

PROMETHEUS = """\
# HELP hymba_requests_waiting Admitted requests waiting for a worker
# TYPE hymba_requests_waiting gauge
hymba_requests_waiting 2.0
hymba_requests_running 1.0
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 4.0
hymba_requests_total{endpoint="/v1/completions",status="200"} 12.0
"""


def test_parse_gauges_sums_label_sets():
    gauges = parse_gauges(PROMETHEUS, WAITING_GAUGES + RUNNING_GAUGES)
    assert gauges == {"hymba_requests_waiting": 2.0, "hymba_requests_running": 1.0, "vllm:num_requests_waiting": 7.0}


def test_parse_gauges_ignores_what_it_was_not_asked_for():
    assert parse_gauges("other 1\nbroken_line\n", WAITING_GAUGES) == {}


def test_error_message_reads_openai_bodies_and_falls_back_to_text():
    openai = httpx.Response(429, json={"error": {"message": "queue full", "type": "x", "code": "queue_full"}})
    assert error_message(openai) == "queue full"
    assert error_message(httpx.Response(422, json={"detail": "bad field"})) == "bad field"
    assert error_message(httpx.Response(502, text="<html>Bad Gateway</html>")) == "<html>Bad Gateway</html>"
    assert error_message(httpx.Response(500)) == "Internal Server Error"
