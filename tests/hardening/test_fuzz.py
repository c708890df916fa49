"""Property-based fuzzing of every operation in the server's own OpenAPI document, on the real engine: no 5xx, every
error in OpenAI's shape, the server healthy afterwards. A small budget here; scripts/fuzz.py runs 1,000+ per operation.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.settings import Settings
from tests.hardening import fuzzing
from tests.server.conftest import ODD_6L, LiveServer, load_engine, start_server, wait_until

EXAMPLES_PER_OPERATION = 25
FUZZ_MAX_MODEL_LEN = 40  # short context: more prompts overflow it, and no valid case generates for long
OPERATIONS = [  # every operation of the schema; test_every_operation_is_fuzzed keeps this list complete
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "POST /tokenize",
    "POST /detokenize",
    "GET /health",
    "GET /version",
]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,  # nothing written into the work tree; a failure prints its reproducing case
    derandomize=True,  # CI runs the same cases every time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[LiveServer]:
    live = start_server(Settings(model=str(ODD_6L)), [load_engine(max_model_len=FUZZ_MAX_MODEL_LEN)])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def schema(fuzzed: LiveServer) -> dict:
    return httpx.get(fuzzed.url + "/openapi.json").json()


def test_every_operation_is_fuzzed(schema):
    assert sorted(op.name for op in fuzzing.operations(schema)) == sorted(OPERATIONS)


@pytest.mark.parametrize("name", OPERATIONS)
def test_fuzz(fuzzed, schema, name):
    op = next(op for op in fuzzing.operations(schema) if op.name == name)
    kinds: list[str] = []

    @FUZZ_SETTINGS
    @given(st.data())
    def run(data):
        case = data.draw(fuzzing.cases(op, schema, fuzzed.ctx.model_name))
        kinds.append(case.kind)
        with httpx.Client(base_url=fuzzed.url, timeout=60) as c:
            fuzzing.check_response(case, case.send(c))

    run()
    assert len(kinds) >= EXAMPLES_PER_OPERATION
    assert_healthy(fuzzed)


def assert_healthy(live: LiveServer) -> None:
    assert httpx.get(live.url + "/health").status_code == 200
    wait_until(lambda: live.metric("hymba_requests_running") == 0 and live.metric("hymba_requests_waiting") == 0)
    assert live.metric("hymba_errors_total", type="server_error") == 0
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "t5", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
