"""The real engine behind the API: a conformance checkpoint served over HTTP returns its golden greedy tokens,
with top logprobs equal to the log-softmax of the golden logits; and the SDK works end to end against it."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, ODD_6L

safetensors_numpy = pytest.importorskip("safetensors.numpy")
np = pytest.importorskip("numpy")

NUM_TOP = 5
CASES = [f"case{k}" for k in range(5)]


@pytest.fixture(scope="module")
def vectors() -> dict:
    return safetensors_numpy.load_file(str(ODD_6L / "vectors.safetensors"))


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    shifted = row - row.max()
    return shifted - math.log(np.exp(shifted).sum())


def token_id(token: str) -> int:
    """The word-level tokenizer of the conformance checkpoints: id i >= 3 is `t<i>`; 0..2 are specials."""
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return specials[token] if token in specials else int(token.removeprefix("t"))


@pytest.mark.parametrize("case", CASES)
def test_greedy_completion_matches_the_goldens(server, vectors, case):
    prompt = [int(i) for i in vectors[f"{case}.prompt_ids"]]
    gen_ids = [int(i) for i in vectors[f"{case}.gen_ids"]]
    body = {
        "prompt": prompt,
        "max_tokens": len(gen_ids),
        "temperature": 0,
        "logprobs": NUM_TOP,
        "ignore_eos": True,  # the goldens feed EOS back like any token
    }
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert [token_id(t) for t in lp["tokens"]] == gen_ids
    assert choice["finish_reason"] == "length"
    for step, (top, chosen) in enumerate(zip(lp["top_logprobs"], lp["token_logprobs"], strict=True)):
        golden = log_softmax(vectors[f"{case}.gen_logits"][step])
        assert abs(chosen - golden[gen_ids[step]]) < 1e-3
        assert len(top) >= NUM_TOP
        for token, logprob in top.items():
            assert abs(logprob - golden[token_id(token)]) < 1e-3, (step, token)
        assert set(golden.argsort()[-NUM_TOP:].tolist()) <= {token_id(t) for t in top}  # the k most likely


def test_streaming_greedy_equals_non_streaming(server, vectors):
    prompt = [int(i) for i in vectors["case1.prompt_ids"]]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as sdk:
        whole = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        streamed = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert text == whole.choices[0].text and whole.usage.completion_tokens <= 12


def test_chat_through_the_checkpoint_template(server):
    messages = [{"role": "system", "content": "t7"}, {"role": "user", "content": "t5 t6"}]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as sdk:
        out = sdk.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
        )
        chunks = list(
            sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True)
        )
    assert out.choices[0].finish_reason in ("stop", "length")
    assert len(out.choices[0].logprobs.content) == out.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    tokens = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert tokens["count"] == out.usage.prompt_tokens


def test_seeded_sampling_is_reproducible_and_n_choices_differ(server, oracle):
    body = {"prompt": [1, 5, 6, 7], "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 2, "ignore_eos": True}
    first = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    second = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in second["choices"]]
    expected = [oracle.complete([1, 5, 6, 7], max_tokens=8, seed=11 + j, ignore_eos=True).text for j in range(2)]
    assert texts == expected and texts[0] != texts[1]  # choice j samples with seed + j
    assert first["usage"]["completion_tokens"] == 16
