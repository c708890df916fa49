"""Live servers for the server tests: uvicorn on 127.0.0.1, an ephemeral port, in a thread that stops by itself,
serving the real Engine on a conformance checkpoint.

`server` serves the shared hymba-odd-6L engine; `make_server` builds one with chosen settings, and an engine of its
own, for a single test. `oracle` is a separate Engine called directly: every expected output comes from it. Tests
that need a pace or a failure wrap the real model's decode with `decode_hook`; `record_requests` shows what reached
the engine.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from engine.api import GenerationRequest, SamplingParams, TokenEvent
from engine.generate import Engine
from server.app import build_app
from server.settings import Settings

CONFORMANCE_DIR = Path(__file__).parents[1] / "data" / "conformance"
ODD_6L = CONFORMANCE_DIR / "hymba-odd-6L"
MIRROR_12L = CONFORMANCE_DIR / "hymba-mirror-12L"
MODEL = ODD_6L.name  # the served model id: the folder name
MAX_MODEL_LEN = 128  # the goldens decode 32 tokens past prompts of up to 33: past the config's 64 - 12
VOCAB_SIZE = json.loads((ODD_6L / "config.json").read_text())["vocab_size"]  # read at collection, for parametrize


def load_engine(model_dir: Path = ODD_6L, max_model_len: int | None = MAX_MODEL_LEN) -> Engine:
    return Engine.load(model_dir, device="cpu", max_model_len=max_model_len)


def checkpoint_copy(tmp_path: Path, files: Mapping[str, str | Path], source: Path = ODD_6L) -> Path:
    """A copy of a conformance checkpoint with some files replaced: file name -> new text, or a file to copy."""
    target = tmp_path / source.name
    shutil.copytree(source, target)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, target / name)
        else:
            (target / name).write_text(content)
    return target


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The conformance models are tiny: one thread is enough, and on a busy 2-core machine two OpenMP threads spin
    against each other (measured: 150 ms or more a token instead of 12). The subprocess tests set OMP_NUM_THREADS."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


# --- the oracle: the engine called directly ---


@dataclass
class Expected:
    """What the engine yields for one request when called directly, outside any server."""

    prompt_ids: list[int]
    events: list[TokenEvent]

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.events]

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def token_ids(self) -> list[int]:
        return [e.token_id for e in self.events if e.token_id is not None]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finish_reason(self) -> str:
        return self.events[-1].finish_reason.value


class Oracle:
    """An Engine of its own, never behind a server, so calling it cannot disturb a request in flight."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer

    def complete(self, prompt: str | Sequence[int], **params) -> Expected:
        return self.run(self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt), **params)

    def chat(self, messages: list[dict], **params) -> Expected:
        return self.run(self.tokenizer.encode_chat(messages), **params)

    def run(self, prompt_ids: list[int], **params) -> Expected:
        request = GenerationRequest(tuple(prompt_ids), SamplingParams(**params))
        return Expected(prompt_ids, list(self.engine.generate(request)))


@pytest.fixture(scope="session")
def oracle() -> Oracle:
    return Oracle(load_engine())


# --- wrappers around a real engine, undone when the test ends ---


class DecodeHook:
    """Stands in front of a real model's decode (the step between two tokens). Records when each call starts, then
    waits while `gate` is clear, sleeps `delay` s, raises while `num_failures` > 0, and runs the real decode."""

    def __init__(self, decode: Callable) -> None:
        self._decode = decode
        self.started_at: list[float] = []
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0
        self.num_failures = 0

    def __call__(self, token, state):
        self.started_at.append(time.monotonic())
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        time.sleep(self.delay)
        if self.num_failures:
            self.num_failures -= 1
            raise RuntimeError("decode failed on purpose")  # as a kernel would; the engine makes it an EngineError
        return self._decode(token, state)

    def num_started_after(self, moment: float) -> int:
        return sum(t > moment for t in self.started_at)


@pytest.fixture
def decode_hook(monkeypatch, make_server) -> Iterator[Callable[[Engine], DecodeHook]]:
    hooks: list[DecodeHook] = []

    def hook(engine: Engine) -> DecodeHook:
        hooks.append(DecodeHook(engine.model.decode))
        monkeypatch.setattr(engine.model, "decode", hooks[-1])
        return hooks[-1]

    yield hook
    for h in hooks:  # set up after make_server, so this runs before its servers stop: no worker stays held
        h.gate.set()


@pytest.fixture
def record_requests(monkeypatch) -> Callable[[Engine], list[GenerationRequest]]:
    """The GenerationRequests that reach a real engine's generate, which then runs them as usual."""

    def record(engine: Engine) -> list[GenerationRequest]:
        seen: list[GenerationRequest] = []
        generate = engine.generate

        def recorded(request: GenerationRequest, should_stop: Callable[[], bool] = lambda: False):
            seen.append(request)
            return generate(request, should_stop)

        monkeypatch.setattr(engine, "generate", recorded)
        return seen

    return record


# --- live servers ---


@dataclass
class LiveServer:
    url: str
    app: object
    engines: list[Engine]
    _server: uvicorn.Server
    _thread: threading.Thread

    @property
    def ctx(self):
        return self.app.state.ctx

    @property
    def engine(self) -> Engine:
        return self.engines[0]

    def metric(self, name: str, **labels: str) -> float:
        value = self.ctx.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), "the test server did not stop"


def start_server(settings: Settings, engines: list[Engine]) -> LiveServer:
    app = build_app(settings, engines)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive())
    assert server.started, "the test server did not start"
    return LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app, engines, server, thread)


@pytest.fixture(scope="session")
def engine() -> Engine:
    return load_engine()


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[LiveServer]:
    live = start_server(Settings(model=str(ODD_6L)), [engine])
    yield live
    live.stop()


@pytest.fixture
def make_server() -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def make(engines: list[Engine] | None = None, **overrides) -> LiveServer:
        live = start_server(Settings(model=str(ODD_6L), **overrides), engines or [load_engine()])
        started.append(live)
        return live

    yield make
    for live in started:
        live.stop()


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
