"""Live servers for the server tests: uvicorn on 127.0.0.1, an ephemeral port, in a thread that stops by itself.

`fake_server` serves FakeEngine (instant and predictable); `make_server` builds one with chosen settings and
engines for a single test; `real_server` serves the hymba-odd-6L conformance checkpoint through the real engine.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.app import build_app
from server.settings import Settings
from tests.server.fake_engine import ODD_6L, FakeEngine

CONFORMANCE_DIR = Path(__file__).parents[1] / "data" / "conformance"
REAL_MAX_MODEL_LEN = 128  # the goldens decode 32 tokens past prompts of up to 33: past the config's 64 - 12


@dataclass
class LiveServer:
    url: str
    app: object
    engines: list
    _server: uvicorn.Server
    _thread: threading.Thread

    @property
    def ctx(self):
        return self.app.state.ctx

    def metric(self, name: str, **labels: str) -> float:
        value = self.ctx.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), "the test server did not stop"


def start_server(settings: Settings, engines: list) -> LiveServer:
    app = build_app(settings, engines)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    return LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app, engines, server, thread)


def fake_settings(**overrides) -> Settings:
    return Settings(model=str(ODD_6L), **overrides)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[LiveServer]:
    live = start_server(fake_settings(), [FakeEngine()])
    yield live
    live.stop()


@pytest.fixture
def make_server() -> Iterator:
    started: list[LiveServer] = []

    def make(engines: list | None = None, **overrides) -> LiveServer:
        live = start_server(fake_settings(**overrides), engines or [FakeEngine()])
        started.append(live)
        return live

    yield make
    for live in started:
        live.stop()


@pytest.fixture(scope="session")
def real_engine():
    generate = pytest.importorskip("engine.generate", reason="engine/generate.py has not landed")
    return generate.Engine.load(ODD_6L, device="cpu", max_model_len=REAL_MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def real_server(real_engine) -> Iterator[LiveServer]:
    live = start_server(fake_settings(), [real_engine])
    yield live
    live.stop()


@pytest.fixture
def client(fake_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_server.url, timeout=10) as c:
        yield c
