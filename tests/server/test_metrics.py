"""/metrics after traffic: every hymba_* family present, with values that add up."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import RequestMetrics
from server.metrics import Metrics
from tests.server.conftest import wait_until

CHAT = {"messages": [{"role": "user", "content": "t5"}], "max_tokens": 3, "ignore_eos": True, "stream": True}


def scrape(url: str) -> dict[str, list]:
    text = httpx.get(url + "/metrics").text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families: dict, sample_name: str, **labels: str) -> float:
    for family in families.values():
        for sample in family:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{sample_name} {labels} not exported")


def test_metrics_after_traffic(make_server, decode_hook, oracle):
    live = make_server()
    hook = decode_hook(live.engine)
    with httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.post("/v1/completions", json={"prompt": "t5", "max_tokens": 4, "ignore_eos": True}).status_code == 200
        with c.stream("POST", "/v1/chat/completions", json=CHAT) as r:
            r.read()
        assert c.post("/v1/completions", json={"prompt": "t5", "temperature": 9}).status_code == 400
        hook.num_failures = 1  # one token from prefill, then decode fails
        r = c.post("/v1/completions", json={"prompt": "t5", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 500
        assert c.get("/no/such/route").status_code == 404
    wait_until(lambda: live.metric("hymba_e2e_request_latency_seconds_count") == 3)  # the worker's last bookkeeping
    m = scrape(live.url)
    assert value(m, "hymba_requests_total", endpoint="/v1/completions", status="200") == 1
    assert value(m, "hymba_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert value(m, "hymba_requests_total", endpoint="/v1/completions", status="400") == 1
    assert value(m, "hymba_requests_total", endpoint="/v1/completions", status="500") == 1
    assert value(m, "hymba_requests_total", endpoint="other", status="404") == 1
    assert value(m, "hymba_generated_tokens_total") == 4 + 3 + 1  # the failed request made one token
    num_prompt_tokens = 2 * len(oracle.tokenizer.encode("t5")) + len(oracle.tokenizer.encode_chat(CHAT["messages"]))
    assert value(m, "hymba_prompt_tokens_total") == num_prompt_tokens
    assert value(m, "hymba_time_to_first_token_seconds_count") == 3
    assert value(m, "hymba_inter_token_latency_seconds_count") == 3 + 2
    assert value(m, "hymba_e2e_request_latency_seconds_count") == 3
    assert value(m, "hymba_queue_wait_seconds_count") == 3
    assert value(m, "hymba_request_decode_tokens_per_second_count") == 2
    assert value(m, "hymba_requests_finished_total", finish_reason="length") == 2
    assert value(m, "hymba_errors_total", type="invalid_request_error") == 2  # the 400 and the 404
    assert value(m, "hymba_errors_total", type="server_error") == 1
    assert value(m, "hymba_requests_running") == 0 and value(m, "hymba_requests_waiting") == 0
    assert value(m, "hymba_decode_state_bytes", device="cpu") == live.engine.state_nbytes
    assert value(m, "hymba_model_load_seconds") == live.engine.load_seconds
    assert value(m, "hymba_model_info", model=live.engine.model_name, version="0.1.0") == 1
    assert "hymba_cancellations" in m


def test_each_app_has_its_own_registry(make_server):
    first, second = make_server(), make_server()
    httpx.post(first.url + "/v1/completions", json={"prompt": "t5", "max_tokens": 1}, timeout=30)
    wait_until(lambda: first.metric("hymba_generated_tokens_total") == 1)
    assert second.metric("hymba_generated_tokens_total") == 0


@pytest.mark.parametrize("fails_after_end", [False, True], ids=["returns", "raises"])
def test_a_response_is_counted_before_its_end_reaches_the_client(fails_after_end):
    """The count goes up as the last body message goes out, not when the app returns, so a scrape made once a client
    has its whole response includes it (counted at the return, a live overload test once read 29 of 30). Counted
    once, whatever the app does after its response ended."""
    metrics = Metrics()

    def count() -> float | None:
        return metrics.registry.get_sample_value("hymba_requests_total", {"endpoint": "other", "status": "200"})

    seen: dict[str, float | None] = {}

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})
        seen["app, after its last send"] = count()
        if fails_after_end:
            raise RuntimeError("tidying up failed")

    async def client(message):
        if message["type"] == "http.response.body":
            seen["client, more to come" if message.get("more_body") else "client, the end"] = count()

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def serve():
        await RequestMetrics(app, metrics)({"type": "http", "method": "GET", "path": "/x"}, receive, client)

    if fails_after_end:
        with pytest.raises(RuntimeError):
            asyncio.run(serve())
    else:
        asyncio.run(serve())
    assert seen == {"client, more to come": None, "client, the end": 1.0, "app, after its last send": 1.0}
    assert count() == 1.0
