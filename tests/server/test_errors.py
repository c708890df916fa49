"""Every error path: exact status, OpenAI's error body, the right `param`, and nothing internal leaked."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from server.app import build_app
from server.settings import Settings
from tests.server.conftest import MAX_MODEL_LEN, MODEL, ODD_6L, VOCAB_SIZE, wait_until

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
        (COMPLETIONS, {"prompt": [1, VOCAB_SIZE]}, "prompt"),
        (COMPLETIONS, {"prompt": "t5", "suffix": "t9"}, "suffix"),
        (COMPLETIONS, {"prompt": "t5", "best_of": 2}, "best_of"),
        (COMPLETIONS, {"prompt": "t5", "stream_options": {"include_usage": True}}, "stream_options"),
        (COMPLETIONS, {"prompt": "t5", "logit_bias": {str(VOCAB_SIZE): 1}}, "logit_bias"),
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
    num_prompt_tokens = MAX_MODEL_LEN - 4
    body = {"prompt": [1] * num_prompt_tokens, "max_tokens": 10}
    err = error_of(client.post(COMPLETIONS, json=body), 400, "prompt", "context_length_exceeded")
    assert f"{MAX_MODEL_LEN} tokens" in err["message"] and f"{num_prompt_tokens} in the prompt" in err["message"]
    assert "10 for the completion" in err["message"]
    chat = client.post(CHAT, json={"messages": [{"role": "user", "content": " ".join(["t5"] * MAX_MODEL_LEN)}]})
    error_of(chat, 400, "messages", "context_length_exceeded")


def test_sdk_raises_bad_request(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.BadRequestError) as e:
            sdk.completions.create(model=MODEL, prompt="t5", suffix="!")
        assert e.value.status_code == 400 and e.value.body["param"] == "suffix"
        with pytest.raises(openai.NotFoundError):
            sdk.completions.create(model="gpt-4", prompt="t5")


def test_unknown_model_route_and_method(client):
    error_of(client.post(COMPLETIONS, json={"model": "gpt-4", "prompt": "t5"}), 404, "model", "model_not_found")
    error_of(client.get("/v1/models/gpt-4"), 404, "model", "model_not_found")
    error_of(client.get("/v1/nothing-here"), 404, None, "not_found")
    error_of(client.get(COMPLETIONS), 405, None, "method_not_allowed")


def test_api_key(make_server, oracle):
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
        out = sdk.completions.create(model=MODEL, prompt="t5", max_tokens=2, temperature=0)
        assert out.choices[0].text == oracle.complete("t5", max_tokens=2, temperature=0).text


def test_body_too_large(make_server):
    live = make_server(max_body_bytes=2048)
    big = json.dumps({"prompt": "t5 " * 1000}).encode()
    with httpx.Client(base_url=live.url) as c:
        error_of(c.post(COMPLETIONS, content=big, headers={"content-type": "application/json"}), 413)
        chunks = iter([big[:1000], big[1000:]])  # no Content-Length: sent chunked
        error_of(c.post(COMPLETIONS, content=chunks, headers={"content-type": "application/json"}), 413)
        assert c.post(COMPLETIONS, json={"prompt": "t5", "max_tokens": 1}).status_code == 200


def test_engine_failure_is_500_without_internals_and_the_worker_survives(client, server, oracle, decode_hook):
    decode_hook(server.engine).num_failures = 1  # the first token comes from prefill; decoding the second fails
    r = client.post(COMPLETIONS, json={"prompt": "t5", "max_tokens": 4, "ignore_eos": True})
    err = error_of(r, 500, None, "internal_error")
    assert "on purpose" not in err["message"] and "Traceback" not in err["message"]
    out = client.post(COMPLETIONS, json={"prompt": "t5", "max_tokens": 2, "temperature": 0}).json()
    assert out["choices"][0]["text"] == oracle.complete("t5", max_tokens=2, temperature=0).text


def test_error_after_stream_start_is_one_event_then_done(client, server, oracle, decode_hook):
    decode_hook(server.engine).num_failures = 1
    body = {"prompt": "t5", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True}
    with client.stream("POST", COMPLETIONS, json=body) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert len(events) == 4 and events[-2:] == ["data: [DONE]", ""]
    error = json.loads(events[1].removeprefix("data: "))
    assert set(error) == {"error"} and error["error"]["type"] == "server_error"
    first = oracle.complete("t5", max_tokens=4, temperature=0, ignore_eos=True).texts[0]
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["text"] == first


def test_timeout_is_504_and_frees_the_worker(make_server, decode_hook):
    live = make_server(request_timeout=0.3)
    hook = decode_hook(live.engine)
    hook.delay = 0.05  # 100 tokens would take 5 s
    with httpx.Client(base_url=live.url, timeout=30) as c:
        body = {"prompt": "t5", "max_tokens": 100, "ignore_eos": True}
        error_of(c.post(COMPLETIONS, json=body), 504, None, "timeout")
        answered_at = time.monotonic()
        assert live.metric("hymba_cancellations_total", reason="timeout") == 1
        wait_until(lambda: live.metric("hymba_requests_finished_total", finish_reason="cancelled") == 1)
        assert hook.num_started_after(answered_at) <= 1  # cancelled before the 504 was sent: one token at most
        assert live.metric("hymba_generated_tokens_total") < 100
        hook.delay = 0
        assert c.post(COMPLETIONS, json={"prompt": "t5", "max_tokens": 2}).status_code == 200


def test_draining_is_503(make_server):
    live = make_server()
    live.ctx.queue.is_draining = True
    with httpx.Client(base_url=live.url) as c:
        error_of(c.get("/health"), 503, None, "draining")
        r = c.post(COMPLETIONS, json={"prompt": "t5"})
        error_of(r, 503, None, "draining")
        assert r.headers["retry-after"]


def test_loading_is_503(engine):
    """Before the lifespan has started the workers (the app is built, the model not yet serving)."""
    app = build_app(Settings(model=str(ODD_6L)), [engine])

    async def run():
        transport = httpx.ASGITransport(app=app)  # no lifespan: the workers never start
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/health"), await c.post(COMPLETIONS, json={"prompt": "t5"})

    health, completion = asyncio.run(run())
    error_of(health, 503, None, "loading")
    error_of(completion, 503, None, "loading")
