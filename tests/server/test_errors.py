"""Every error path: exact status, OpenAI's error body, the right `param`, and nothing internal leaked."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from server.app import build_app
from server.settings import Settings
from tests.server.fake_engine import FAIL_ID, FakeEngine

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "t5"}]


def error_of(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"]
    assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


@pytest.mark.parametrize(
    "path, body, param",
    [
        (COMPLETIONS, {"prompt": "t5", "temperature": 2.5}, "temperature"),
        (COMPLETIONS, {"prompt": "t5", "top_p": 0}, "top_p"),
        (COMPLETIONS, {"max_tokens": 3}, "prompt"),
        (COMPLETIONS, {"prompt": "t5", "max_tokens": 0}, "max_tokens"),
        (COMPLETIONS, {"prompt": "t5", "logprobs": 21}, "logprobs"),
        (COMPLETIONS, {"prompt": "t5", "n": 17}, "n"),
        (COMPLETIONS, {"prompt": [1, "t5"]}, "prompt"),
        (COMPLETIONS, {"prompt": [], "max_tokens": 1}, "prompt"),
        (COMPLETIONS, {"prompt": [1, 300]}, "prompt"),
        (COMPLETIONS, {"prompt": "t5", "suffix": "t9"}, "suffix"),
        (COMPLETIONS, {"prompt": "t5", "best_of": 2}, "best_of"),
        (COMPLETIONS, {"prompt": "t5", "stream_options": {"include_usage": True}}, "stream_options"),
        (COMPLETIONS, {"prompt": "t5", "logit_bias": {"400": 1}}, "logit_bias"),
        (COMPLETIONS, {"prompt": "t5", "logit_bias": {"t5": 1}}, "logit_bias"),
        (COMPLETIONS, {"prompt": "t5", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
        (COMPLETIONS, {"prompt": "t5", "stop_token_ids": [-1]}, "stop_token_ids"),
        (CHAT, {"messages": []}, "messages"),
        (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
        (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
        (CHAT, {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_validation_is_400_naming_the_param(client, path, body, param):
    error_of(client.post(path, json=body), 400, param)


def test_image_parts_are_400(client):
    content = [{"type": "text", "text": "t5"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": content}]})
    assert "image_url" in error_of(r, 400, "messages[0].content[1]")["message"]


def test_bad_json_is_400(client):
    r = client.post(COMPLETIONS, content=b"{not json", headers={"content-type": "application/json"})
    error_of(r, 400)


def test_context_limit_names_both_numbers(client):
    err = error_of(client.post(COMPLETIONS, json={"prompt": [1] * 60, "max_tokens": 10}), 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    assert "64" in err["message"] and "60 in the prompt" in err["message"] and "10 for the completion" in err["message"]
    chat = client.post(CHAT, json={"messages": [{"role": "user", "content": " ".join(["t5"] * 70)}]})
    error_of(chat, 400, "messages", "context_length_exceeded")


def test_sdk_raises_bad_request(fake_server):
    with openai.OpenAI(base_url=fake_server.url + "/v1", api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.BadRequestError) as e:
            sdk.completions.create(model="hymba-fake", prompt="t5", suffix="!")
        assert e.value.status_code == 400 and e.value.body["param"] == "suffix"
        with pytest.raises(openai.NotFoundError):
            sdk.completions.create(model="gpt-4", prompt="t5")


def test_unknown_model_route_and_method(client):
    error_of(client.post(COMPLETIONS, json={"model": "gpt-4", "prompt": "t5"}), 404, "model", "model_not_found")
    error_of(client.get("/v1/models/gpt-4"), 404, "model", "model_not_found")
    error_of(client.get("/v1/nothing-here"), 404, None, "not_found")
    error_of(client.get(COMPLETIONS), 405, None, "method_not_allowed")


def test_api_key(make_server):
    live = make_server(api_key="sesame")
    with httpx.Client(base_url=live.url) as c:
        error_of(c.post(COMPLETIONS, json={"prompt": "t5", "max_tokens": 1}), 401, None, "invalid_api_key")
        wrong = {"Authorization": "Bearer nope"}
        error_of(c.post(COMPLETIONS, json={"prompt": "t5"}, headers=wrong), 401, None, "invalid_api_key")
        error_of(c.get("/v1/models", headers=wrong), 401)
        error_of(c.post("/tokenize", json={"prompt": "t5"}), 401)
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    with (
        openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0) as sdk,
        pytest.raises(openai.AuthenticationError),
    ):
        sdk.models.list()
    with openai.OpenAI(base_url=live.url + "/v1", api_key="sesame", max_retries=0) as sdk:
        assert sdk.completions.create(model="hymba-fake", prompt="t5", max_tokens=1).choices[0].text == "t6"


def test_body_too_large(make_server):
    live = make_server(max_body_bytes=2048)
    big = json.dumps({"prompt": "t5 " * 1000}).encode()
    with httpx.Client(base_url=live.url) as c:
        error_of(c.post(COMPLETIONS, content=big, headers={"content-type": "application/json"}), 413)
        chunks = iter([big[:1000], big[1000:]])  # no Content-Length: sent chunked
        error_of(c.post(COMPLETIONS, content=chunks, headers={"content-type": "application/json"}), 413)
        assert c.post(COMPLETIONS, json={"prompt": "t5", "max_tokens": 1}).status_code == 200


def test_engine_failure_is_500_without_internals_and_the_worker_survives(client, fake_server):
    r = client.post(COMPLETIONS, json={"prompt": [1, FAIL_ID], "max_tokens": 4})
    err = error_of(r, 500, None, "internal_error")
    assert "on purpose" not in err["message"] and "Traceback" not in err["message"]
    assert client.post(COMPLETIONS, json={"prompt": "t5", "max_tokens": 2}).json()["choices"][0]["text"] == "t6 t7"


def test_error_after_stream_start_is_one_event_then_done(client):
    body = {"prompt": [1, FAIL_ID], "max_tokens": 4, "stream": True}
    with client.stream("POST", COMPLETIONS, json=body) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    error = json.loads(events[-3].removeprefix("data: "))
    assert set(error) == {"error"} and error["error"]["type"] == "server_error"
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["text"] == "t3"


def test_timeout_is_504_and_frees_the_worker(make_server):
    engine = FakeEngine(token_delay=0.05)
    live = make_server([engine], request_timeout=0.3)
    with httpx.Client(base_url=live.url, timeout=10) as c:
        error_of(c.post(COMPLETIONS, json={"prompt": "t5", "max_tokens": 50}), 504, None, "timeout")
        assert engine.runs[-1].num_tokens < 12  # stopped within a token of the deadline, not after 50
        assert live.metric("hymba_cancellations_total", reason="timeout") == 1
        assert c.post(COMPLETIONS, json={"prompt": "t5", "max_tokens": 2}).status_code == 200


def test_draining_is_503(make_server):
    live = make_server()
    live.ctx.queue.is_draining = True
    with httpx.Client(base_url=live.url) as c:
        error_of(c.get("/health"), 503, None, "draining")
        r = c.post(COMPLETIONS, json={"prompt": "t5"})
        error_of(r, 503, None, "draining")
        assert r.headers["retry-after"]


def test_loading_is_503():
    """Before the lifespan has started the workers (the app is built, the model not yet serving)."""
    app = build_app(Settings(model="unused"), [FakeEngine()])

    async def run():
        transport = httpx.ASGITransport(app=app)  # no lifespan: the workers never start
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/health"), await c.post(COMPLETIONS, json={"prompt": "t5"})

    health, completion = asyncio.run(run())
    error_of(health, 503, None, "loading")
    error_of(completion, 503, None, "loading")
