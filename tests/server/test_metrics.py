"""/metrics after traffic: every hymba_* family present, with values that add up."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.fake_engine import FAIL_ID, FakeEngine


def scrape(url: str) -> dict[str, list]:
    text = httpx.get(url + "/metrics").text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families: dict, sample_name: str, **labels: str) -> float:
    for family in families.values():
        for sample in family:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{sample_name} {labels} not exported")


def test_metrics_after_traffic(make_server):
    live = make_server([FakeEngine(token_delay=0.002)])
    with httpx.Client(base_url=live.url) as c:
        assert c.post("/v1/completions", json={"prompt": "t5", "max_tokens": 4}).status_code == 200
        chat = {"messages": [{"role": "user", "content": "t5"}], "max_tokens": 3, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=chat) as r:
            r.read()
        assert c.post("/v1/completions", json={"prompt": "t5", "temperature": 9}).status_code == 400
        assert c.post("/v1/completions", json={"prompt": [1, FAIL_ID], "max_tokens": 3}).status_code == 500
        assert c.get("/no/such/route").status_code == 404
    m = scrape(live.url)
    assert value(m, "hymba_requests_total", endpoint="/v1/completions", status="200") == 1
    assert value(m, "hymba_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert value(m, "hymba_requests_total", endpoint="/v1/completions", status="400") == 1
    assert value(m, "hymba_requests_total", endpoint="/v1/completions", status="500") == 1
    assert value(m, "hymba_requests_total", endpoint="other", status="404") == 1
    assert value(m, "hymba_generated_tokens_total") == 4 + 3 + 1  # the failed request made one token
    assert value(m, "hymba_prompt_tokens_total") >= 2 + 2 + 2
    assert value(m, "hymba_time_to_first_token_seconds_count") == 3
    assert value(m, "hymba_inter_token_latency_seconds_count") == 3 + 2
    assert value(m, "hymba_e2e_request_latency_seconds_count") == 3
    assert value(m, "hymba_queue_wait_seconds_count") == 3
    assert value(m, "hymba_request_decode_tokens_per_second_count") == 2
    assert value(m, "hymba_requests_finished_total", finish_reason="length") == 2
    assert value(m, "hymba_errors_total", type="invalid_request_error") == 2  # the 400 and the 404
    assert value(m, "hymba_errors_total", type="server_error") == 1
    assert value(m, "hymba_requests_running") == 0 and value(m, "hymba_requests_waiting") == 0
    assert value(m, "hymba_decode_state_bytes", device="cpu") == 123_456
    assert value(m, "hymba_model_load_seconds") == 0.25
    assert value(m, "hymba_model_info", model="hymba-fake", version="0.1.0") == 1
    assert "hymba_cancellations" in m


def test_each_app_has_its_own_registry(make_server):
    first, second = make_server(), make_server()
    httpx.post(first.url + "/v1/completions", json={"prompt": "t5", "max_tokens": 1})
    assert first.metric("hymba_generated_tokens_total") == 1 and second.metric("hymba_generated_tokens_total") == 0
