"""Every endpoint through the official openai SDK (sync and async, streaming and not) and raw httpx, on FakeEngine.

FakeEngine continues a prompt ending in id P with P + 1, P + 2, ..., so `t5` (ids [1, 5]) continues t6 t7 t8 ...
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.server.fake_engine import VOCAB, FakeEngine

MODEL = "hymba-fake"


def sse_events(raw: str) -> list[str]:
    """Split a raw SSE body into its `data:` payloads, checking the framing on the way."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1]), blocks
    return [b.removeprefix("data: ") for b in blocks[:-1]]


@pytest.fixture
def sdk(fake_server):
    with openai.OpenAI(base_url=fake_server.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_completion_sync_sdk(sdk):
    out = sdk.completions.create(model=MODEL, prompt="t5", max_tokens=3, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL
    assert out.system_fingerprint and out.created > 0
    assert [(c.index, c.text, c.finish_reason) for c in out.choices] == [(0, "t6 t7 t8", "length")]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (2, 3, 5)


def test_completion_prompt_forms(sdk):
    by_ids = sdk.completions.create(model=MODEL, prompt=[1, 5], max_tokens=2)
    assert by_ids.choices[0].text == "t6 t7"
    batch = sdk.completions.create(model=MODEL, prompt=[[1, 5], [1, 9]], max_tokens=1, n=2, seed=0)
    assert [(c.index, c.text) for c in batch.choices] == [(0, "t6"), (1, "t7"), (2, "t10"), (3, "t11")]
    assert batch.usage.prompt_tokens == 4 and batch.usage.completion_tokens == 4
    texts = sdk.completions.create(model=MODEL, prompt=["t5", "t9"], max_tokens=1, temperature=0)
    assert [c.text for c in texts.choices] == ["t6", "t10"]


def test_completion_stream_sync_sdk(sdk):
    stream = sdk.completions.create(
        model=MODEL, prompt="t5", max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "t6 t7 t8"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1


def test_chat_sync_sdk(sdk):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "t5"}]
    out = sdk.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=2)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 2 and out.usage.prompt_tokens > 2


def test_chat_roles_and_text_parts(sdk, fake_server):
    messages = [
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "t5 "}, {"type": "text", "text": "t6"}]},
        {"role": "assistant", "content": "t7"},
        {"role": "tool", "content": "t8", "tool_call_id": "call_1"},
    ]
    out = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    prompt = fake_server.engines[0].runs[-1].request.prompt_ids
    rendered = fake_server.engines[0].tokenizer.decode(prompt, skip_special_tokens=False)
    assert "t5 t6" in rendered and "t7" in rendered and "t8" in rendered
    assert out.choices[0].finish_reason == "length"


def test_chat_stream_async_sdk(fake_server):
    async def run():
        async with openai.AsyncOpenAI(base_url=fake_server.url + "/v1", api_key="x", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "t5"}],
                max_tokens=3,
                n=2,
                seed=1,
                temperature=0.7,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert mine[-1].finish_reason == "length" and not mine[-1].delta.content
        assert len("".join(c.delta.content or "" for c in mine).split()) == 3
    assert chunks[-1].usage.completion_tokens == 6


def test_completion_async_sdk(fake_server):
    async def run():
        async with openai.AsyncOpenAI(base_url=fake_server.url + "/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(
                *(client.completions.create(model=MODEL, prompt=[1, p], max_tokens=2) for p in (5, 9, 20))
            )

    assert [r.choices[0].text for r in asyncio.run(run())] == ["t6 t7", "t10 t11", "t21 t22"]


def test_completion_logprobs_and_echo(sdk):
    out = sdk.completions.create(model=MODEL, prompt=[1, 5], max_tokens=2, logprobs=2, echo=True)
    choice = out.choices[0]
    assert choice.text == "t5t6 t7"  # the prompt decoded (no special tokens), then the completion
    lp = choice.logprobs
    assert lp.tokens == ["<s>", "t5", "t6", "t7"]
    assert lp.token_logprobs == [None, -1.0, pytest.approx(-0.1), pytest.approx(-0.2)]
    assert lp.top_logprobs[0] is None and lp.top_logprobs[2] == {"t6": pytest.approx(-0.1), "t7": pytest.approx(-1.1)}
    assert lp.text_offset == [0, 3, 5, 7]


def test_chat_logprobs_layout(sdk):
    out = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "t5"}], max_tokens=2, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 2 and len(content[0].top_logprobs) == 3
    assert content[0].bytes == list(content[0].token.encode())
    assert content[0].top_logprobs[0].token == content[0].token


def test_stop_and_extensions_reach_the_engine(sdk, fake_server):
    out = sdk.completions.create(
        model=MODEL,
        prompt="t5",
        max_tokens=5,
        stop=["t8"],
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 1, "ignore_eos": True},
    )
    assert out.choices[0].text == "t6 t7 " and out.choices[0].finish_reason == "stop"
    params = fake_server.engines[0].runs[-1].request.params
    assert (params.top_k, params.min_p, params.repetition_penalty, params.min_tokens) == (5, 0.1, 1.1, 1)
    assert params.ignore_eos and params.stop == ("t8",)
    out = sdk.completions.create(model=MODEL, prompt="t5", max_tokens=5, extra_body={"stop_token_ids": [7]})
    assert out.choices[0].text == "t6" and out.choices[0].finish_reason == "stop"


def test_sampling_fields_map_to_params(client, fake_server):
    body = {
        "prompt": "t5",
        "max_tokens": 1,
        "temperature": 0.5,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"7": 5},
        "seed": 3,
        "user": "someone",
    }
    assert client.post("/v1/completions", json=body).status_code == 200
    params = fake_server.engines[0].runs[-1].request.params
    assert (params.temperature, params.top_p) == (0.5, 0.9)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert params.logit_bias == {7: 5.0} and params.seed == 3 and params.max_tokens == 1


def test_raw_sse_framing_completions(client):
    with client.stream("POST", "/v1/completions", json={"prompt": "t5", "max_tokens": 2, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["text"] for c in chunks] == ["t6", " t7"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_raw_sse_framing_chat(client):
    body = {"messages": [{"role": "user", "content": "t5"}], "max_tokens": 2, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(e) for e in sse_events(r.read().decode())[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_models_endpoints(sdk, client):
    models = sdk.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert sdk.models.retrieve(MODEL).id == MODEL
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 64


def test_tokenize_detokenize(client):
    r = client.post("/tokenize", json={"prompt": "t5 t6"})
    assert r.json() == {"count": 3, "max_model_len": 64, "tokens": [1, 5, 6]}
    r = client.post("/tokenize", json={"prompt": "t5 t6", "add_special_tokens": False})
    assert r.json()["tokens"] == [5, 6]
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "t5"}]}).json()
    assert chat["count"] == len(chat["tokens"]) > 1
    assert client.post("/detokenize", json={"tokens": [1, 5, 6]}).json() == {"prompt": "t5 t6"}
    assert client.post("/detokenize", json={"tokens": [VOCAB]}).status_code == 400


def test_health_version_docs(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/version").json() == {"version": "0.1.0"}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/health"} <= set(paths)


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(client, fake_server):
    body = {"messages": [{"role": "user", "content": "t5"}]}
    out = client.post("/v1/chat/completions", json=body).json()
    run = fake_server.engines[0].runs[-1]
    assert run.request.params.max_tokens == 64 - len(run.request.prompt_ids)
    assert out["usage"]["completion_tokens"] == run.request.params.max_tokens


def test_generation_config_defaults_are_used_unless_the_request_says(make_server):
    engine = FakeEngine(defaults={"temperature": 0.3, "top_k": 7})
    live = make_server([engine])
    with httpx.Client(base_url=live.url) as c:
        c.post("/v1/completions", json={"prompt": "t5", "max_tokens": 1})
        params = engine.runs[-1].request.params
        assert (params.temperature, params.top_k, params.top_p) == (0.3, 7, 1.0)
        c.post("/v1/completions", json={"prompt": "t5", "max_tokens": 1, "temperature": 0})
        assert engine.runs[-1].request.params.temperature == 0


def test_cors(make_server):
    live = make_server(cors_origins=("http://app.example",))
    headers = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(live.url + "/v1/completions", headers=headers)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.options(live.url + "/v1/completions", headers=headers | {"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_a_bpe_tokenizer_round_trips_utf8(make_server, tiny_tokenizer_dir):
    live = make_server([FakeEngine(tokenizer_dir=tiny_tokenizer_dir)])
    text = "We had coffee at the café. Hello world!"
    with httpx.Client(base_url=live.url) as c:
        tokens = c.post("/tokenize", json={"prompt": text}).json()["tokens"]
        assert tokens[0] == 1 and len(tokens) > 3
        assert c.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": text}
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()["tokens"]
        rendered = c.post("/detokenize", json={"tokens": chat}).json()["prompt"]
        assert text in rendered and "Assistant" in rendered
