"""The process: `python -m server` start-up (listening at once, 503 while the engine loads) and its exit-2 errors,
and SIGTERM drain, each a real server subprocess on hymba-odd-6L."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.api import GenerationRequest, SamplingParams
from server.__main__ import main
from tests.server.conftest import ODD_6L, checkpoint_copy, load_engine, wait_until

ROOT = Path(__file__).parents[2]
LOADING = {"message": "The model is still loading.", "type": "service_unavailable_error", "param": None,
           "code": "loading"}  # fmt: skip


class Process:
    """A server subprocess whose log is read in the background; `url` comes from its `listening on` line."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # see one_torch_thread in conftest.py
        out = subprocess.PIPE
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for_url(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if m := re.search(r"listening on (http://\S+)", line):
                    url = m.group(1)
                    if _is_up(url):
                        return url
            assert self.proc.poll() is None, "".join(self.lines)
            time.sleep(0.05)
        raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _is_up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def processes():
    started: list[Process] = []

    def start(*argv: str, env: dict[str, str] | None = None) -> Process:
        started.append(Process(list(argv), env))
        return started[-1]

    yield start
    for p in started:
        p.kill()


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", str(ODD_6L), "--port", "eighty"], "--port must be an integer, got 'eighty'"),
        (["--model", str(ODD_6L), "--device", "tpu"], "--device must be"),
        (["--model", str(ODD_6L), "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--model", "/no/such/dir"], "no config.json there"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, expected, capsys, monkeypatch):
    monkeypatch.delenv("HYMBA_MODEL", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"config.json": json.dumps({"model_type": "hymba"})}, "config.json: "),
        ({"tokenizer.json": "{"}, "tokenizer.json: cannot be loaded"),
    ],
    ids=["config", "tokenizer"],
)
def test_bad_small_files_exit_2_before_listening(files, expected, tmp_path):
    done = run_main("--model", str(checkpoint_copy(tmp_path, files)), "--port", "0")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("hymba-serve: error: cannot load") and done.stderr.count("\n") == 1, done.stderr
    assert expected in done.stderr and "listening on" not in done.stdout + done.stderr


def test_health_is_503_while_loading_then_200(processes):
    """The port opens before the engine loads (importing torch and reading the weights take seconds): probes see
    503 with OpenAI's error body, as do API calls, then 200 once the worker runs."""
    server = processes(sys.executable, "-m", "server", "--model", str(ODD_6L), "--port", "0")
    wait_until(lambda: any("listening on" in line for line in server.lines), timeout=60)
    url = re.search(r"listening on (http://\S+)", "".join(server.lines)).group(1)
    statuses: list[int] = []
    while not statuses or statuses[-1] != 200:
        assert server.proc.poll() is None and len(statuses) < 10_000, "".join(server.lines)
        try:
            health = httpx.get(url + "/health", timeout=5)
        except httpx.TransportError:  # the line is logged just before uvicorn starts accepting
            time.sleep(0.01)
            continue
        statuses.append(health.status_code)
        if statuses == [503]:
            assert health.json() == {"error": LOADING} and health.headers["retry-after"] == "1"
            for r in (httpx.get(url + "/v1/models"), httpx.post(url + "/v1/completions", json={"prompt": "t5"})):
                assert r.status_code == 503 and r.json() == {"error": LOADING}, r.text
    assert statuses[0] == 503 and set(statuses) == {503, 200}, statuses
    log = "".join(server.lines)
    assert log.index("listening on") < log.index("loaded hymba-odd-6L on cpu"), log
    out = httpx.post(url + "/v1/completions", json={"prompt": [1, 5, 6], "max_tokens": 3, "temperature": 0}).json()
    assert out["usage"]["completion_tokens"] == 3


def test_weights_that_do_not_load_exit_2_after_listening(processes, tmp_path):
    model_dir = checkpoint_copy(tmp_path, {})
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.3.mamba.A_log.0"] = torch.zeros(72, 5)  # expected (d_inner, d_state) = (72, 6)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    server = processes(sys.executable, "-m", "server", "--model", str(model_dir), "--port", "0")
    wait_until(lambda: any(line.startswith("hymba-serve: error") for line in server.lines), timeout=60)
    failed_at = time.monotonic()
    assert server.proc.wait(timeout=30) == 2, "".join(server.lines)
    exited_after = time.monotonic() - failed_at
    log = "".join(server.lines)
    (error,) = [line for line in server.lines if "error" in line.lower()]
    assert error == (
        f"hymba-serve: error: cannot load {model_dir}: model.safetensors: "
        "model.layers.3.mamba.A_log.0 has shape (72, 5), expected (72, 6)\n"
    )
    assert log.index("listening on") < log.index(error) and "Traceback" not in log, log
    assert exited_after < 10, exited_after  # uvicorn's shutdown, then the interpreter and torch tearing down


def test_no_model_flag_serves_the_bundled_shakespeare_model(processes):
    """The README's first command: `hymba-serve` with no flags answers with text from the shipped checkpoint."""
    env = {k: v for k, v in os.environ.items() if k != "HYMBA_MODEL"}
    server = processes(sys.executable, "-m", "server", "--port", "0", env=env)
    url = server.wait_for_url()
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["hymba-tiny-shakespeare"]
    body = {"prompt": "To be, or not to be", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    out = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    text = out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] == 24 and sum(ch.isalpha() for ch in text) > 20, text


def test_server_modules_do_not_import_torch():
    code = "import sys, server.__main__, server.app, server.routes; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_real_checkpoint_serves_logs_its_start_and_drains_on_sigterm(processes):
    env = {"HYMBA_MAX_MODEL_LEN": "1024"}  # the environment twin of --max-model-len
    server = processes(sys.executable, "-m", "server", "--model", str(ODD_6L), "--port", "0", env=env)
    url = server.wait_for_url()
    log = "".join(server.lines)
    assert re.search(r"loaded hymba-odd-6L on cpu in [\d.]+ s; decode state [\d.]+ MiB \(\d+ bytes\)", log), log
    assert "max_model_len 1024" in log
    out = httpx.post(url + "/v1/completions", json={"prompt": [1, 5, 6], "max_tokens": 3, "temperature": 0}).json()
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    request = GenerationRequest((1, 5, 6), SamplingParams(max_tokens=3, temperature=0))
    assert out["choices"][0]["text"] == "".join(e.text for e in load_engine(max_model_len=1024).generate(request))

    lines = stream_through_sigterm(server, url, max_tokens=100)  # outlasts the checks; the default drain waits 30 s
    assert json.loads(lines[-3].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert json.loads(lines[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 100
    assert server.proc.wait(timeout=30) == 0, "".join(server.lines)


def test_sigterm_cuts_off_what_outlasts_the_shutdown_timeout(processes):
    flags = ["--model", str(ODD_6L), "--max-model-len", "1024", "--port", "0", "--shutdown-timeout", "2"]
    server = processes(sys.executable, "-m", "server", *flags)
    url = server.wait_for_url()
    lines = stream_through_sigterm(server, url, max_tokens=1000)  # 6 s or more: cut off after 2
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "draining" and len(lines) < 1000
    assert server.proc.wait(timeout=30) == 0, "".join(server.lines)


def stream_through_sigterm(server: Process, url: str, max_tokens: int) -> list[str]:
    """Stream a generation of `max_tokens`; after its first token, SIGTERM the server and check that it refuses
    new work while draining. Returns the stream's lines, ending with [DONE]. At about 6 ms a token on an idle CPU."""
    lines: list[str] = []
    first = threading.Event()
    body = {"prompt": "t5", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}

    def read() -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert first.wait(30)
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(url + "/health", timeout=5).status_code == 503)
    health = httpx.get(url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["error"]["code"] == "draining"
    refused = httpx.post(url + "/v1/completions", json={"prompt": "t5", "max_tokens": 1}, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    reader.join(timeout=60)
    assert lines[-1] == "data: [DONE]"
    return lines
