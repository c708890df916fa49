"""The bad-input catalogue: each malformed, out-of-range or hostile request with the exact status, param, code and
message it gets, on the real engine (hymba-odd-6L: 300 token ids, max_model_len 128 here)."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from server.settings import Settings
from tests.hardening.conftest import CHAT, COMPLETIONS, USER, error_of
from tests.server.conftest import MAX_MODEL_LEN, ODD_6L, VOCAB_SIZE, checkpoint_copy, load_engine, start_server

DETOKENIZE, TOKENIZE = "/detokenize", "/tokenize"
FINITE = "Input should be a finite number"
SURROGATE = "Input should be valid Unicode text, without lone surrogates"
LIMIT = f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested"


def context(num_prompt: int, max_tokens: int) -> str:
    return (
        f"{LIMIT} {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for the completion). "
        "Please reduce the prompt or max_tokens."
    )


def t5(**fields) -> dict:
    return {"prompt": "t5", "max_tokens": 1, **fields}


def chat(**fields) -> dict:
    return {"messages": USER, "max_tokens": 1, **fields}


# (id, path, JSON body or raw bytes, status, param, code, message)
CATALOGUE = [
    # --- not JSON, or JSON of the wrong shape ---
    ("invalid-json", COMPLETIONS, b'{"prompt": "t5",}', 400, None, None,
     "The body is not valid JSON: Expecting property name enclosed in double quotes"),
    ("truncated-json", COMPLETIONS, b'{"prompt": ', 400, None, None, "The body is not valid JSON: Expecting value"),
    ("two-documents", COMPLETIONS, b'{"prompt": "t5"}{}', 400, None, None, "The body is not valid JSON: Extra data"),
    ("deeply-nested", COMPLETIONS, b"[" * 100_000, 400, None, None,
     "The body is not valid JSON: maximum recursion depth exceeded while decoding a JSON array from a unicode string"),
    ("invalid-utf8", COMPLETIONS, b'{"prompt": "\xc3("}', 400, None, None,
     "The body is not valid JSON: 'utf-8' codec can't decode byte 0xc3 in position 12: invalid continuation byte"),
    ("array-body", COMPLETIONS, [1, 2], 400, None, None,
     "Input should be a valid dictionary or object to extract fields from"),
    ("missing-prompt", COMPLETIONS, {"max_tokens": 1}, 400, "prompt", None, "prompt: Field required"),
    # --- wrong types ---
    ("prompt-number", COMPLETIONS, {"prompt": 5}, 400, "prompt", None,
     "prompt: Input should be a valid string or a valid list"),
    ("temperature-text", COMPLETIONS, t5(temperature="hot"), 400, "temperature", None,
     "temperature: Input should be a valid number, unable to parse string as a number"),
    ("max-tokens-fraction", COMPLETIONS, t5(max_tokens=1.5), 400, "max_tokens", None,
     "max_tokens: Input should be a valid integer, got a number with a fractional part"),
    ("stream-word", COMPLETIONS, t5(stream="maybe"), 400, "stream", None,
     "stream: Input should be a valid boolean, unable to interpret input"),
    ("n-null", COMPLETIONS, t5(n=None), 400, "n", None, "n: Input should be a valid integer"),
    ("messages-string", CHAT, {"messages": "hi"}, 400, "messages", None, "messages: Input should be a valid list"),
    ("role-unknown", CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", None,
     "messages[0].role: Input should be 'system', 'developer', 'user', 'assistant' or 'tool'"),
    ("detokenize-text", DETOKENIZE, {"tokens": "t5"}, 400, "tokens", None, "tokens: Input should be a valid list"),
    # --- NaN, negative or huge sampling values (Python's JSON reader accepts NaN and Infinity) ---
    ("temperature-nan", COMPLETIONS, t5(temperature=float("nan")), 400, "temperature", None, f"temperature: {FINITE}"),
    ("temperature-negative", COMPLETIONS, t5(temperature=-0.5), 400, "temperature", None,
     "temperature: Input should be greater than or equal to 0"),
    ("temperature-huge", COMPLETIONS, t5(temperature=1e308), 400, "temperature", None,
     "temperature: Input should be less than or equal to 2"),
    ("top-p-nan", COMPLETIONS, t5(top_p=float("nan")), 400, "top_p", None, f"top_p: {FINITE}"),
    ("top-p-zero", COMPLETIONS, t5(top_p=0), 400, "top_p", None, "top_p: Input should be greater than 0"),
    ("top-p-huge", COMPLETIONS, t5(top_p=1.5), 400, "top_p", None, "top_p: Input should be less than or equal to 1"),
    ("frequency-penalty-inf", COMPLETIONS, t5(frequency_penalty=float("inf")), 400, "frequency_penalty", None,
     f"frequency_penalty: {FINITE}"),
    ("presence-penalty-negative", COMPLETIONS, t5(presence_penalty=-2.5), 400, "presence_penalty", None,
     "presence_penalty: Input should be greater than or equal to -2"),
    ("repetition-penalty-zero", COMPLETIONS, t5(repetition_penalty=0), 400, "repetition_penalty", None,
     "repetition_penalty: Input should be greater than or equal to 0.01"),
    ("repetition-penalty-tiny", COMPLETIONS, t5(repetition_penalty=1e-300), 400, "repetition_penalty", None,
     "repetition_penalty: Input should be greater than or equal to 0.01"),
    ("repetition-penalty-inf", COMPLETIONS, t5(repetition_penalty=float("inf")), 400, "repetition_penalty", None,
     f"repetition_penalty: {FINITE}"),
    ("logit-bias-nan", COMPLETIONS, t5(logit_bias={"5": float("nan")}), 400, "logit_bias.5", None,
     f"logit_bias.5: {FINITE}"),
    ("logit-bias-key", COMPLETIONS, t5(logit_bias={"²": 1}), 400, "logit_bias", None,
     "logit_bias keys must be token ids, got '²'."),
    ("seed-past-int64", COMPLETIONS, t5(seed=2**64), 400, "seed", None,
     "seed: Input should be less than or equal to 9223372036854775807"),
    ("top-k-negative", COMPLETIONS, t5(top_k=-2), 400, "top_k", None,
     "top_k: Input should be greater than or equal to -1"),
    # --- max_tokens and the context limit ---
    ("max-tokens-zero", COMPLETIONS, t5(max_tokens=0), 400, "max_tokens", None,
     "max_tokens: Input should be greater than or equal to 1"),
    ("max-tokens-negative", COMPLETIONS, t5(max_tokens=-1), 400, "max_tokens", None,
     "max_tokens: Input should be greater than or equal to 1"),
    ("max-tokens-past-context", COMPLETIONS, t5(max_tokens=MAX_MODEL_LEN), 400, "prompt", "context_length_exceeded",
     context(2, MAX_MODEL_LEN)),
    ("max-tokens-googol", COMPLETIONS, t5(max_tokens=10**100), 400, "prompt", "context_length_exceeded",
     context(2, 10**100)),
    ("chat-max-tokens-past-context", CHAT, chat(max_completion_tokens=MAX_MODEL_LEN), 400, "messages",
     "context_length_exceeded", context(4, MAX_MODEL_LEN)),  # USER renders to 4 tokens
    ("prompt-past-context", COMPLETIONS, {"prompt": [1] * MAX_MODEL_LEN}, 400, "prompt", "context_length_exceeded",
     context(MAX_MODEL_LEN, 16)),
    ("prompt-fills-context", COMPLETIONS, {"prompt": [1] * MAX_MODEL_LEN, "max_tokens": 1}, 400, "prompt",
     "context_length_exceeded", context(MAX_MODEL_LEN, 1)),
    ("chat-past-context", CHAT, {"messages": [{"role": "user", "content": "t5 " * MAX_MODEL_LEN}]}, 400, "messages",
     "context_length_exceeded", context(MAX_MODEL_LEN + 3, 1)),  # chat's default max_tokens: what is left, >= 1
    # --- empty prompts and message lists ---
    ("prompt-empty-list", COMPLETIONS, {"prompt": []}, 400, "prompt", None, "prompt must not be empty."),
    ("prompt-empty-ids", COMPLETIONS, {"prompt": [[]]}, 400, "prompt", None,
     "The prompt must hold at least one token."),
    ("prompt-one-empty-of-two", COMPLETIONS, {"prompt": [[1], []]}, 400, "prompt", None,
     "The prompt must hold at least one token."),
    ("messages-empty", CHAT, {"messages": []}, 400, "messages", None,
     "messages: List should have at least 1 item after validation, not 0"),
    ("tokenize-messages-empty", TOKENIZE, {"messages": []}, 400, "messages", None,
     "messages: List should have at least 1 item after validation, not 0"),
    ("tokenize-neither", TOKENIZE, {}, 400, "prompt", None, "Give exactly one of prompt or messages."),
    # --- token ids outside the vocabulary ---
    ("prompt-id-past-vocab", COMPLETIONS, {"prompt": [1, VOCAB_SIZE]}, 400, "prompt", None,
     f"Token id {VOCAB_SIZE} is outside the vocabulary [0, {VOCAB_SIZE})."),
    ("prompt-id-negative", COMPLETIONS, {"prompt": [[1], [-1]]}, 400, "prompt", None,
     f"Token id -1 is outside the vocabulary [0, {VOCAB_SIZE})."),
    ("prompt-id-huge", COMPLETIONS, {"prompt": [2**70]}, 400, "prompt", None,
     f"Token id {2**70} is outside the vocabulary [0, {VOCAB_SIZE})."),
    ("stop-token-id-past-vocab", COMPLETIONS, t5(stop_token_ids=[VOCAB_SIZE]), 400, "stop_token_ids", None,
     f"Token id {VOCAB_SIZE} is outside the vocabulary [0, {VOCAB_SIZE})."),
    ("logit-bias-id-past-vocab", CHAT, chat(logit_bias={str(VOCAB_SIZE): 1}), 400, "logit_bias", None,
     f"Token id {VOCAB_SIZE} is outside the vocabulary [0, {VOCAB_SIZE})."),
    ("detokenize-id-past-vocab", DETOKENIZE, {"tokens": [5, VOCAB_SIZE + 7]}, 400, "tokens", None,
     f"Token id {VOCAB_SIZE + 7} is outside the vocabulary [0, {VOCAB_SIZE})."),
    # --- lone surrogates: valid JSON escapes, not valid Unicode ---
    ("surrogate-prompt", COMPLETIONS, t5(prompt="t5 \ud800"), 400, "prompt", None, f"prompt: {SURROGATE}"),
    ("surrogate-prompt-list", COMPLETIONS, t5(prompt=["t5", "\udfff"]), 400, "prompt[1]", None,
     f"prompt[1]: {SURROGATE}"),
    ("surrogate-content", CHAT, {"messages": [{"role": "user", "content": "\udc00"}]}, 400, "messages[0].content",
     None, f"messages[0].content: {SURROGATE}"),
    ("surrogate-stop", CHAT, chat(stop=["ok", "\ud83d"]), 400, "stop[1]", None, f"stop[1]: {SURROGATE}"),
    ("surrogate-model", COMPLETIONS, t5(model="\ud800"), 400, "model", None, f"model: {SURROGATE}"),
    ("surrogate-tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "\ud800"}}]), 400,
     "tools[0].function.name", None, f"tools[0].function.name: {SURROGATE}"),
    ("surrogate-unknown-field", COMPLETIONS, t5(x_note="\ud800"), 400, "x_note", None, f"x_note: {SURROGATE}"),
    ("surrogate-tokenize", TOKENIZE, {"prompt": "\udbff"}, 400, "prompt", None, f"prompt: {SURROGATE}"),
    # --- limits: stop strings, n, logprobs ---
    ("stop-17", COMPLETIONS, t5(stop=[f"s{i}" for i in range(17)]), 400, "stop", None,
     "stop: List should have at most 16 items after validation, not 17"),
    ("n-17", COMPLETIONS, t5(n=17), 400, "n", None, "n: Input should be less than or equal to 16"),
    ("n-0", CHAT, chat(n=0), 400, "n", None, "n: Input should be greater than or equal to 1"),
    ("logprobs-21", COMPLETIONS, t5(logprobs=21), 400, "logprobs", None,
     "logprobs: Input should be less than or equal to 20"),
    ("top-logprobs-21", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None,
     "top_logprobs: Input should be less than or equal to 20"),
    ("best-of-over-n", COMPLETIONS, t5(best_of=3), 400, "best_of", None,
     "best_of must equal n; best_of > n is not supported."),
    # --- unknown model ---
    ("unknown-model", COMPLETIONS, t5(model="gpt-4"), 404, "model", "model_not_found",
     "The model 'gpt-4' does not exist."),
    ("unknown-model-chat", CHAT, chat(model="hymba-odd-6L "), 404, "model", "model_not_found",
     "The model 'hymba-odd-6L ' does not exist."),
]  # fmt: skip


@pytest.mark.parametrize(
    "path, body, status, param, code, message", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE]
)
def test_catalogue(client, path, body, status, param, code, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    error = error_of(client.post(path, content=raw, headers={"content-type": "application/json"}), status)
    assert (error["param"], error["code"], error["message"]) == (param, code, message)


def test_the_worker_is_untouched_by_the_catalogue(client, server, oracle):
    """After every refusal above, nothing ran, nothing waits, and generation is still exact."""
    assert server.metric("hymba_errors_total", type="server_error") == 0
    assert server.metric("hymba_requests_running") == 0 and server.metric("hymba_requests_waiting") == 0
    out = client.post(COMPLETIONS, json={"prompt": "t5", "max_tokens": 3, "temperature": 0}).json()
    assert out["choices"][0]["text"] == oracle.complete("t5", max_tokens=3, temperature=0).text


def test_unknown_fields_are_accepted_and_ignored(client, oracle, caplog):
    """As vLLM does: OpenAI adds fields faster than servers follow, so an unknown field is logged at debug and
    dropped, and the output is the one without it."""
    expected = oracle.complete("t5", max_tokens=3, temperature=0).text
    body = {"prompt": "t5", "max_tokens": 3, "temperature": 0, "x_future": {"nested": [1]}, "reasoning_effort": "low"}
    with caplog.at_level(logging.DEBUG, logger="hymba.protocol"):
        out = client.post(COMPLETIONS, json=body)
    assert out.status_code == 200 and out.json()["choices"][0]["text"] == expected
    assert "CompletionRequest: ignoring unknown fields ['reasoning_effort', 'x_future']" in caplog.text
    messages = [{"role": "user", "content": "t5", "x_meta": 1}]
    chat_out = client.post(CHAT, json={"messages": messages, "max_tokens": 2, "temperature": 0, "x_extra": True})
    assert chat_out.json()["choices"][0]["message"]["content"] == oracle.chat(USER, max_tokens=2, temperature=0).text


def test_lax_types_are_coerced_as_pydantic_does(client, oracle):
    """Numeric strings and "true"/"yes" are read as numbers and booleans (pydantic's lax mode, as vLLM)."""
    out = client.post(COMPLETIONS, json={"prompt": "t5", "max_tokens": "2", "temperature": "0", "echo": "false"})
    assert out.json()["choices"][0]["text"] == oracle.complete("t5", max_tokens=2, temperature=0).text


@pytest.mark.parametrize("prompt", ["", [""]], ids=["empty-string", "list-of-empty-string"])
def test_an_empty_text_prompt_is_the_bos_token(client, oracle, prompt):
    """The empty text tokenizes to [<s>]: a prompt of one token, generating from the document start, as OpenAI does."""
    out = client.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 2, "temperature": 0}).json()
    assert out["usage"]["prompt_tokens"] == 1
    assert out["choices"][0]["text"] == oracle.complete([1], max_tokens=2, temperature=0).text


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-6], ids=["denormal", "tiny", "under-epsilon"])
def test_a_vanishing_temperature_is_greedy_not_garbage(client, oracle, temperature):
    """Logits divided by ~0 overflow fp32 and sampled token 0 (<unk>) every time (found by scripts/fuzz.py)."""
    out = client.post(COMPLETIONS, json={"prompt": "t5", "max_tokens": 4, "temperature": temperature}).json()
    assert out["choices"][0]["text"] == oracle.complete("t5", max_tokens=4, temperature=0).text


def test_sixteen_stop_strings_are_allowed(client):
    r = client.post(COMPLETIONS, json=t5(stop=[f"s{i}" for i in range(16)]))
    assert r.status_code == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_10_mb_body_is_413(client, chunked):
    body = json.dumps({"prompt": "t5 " * (10 * 2**20 // 3)}).encode()
    content = iter([body[i : i + 2**20] for i in range(0, len(body), 2**20)]) if chunked else body
    r = client.post(COMPLETIONS, content=content, headers={"content-type": "application/json"})
    error = error_of(r, 413)
    assert (error["code"], error["message"]) == ("request_too_large", "Request body is larger than 4194304 bytes.")


def test_unknown_model_card_is_404(client):
    error = error_of(client.get("/v1/models/gpt-4"), 404)
    expected = ("model", "model_not_found", "The model 'gpt-4' does not exist.")
    assert (error["param"], error["code"], error["message"]) == expected


# --- chat templates from the checkpoint that raise, fail or try to leave the sandbox ---

TEMPLATE = (
    "{% set text = messages[-1]['content'] %}"
    "{% if text == 'raise' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    "{% elif text == 'divide' %}{{ 1 / 0 }}"
    "{% elif text == 'escape' %}{{ ''.__class__.__mro__[1].__subclasses__() }}"
    "{% elif text == 'globals' %}{{ raise_exception.__globals__ }}"
    "{% else %}<extra_id_1>User\n{{ text }}\n<extra_id_1>Assistant\n{% endif %}"
)
ORIGIN = "tokenizer_config.json: chat_template"


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    config = json.loads((ODD_6L / "tokenizer_config.json").read_text()) | {"chat_template": TEMPLATE}
    model_dir = checkpoint_copy(tmp_path_factory.mktemp("template"), {"tokenizer_config.json": json.dumps(config)})
    live = start_server(Settings(model=str(ODD_6L)), [load_engine(model_dir)])
    yield live
    live.stop()


@pytest.mark.parametrize(
    "content, message",
    [
        ("raise", f"{ORIGIN}: the template rejected the messages: Conversation roles must alternate user/assistant"),
        ("divide", f"{ORIGIN}: ZeroDivisionError: division by zero"),
        ("escape", f"{ORIGIN}: unsafe operation refused by the sandbox: access to attribute '__class__' of 'str' "
                   "object is unsafe"),
        ("globals", f"{ORIGIN}: unsafe operation refused by the sandbox: access to attribute '__globals__' of "
                    "'function' object is unsafe"),
    ],
)  # fmt: skip
def test_a_failing_template_is_400_naming_it(templated, content, message):
    messages = [{"role": "user", "content": content}]
    with httpx.Client(base_url=templated.url, timeout=30) as c:
        for path, body in ((CHAT, {"messages": messages, "max_tokens": 1}), (TOKENIZE, {"messages": messages})):
            error = error_of(c.post(path, json=body), 400)
            assert (error["param"], error["code"], error["message"]) == ("messages", None, message)
        assert c.post(CHAT, json={"messages": [{"role": "user", "content": "t5"}], "max_tokens": 1}).status_code == 200
