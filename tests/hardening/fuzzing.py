"""Hypothesis strategies for every operation in the server's own OpenAPI document, and the check each response must
pass. Used by test_fuzz.py (a small budget in CI) and scripts/fuzz.py (1,000+ cases per operation).

A case is one HTTP request: a body valid by the schema (unknown fields added at times), a valid body with one field
replaced by any JSON value, any JSON value, or raw bytes (cut-off JSON, invalid UTF-8, NaN literals); with junk in
the query string and, at times, an odd Content-Type. The schema bounds nothing that costs generation time, so valid
bodies keep `n`, `max_tokens` and list sizes small (CAPS); mutated bodies are unbounded and must be refused cleanly.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import strategies as st

# Valid values the schema allows but that would make a case slow: max_tokens up to 10**9, n up to 16, long lists.
CAPS = {"max_tokens": 6, "max_completion_tokens": 6, "n": 2, "best_of": 2, "min_tokens": 3, "logprobs": 5}
MAX_LIST = 3
MAX_TEXT = 24


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # as the schema spells it, e.g. /v1/models/{model_id}
    body_schema: dict | None
    path_params: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Case:
    method: str
    url: str
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    kind: str = "valid"  # valid, mutated, any-json, raw, no-body

    def send(self, client: httpx.Client) -> httpx.Response:
        return client.request(self.method, self.url, content=self.content, headers=self.headers)


def operations(openapi: Mapping[str, Any]) -> list[Operation]:
    ops = []
    for path, methods in openapi["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            params = tuple(p["name"] for p in op.get("parameters", []) if p["in"] == "path")
            ops.append(Operation(method.upper(), path, body, params))
    return ops


# --- JSON values ---

# Text as a client may send it: any code point, lone surrogates included (json.dumps writes them as \udXXX escapes).
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=MAX_TEXT) | st.sampled_from(
    ["", "t5", "t5 t9", " ", "\n", "</s>", "<s>", "{{ 7*7 }}", "\x00", "é", "\ud800", "😀"]
)
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e308, -1e-308, 2.0000001])
integers = st.integers() | st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30])
scalars = st.none() | st.booleans() | integers | numbers | texts
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=MAX_LIST) | st.dictionaries(texts, inner, max_size=MAX_LIST),
    max_leaves=8,
)


def from_schema(schema: Mapping[str, Any], root: Mapping[str, Any], name: str = "") -> st.SearchStrategy:
    """Values valid by one JSON Schema node (the subset FastAPI emits), within CAPS for the property `name`."""
    if "$ref" in schema:
        return from_schema(from_ref(schema["$ref"], root), root, name)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, root, name) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return texts
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -math.inf) + 1)
        high = min(schema.get("maximum", math.inf), CAPS.get(name, math.inf))
        low, high = (None if math.isinf(low) else int(low)), (None if math.isinf(high) else int(high))
        if name in ("prompt", "tokens", "stop_token_ids", "logit_bias"):  # token ids: mostly near the vocabulary
            return st.integers(-2, 320) | st.integers(low, high)
        return st.integers(low, high)
    if kind == "number":
        low, high = schema.get("minimum"), schema.get("maximum")
        exclusive_low = "exclusiveMinimum" in schema
        if exclusive_low:
            low = schema["exclusiveMinimum"]
        return st.floats(low, high, exclude_min=exclusive_low, allow_nan=False, allow_infinity=False)
    if kind == "array":
        items = from_schema(schema.get("items", {}), root, name) if schema.get("items") else json_values
        max_size = min(schema.get("maxItems", MAX_LIST), MAX_LIST)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=max_size)
    if kind == "object" or "properties" in schema:
        return _object(schema, root)
    return json_values  # {}: anything


def _object(schema: Mapping[str, Any], root: Mapping[str, Any]) -> st.SearchStrategy:
    properties = schema.get("properties", {})
    required = set(schema.get("required", ()))
    strategies = {key: from_schema(sub, root, key) for key, sub in properties.items()}
    fixed = st.fixed_dictionaries(
        {k: v for k, v in strategies.items() if k in required},
        optional={k: v for k, v in strategies.items() if k not in required},
    )
    extra = schema.get("additionalProperties", False)
    if not properties:  # a free-form dict (logit_bias, tools): keys are text; logit_bias keys are meant as token ids
        values = from_schema(extra, root, "logit_bias") if isinstance(extra, dict) else json_values
        keys = texts | st.integers(-2, 320).map(str)
        return st.dictionaries(keys, values, max_size=MAX_LIST)
    if extra is not False:  # unknown fields are accepted and ignored: send some
        unknown = st.dictionaries(st.text(string.ascii_lowercase + "_", min_size=1).map("x_".__add__), json_values)
        return st.tuples(fixed, unknown.filter(lambda d: len(d) <= 2)).map(lambda t: {**t[1], **t[0]})
    return fixed


def _mutated(valid: st.SearchStrategy, schema: Mapping[str, Any], root: Mapping[str, Any]) -> st.SearchStrategy:
    """A valid body with one known field (or a required one dropped) replaced by any JSON value."""
    while "$ref" in schema:
        schema = from_ref(schema["$ref"], root)
    keys = sorted(schema.get("properties", {}))

    @st.composite
    def mutate(draw):
        body = dict(draw(valid))
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()) and key in body:
            del body[key]
        else:
            body[key] = draw(json_values)
        return body

    return mutate()


def from_ref(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    target = root
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return target


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()  # allow_nan: NaN and Infinity literals, as Python clients send them


raw_bodies = st.binary(max_size=64) | st.sampled_from(
    [b"", b"{", b'{"prompt": ', b"\xff\xfe{}", b'{"prompt": "\xc3"}', b"[" * 5000, b'{"prompt": "t5"}' * 2, b"null"]
)
content_types = st.sampled_from(
    ["application/json", "application/json", "application/json", "text/plain", "application/x-www-form-urlencoded"]
)
query_strings = st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=5), texts, max_size=2)


def _quoted(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def cases(op: Operation, root: Mapping[str, Any], model_name: str) -> st.SearchStrategy[Case]:
    @st.composite
    def case(draw) -> Case:
        path = op.path
        for name in op.path_params:
            value = draw(st.just(model_name) | texts.filter(bool))
            path = path.replace("{" + name + "}", _quoted(value))
        query = "&".join(f"{k}={_quoted(v)}" for k, v in draw(query_strings).items())
        url = f"{path}?{query}" if query else path
        if op.body_schema is None:
            return Case(op.method, url, kind="no-body")
        valid = from_schema(op.body_schema, root)
        kind = draw(st.sampled_from(["valid"] * 5 + ["mutated"] * 3 + ["any-json", "raw"]))
        if kind == "valid":
            value = draw(valid)
            if "model" in value and draw(st.integers(0, 3)):  # mostly the served model, else a 404 every time
                value["model"] = model_name
            body = _encode(value)
        elif kind == "mutated":
            body = _encode(draw(_mutated(valid, op.body_schema, root)))
        elif kind == "any-json":
            body = _encode(draw(json_values))
        else:
            body = draw(raw_bodies)
        headers = {"content-type": draw(content_types) if kind != "valid" else "application/json"}
        return Case(op.method, url, body, headers, kind)

    return case()


# --- the check every response must pass ---


def check_response(case: Case, r: httpx.Response) -> None:
    """No 5xx; every error in OpenAI's shape with nothing internal; a stream framed as SSE, ending with [DONE]."""
    assert r.status_code < 500, f"{r.status_code} for {case}: {r.text[:500]}"
    assert "Traceback" not in r.text and 'File "' not in r.text, r.text[:500]
    if r.status_code >= 400:
        check_error(r.json())
        return
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        raw = r.text
        assert raw.endswith("data: [DONE]\n\n"), raw[-300:]
        for block in raw.split("\n\n")[:-2]:
            assert block.startswith("data: "), block
            payload = json.loads(block.removeprefix("data: "))
            if "error" in payload:
                check_error(payload)
                assert payload["error"]["type"] != "server_error", payload
        return
    body = r.json()
    if "choices" in body:
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], body


def check_error(body: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
