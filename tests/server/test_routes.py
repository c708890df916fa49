"""Every endpoint through the official openai SDK (sync and async, streaming and not) and raw httpx, on the real engine
serving hymba-odd-6L. Each expected output is what the oracle engine yields for the same prompt and parameters."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.server.conftest import (
    MAX_MODEL_LEN,
    MIRROR_12L,
    MODEL,
    ODD_6L,
    VOCAB_SIZE,
    checkpoint_copy,
    load_engine,
)

USER = [{"role": "user", "content": "t5"}]


def sse_events(raw: str) -> list[str]:
    """Split a raw SSE body into its `data:` payloads, checking the framing on the way."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1]), blocks
    return [b.removeprefix("data: ") for b in blocks[:-1]]


@pytest.fixture
def sdk(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_completion_sync_sdk(sdk, oracle):
    expected = oracle.complete("t5", max_tokens=3, temperature=0)
    out = sdk.completions.create(model=MODEL, prompt="t5", max_tokens=3, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL
    assert out.system_fingerprint and out.created > 0
    assert [(c.index, c.text, c.finish_reason) for c in out.choices] == [(0, expected.text, expected.finish_reason)]
    usage = (len(expected.prompt_ids), expected.num_tokens, len(expected.prompt_ids) + expected.num_tokens)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == usage


def test_completion_prompt_forms(sdk, oracle):
    by_ids = sdk.completions.create(model=MODEL, prompt=[1, 5], max_tokens=2, temperature=0)
    assert by_ids.choices[0].text == oracle.complete([1, 5], max_tokens=2, temperature=0).text
    batch = sdk.completions.create(model=MODEL, prompt=[[1, 5], [1, 9]], max_tokens=1, n=2, seed=0)
    # choice i*n + j samples prompt i with seed + j
    expected = [oracle.complete(p, max_tokens=1, seed=j).text for p in ([1, 5], [1, 9]) for j in range(2)]
    assert [(c.index, c.text) for c in batch.choices] == list(enumerate(expected))
    assert batch.usage.prompt_tokens == 4 and batch.usage.completion_tokens == 4
    texts = sdk.completions.create(model=MODEL, prompt=["t5", "t9"], max_tokens=1, temperature=0)
    assert [c.text for c in texts.choices] == [
        oracle.complete(p, max_tokens=1, temperature=0).text for p in ("t5", "t9")
    ]


def test_completion_stream_sync_sdk(sdk, oracle):
    expected = oracle.complete("t5", max_tokens=3, temperature=0)
    stream = sdk.completions.create(
        model=MODEL, prompt="t5", max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.num_tokens
    assert len({c.id for c in chunks}) == 1


def test_chat_sync_sdk(sdk, oracle):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "t5"}]
    expected = oracle.chat(messages, max_tokens=2, temperature=0)
    assert expected.text  # some visible text (an <unk> token has none)
    out = sdk.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=2, temperature=0)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(expected.prompt_ids), expected.num_tokens)


def test_chat_roles_and_text_parts(sdk, client, oracle):
    messages = [
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "t5 "}, {"type": "text", "text": "t6"}]},
        {"role": "assistant", "content": "t7"},
        {"role": "tool", "content": "t8", "tool_call_id": "call_1"},
    ]
    as_the_template_sees_them = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "t5 t6"},
        {"role": "assistant", "content": "t7"},
        {"role": "tool", "content": "t8", "tool_call_id": "call_1"},
    ]
    expected = oracle.chat(as_the_template_sees_them, max_tokens=3, temperature=0)
    rendered = oracle.tokenizer.decode(expected.prompt_ids, skip_special_tokens=False)
    assert "t5 t6" in rendered and "t7" in rendered and "t8" in rendered
    assert client.post("/tokenize", json={"messages": messages}).json()["tokens"] == expected.prompt_ids
    out = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    assert out.usage.prompt_tokens == len(expected.prompt_ids)
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (expected.text, expected.finish_reason)


def test_chat_stream_async_sdk(server, oracle):
    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=USER,
                max_tokens=3,
                n=2,
                seed=1,
                temperature=0.7,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    expected = [oracle.chat(USER, max_tokens=3, temperature=0.7, seed=1 + j) for j in range(2)]
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert mine[-1].finish_reason == expected[index].finish_reason and not mine[-1].delta.content
        assert "".join(c.delta.content or "" for c in mine) == expected[index].text
    assert chunks[-1].usage.completion_tokens == sum(e.num_tokens for e in expected)


def test_completion_async_sdk(server, oracle):
    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(
                *(
                    client.completions.create(model=MODEL, prompt=[1, p], max_tokens=2, temperature=0)
                    for p in (5, 9, 20)
                )
            )

    expected = [oracle.complete([1, p], max_tokens=2, temperature=0).text for p in (5, 9, 20)]
    assert [r.choices[0].text for r in asyncio.run(run())] == expected


def test_completion_logprobs_and_echo(sdk, oracle):
    expected = oracle.complete([1, 5], max_tokens=2, temperature=0, logprobs=2, prompt_logprobs=2)
    out = sdk.completions.create(model=MODEL, prompt=[1, 5], max_tokens=2, temperature=0, logprobs=2, echo=True)
    choice = out.choices[0]
    assert choice.text == "t5" + expected.text  # the prompt decoded (no special tokens), then the completion
    token_text = [oracle.tokenizer.decode([i], skip_special_tokens=False) for i in [1, 5, *expected.token_ids]]
    lp = choice.logprobs
    assert lp.tokens == token_text and token_text[:2] == ["<s>", "t5"]
    prompt_logprob = expected.events[0].prompt_logprobs[1]
    generated = [e.logprob for e in expected.events]
    assert lp.token_logprobs == [None] + [pytest.approx(e.logprob, abs=1e-6) for e in (prompt_logprob, *generated)]
    assert lp.top_logprobs[0] is None
    for top, entry in zip(lp.top_logprobs[1:], (prompt_logprob, *generated), strict=True):
        want = {oracle.tokenizer.decode([t], skip_special_tokens=False): lp for t, lp in entry.top}
        want.setdefault(oracle.tokenizer.decode([entry.token_id], skip_special_tokens=False), entry.logprob)
        assert top == pytest.approx(want, abs=1e-6)
    assert lp.text_offset == [sum(map(len, token_text[:i])) for i in range(len(token_text))]


def test_chat_logprobs_layout(sdk, oracle):
    expected = oracle.chat(USER, max_tokens=2, temperature=0, logprobs=3)
    out = sdk.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=2, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == expected.num_tokens and all(len(c.top_logprobs) == 3 for c in content)
    for got, event in zip(content, expected.events, strict=True):
        assert got.token == oracle.tokenizer.decode([event.token_id], skip_special_tokens=False)
        assert got.bytes == list(got.token.encode()) and got.logprob == pytest.approx(event.logprob.logprob, abs=1e-6)
        want = [oracle.tokenizer.decode([t], skip_special_tokens=False) for t, _ in event.logprob.top]
        assert [t.token for t in got.top_logprobs] == want
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([lp for _, lp in event.logprob.top], abs=1e-6)
    assert content[0].top_logprobs[0].token == content[0].token  # greedy: the chosen token is the likeliest


def test_stop_and_extensions_reach_the_engine(sdk, server, oracle, record_requests):
    seen = record_requests(server.engine)
    extensions = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 1, "ignore_eos": True}
    stop = oracle.complete("t5", max_tokens=5, temperature=0, **extensions).texts[2].strip()  # the third word
    expected = oracle.complete("t5", max_tokens=5, temperature=0, stop=(stop,), **extensions)
    assert expected.finish_reason == "stop"
    out = sdk.completions.create(
        model=MODEL, prompt="t5", max_tokens=5, temperature=0, stop=[stop], extra_body=extensions
    )
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected.text, "stop")
    params = seen[-1].params
    assert (params.top_k, params.min_p, params.repetition_penalty, params.min_tokens) == (5, 0.1, 1.1, 1)
    assert params.ignore_eos and params.stop == (stop,)

    stop_id = oracle.complete("t5", max_tokens=5, temperature=0).token_ids[1]  # the second token
    expected = oracle.complete("t5", max_tokens=5, temperature=0, stop_token_ids=(stop_id,))
    assert expected.finish_reason == "stop"
    out = sdk.completions.create(
        model=MODEL, prompt="t5", max_tokens=5, temperature=0, extra_body={"stop_token_ids": [stop_id]}
    )
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected.text, "stop")


def test_sampling_fields_map_to_params(client, server, oracle, record_requests):
    seen = record_requests(server.engine)
    body = {
        "prompt": "t5",
        "max_tokens": 4,
        "temperature": 0.5,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"7": 5},
        "seed": 3,
        "user": "someone",
    }
    out = client.post("/v1/completions", json=body)
    assert out.status_code == 200
    params = seen[-1].params
    assert (params.temperature, params.top_p) == (0.5, 0.9)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert params.logit_bias == {7: 5.0} and params.seed == 3 and params.max_tokens == 4
    expected = oracle.complete(
        "t5", max_tokens=4, temperature=0.5, top_p=0.9, presence_penalty=0.5, frequency_penalty=-0.5,
        logit_bias={7: 5.0}, seed=3,
    )  # fmt: skip
    assert out.json()["choices"][0]["text"] == expected.text


def test_raw_sse_framing_completions(client, oracle):
    expected = oracle.complete("t5", max_tokens=2, temperature=0)
    body = {"prompt": "t5", "max_tokens": 2, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["text"] for c in chunks] == expected.texts  # one chunk per token
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason


def test_raw_sse_framing_chat(client, oracle):
    expected = oracle.chat(USER, max_tokens=4, temperature=0)
    assert "" in expected.texts and expected.text  # tokens without text (here <unk>) make no chunk
    body = {"messages": USER, "max_tokens": 4, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(e) for e in sse_events(r.read().decode())[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]] == [t for t in expected.texts if t]
    last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": expected.finish_reason}
    assert chunks[-1]["choices"][0] == last


def test_models_endpoints(sdk, client):
    models = sdk.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert sdk.models.retrieve(MODEL).id == MODEL
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == MAX_MODEL_LEN


def test_tokenize_detokenize(client, oracle):
    ids = oracle.tokenizer.encode("t5 t6")
    assert len(ids) == 3 and ids[0] == oracle.tokenizer.bos_token_id
    r = client.post("/tokenize", json={"prompt": "t5 t6"})
    assert r.json() == {"count": 3, "max_model_len": MAX_MODEL_LEN, "tokens": ids}
    r = client.post("/tokenize", json={"prompt": "t5 t6", "add_special_tokens": False})
    assert r.json()["tokens"] == ids[1:]
    chat = client.post("/tokenize", json={"messages": USER}).json()
    assert chat["tokens"] == oracle.tokenizer.encode_chat(USER) and chat["count"] == len(chat["tokens"]) > 1
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "t5 t6"}
    assert client.post("/detokenize", json={"tokens": [VOCAB_SIZE]}).status_code == 400


def test_health_version_docs(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/version").json() == {"version": "0.1.0"}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/health"} <= set(paths)


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(make_server):
    live = make_server([load_engine(max_model_len=32)])  # a short context: the default is the rest of it
    body = {"messages": USER, "ignore_eos": True}
    out = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert out["usage"]["total_tokens"] == 32 and out["choices"][0]["finish_reason"] == "length"


def test_generation_config_defaults_are_used_unless_the_request_says(make_server, oracle, record_requests, tmp_path):
    generation_config = json.loads((ODD_6L / "generation_config.json").read_text()) | {"temperature": 0.3, "top_k": 7}
    model_dir = checkpoint_copy(tmp_path, {"generation_config.json": json.dumps(generation_config)})
    live = make_server([load_engine(model_dir)])
    seen = record_requests(live.engine)
    sampled = oracle.complete("t5", max_tokens=8, seed=5, temperature=0.3, top_k=7)
    assert sampled.text != oracle.complete("t5", max_tokens=8, seed=5).text  # so the defaults show in the text
    with httpx.Client(base_url=live.url, timeout=30) as c:
        out = c.post("/v1/completions", json={"prompt": "t5", "max_tokens": 8, "seed": 5}).json()
        params = seen[-1].params
        assert (params.temperature, params.top_k, params.top_p) == (0.3, 7, 1.0)
        assert out["choices"][0]["text"] == sampled.text
        out = c.post("/v1/completions", json={"prompt": "t5", "max_tokens": 8, "temperature": 0}).json()
        assert seen[-1].params.temperature == 0
        assert out["choices"][0]["text"] == oracle.complete("t5", max_tokens=8, temperature=0, top_k=7).text


def test_cors(make_server):
    live = make_server(cors_origins=("http://app.example",))
    headers = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(live.url + "/v1/completions", headers=headers)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.options(live.url + "/v1/completions", headers=headers | {"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_a_bpe_tokenizer_round_trips_utf8(make_server, tiny_tokenizer_dir, tmp_path):
    # hymba-mirror-12L's vocabulary (512) holds the tiny tokenizer's ids (< 400)
    files = {name: tiny_tokenizer_dir / name for name in ("tokenizer.json", "tokenizer_config.json")}
    live = make_server([load_engine(checkpoint_copy(tmp_path, files, MIRROR_12L), max_model_len=None)])
    text = "We had coffee at the café. Hello world!"
    with httpx.Client(base_url=live.url) as c:
        tokens = c.post("/tokenize", json={"prompt": text}).json()["tokens"]
        assert tokens[0] == 1 and len(tokens) > 3
        assert c.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": text}
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()["tokens"]
        rendered = c.post("/detokenize", json={"tokens": chat}).json()["prompt"]
        assert text in rendered and "Assistant" in rendered
