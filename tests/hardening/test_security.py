"""Security: the API key guards every route that generates or reveals the model (the probes too, once dropped from
--public-routes), compared in constant time; keys never reach the logs; CORS is off unless configured; no response
carries a stack trace. Body and prompt bounds are in test_bad_input.py (413, context limit), and the chat-template
sandbox is tried through the API there too (test_a_failing_template_is_400_naming_it)."""

from __future__ import annotations

import hmac
import logging
import sys

import httpx
import pytest

from server import app as server_app
from server.settings import Settings, SettingsError
from tests.hardening.conftest import CHAT, COMPLETIONS, USER, error_of, sse_payloads
from tests.server.conftest import ODD_6L, wait_until

KEY = "sk-hymba-7f3a9c2e51d04b8e"
WRONG = "sk-guess-0000000000000000"
GUARDED = [  # every route that generates, or tells anything about the model or its tokenizer
    ("POST", COMPLETIONS, {"prompt": "t5", "max_tokens": 1}),
    ("POST", CHAT, {"messages": USER, "max_tokens": 1}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/hymba-odd-6L", None),
    ("POST", "/tokenize", {"prompt": "t5"}),
    ("POST", "/detokenize", {"tokens": [1, 5]}),
]
PROBES = [("GET", "/health", None), ("GET", "/version", None), ("GET", "/metrics", None)]


def call(c: httpx.Client, method: str, path: str, body: dict | None, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return c.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("public_routes", [None, ("/health",), ()], ids=["default", "health-only", "none"])
def test_the_key_guards_every_route_and_the_probes_as_configured(live, public_routes):
    settings = {"api_key": KEY} | ({} if public_routes is None else {"public_routes": public_routes})
    server = live(**settings)
    open_routes = {"/health", "/version", "/metrics"} if public_routes is None else set(public_routes)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for method, path, body in GUARDED + PROBES:
            if path in open_routes:
                assert call(c, method, path, body, None).status_code == 200, path
                continue
            for key in (None, WRONG, KEY.upper(), KEY[:-1], KEY + " x"):
                error = error_of(call(c, method, path, body, key), 401)
                assert (error["code"], error["message"]) == ("invalid_api_key", "Invalid or missing API key."), path
            assert c.request(method, path, json=body, headers={"Authorization": f"Basic {KEY}"}).status_code == 401
            assert call(c, method, path, body, KEY).status_code == 200, path


def test_public_routes_take_only_the_probes():
    with pytest.raises(SettingsError, match="--public-routes must be a comma-separated subset of /health"):
        Settings(model="m", public_routes=("/v1/models",))
    assert Settings.from_args(["--model", "m", "--public-routes", ""]).public_routes == ()
    environ = {"HYMBA_PUBLIC_ROUTES": "/health, /metrics"}
    assert Settings.from_args(["--model", "m"], environ).public_routes == ("/health", "/metrics")


def test_the_key_is_compared_in_constant_time(live, monkeypatch):
    compared, compare_digest = [], hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(server_app.hmac, "compare_digest", recording)
    server = live(api_key=KEY)
    with httpx.Client(base_url=server.url) as c:
        assert call(c, "GET", "/v1/models", None, WRONG).status_code == 401
        assert call(c, "GET", "/v1/models", None, KEY).status_code == 200
    assert compared == [(WRONG.encode(), KEY.encode()), (KEY.encode(), KEY.encode())]


def test_keys_never_reach_the_logs(processes):
    """The most verbose level, right and wrong keys in the header, and a key a client put in the URL."""
    env = {"HYMBA_API_KEY": KEY}  # the environment, not argv: argv is visible to every user of the machine
    server = processes(sys.executable, "-m", "server", "--model", str(ODD_6L), "--port", "0", "--log-level", "trace",
                       env=env)  # fmt: skip
    url = server.wait_for_url()
    with httpx.Client(base_url=url, timeout=30) as c:
        for key in (KEY, WRONG):
            call(c, "POST", COMPLETIONS, {"prompt": "t5", "max_tokens": 2}, key)
            call(c, "GET", f"/v1/models?api_key={key}", None, key)
            with c.stream("POST", CHAT, json={"messages": USER, "max_tokens": 2, "stream": True},
                          headers={"Authorization": f"Bearer {key}"}) as r:  # fmt: skip
                r.read()
        num_requests = 6
        wait_until(lambda: sum(" HTTP/1.1" in line for line in server.lines) >= num_requests)
    server.kill()
    log = "".join(server.lines)
    assert "ASGI [" in log  # trace really was on: raw ASGI messages were logged
    assert KEY not in log and WRONG not in log
    assert '"GET /v1/models HTTP/1.1" 401' in log  # the access log kept the path, dropped the query


def test_cors_is_off_unless_configured(live):
    server = live()
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(server.url + COMPLETIONS, headers=preflight)
    assert r.status_code == 405 and not any(h.startswith("access-control-") for h in r.headers)
    r = httpx.post(server.url + COMPLETIONS, json={"prompt": "t5", "max_tokens": 1}, headers={"Origin": "http://x.y"})
    assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)


def test_no_stack_trace_in_any_response(live, monkeypatch, model_hook, caplog):
    """A bug anywhere (here: the tokenizer raising, then the model) is logged with its traceback on the server and
    answered with a fixed message: no exception text, type, path or frame."""
    server = live()
    secret = "internal detail /srv/hymba/engine/tokenizer.py line 99"

    def broken(*args, **kw):
        raise KeyError(secret)

    monkeypatch.setattr(server.engine.tokenizer, "encode", broken)
    with caplog.at_level(logging.ERROR), httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post(COMPLETIONS, json={"prompt": "t5"})
        assert error_of(r, 500) == {"message": "The server failed to handle the request.", "type": "server_error",
                                    "param": None, "code": "internal_error"}  # fmt: skip
        assert secret not in r.text and "KeyError" not in r.text
        monkeypatch.undo()
        model_hook(server.engine, "decode", lambda real, *a: (_ for _ in ()).throw(KeyError(secret)))
        with c.stream("POST", COMPLETIONS, json={"prompt": "t5", "max_tokens": 4, "stream": True}) as s:
            raw = s.read().decode()
        assert secret not in raw and "KeyError" not in raw and "Traceback" not in raw
        assert sse_payloads(raw)[-2]["error"]["code"] == "internal_error"
    assert secret in caplog.text and "Traceback" in caplog.text  # the server's log keeps what the client is not told
