"""The process: `python -m server` start-up and its exit-2 errors, and SIGTERM drain in a subprocess."""

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

from server.__main__ import main
from tests.server.fake_engine import ODD_6L

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


class Process:
    """A server subprocess whose log is read in the background; `url` comes from its `listening on` line."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": pythonpath, **(env or {})}  # a script's sys.path lacks the repo root
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
        ([], "--model (or HYMBA_MODEL) is required"),
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


def test_the_process_exits_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hymba"}))  # a checkpoint that cannot load
    done = run_main("--model", str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("hymba-serve: error: cannot load") and done.stderr.count("\n") == 1, done.stderr


def test_server_modules_do_not_import_torch():
    code = "import sys, server.__main__, server.app, server.routes; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_real_checkpoint_serves_and_logs_its_start(processes):
    pytest.importorskip("engine.generate", reason="engine/generate.py has not landed")
    env = {"HYMBA_MAX_MODEL_LEN": "96"}  # the environment twin of --max-model-len
    server = processes(sys.executable, "-m", "server", "--model", str(ODD_6L), "--port", "0", env=env)
    url = server.wait_for_url()
    log = "".join(server.lines)
    assert re.search(r"loaded hymba-odd-6L on cpu in [\d.]+ s; decode state [\d.]+ MiB \(\d+ bytes\)", log), log
    assert "max_model_len 96" in log
    out = httpx.post(url + "/v1/completions", json={"prompt": [1, 5, 6], "max_tokens": 3, "temperature": 0}).json()
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0, "".join(server.lines)


def _stream_in_background(url: str, body: dict) -> tuple[threading.Thread, list[str], threading.Event]:
    lines: list[str] = []
    first = threading.Event()

    def read() -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, lines, first


@pytest.mark.parametrize("shutdown_timeout, is_finished", [(10, True), (0.3, False)], ids=["finishes", "cut-off"])
def test_sigterm_drains(processes, shutdown_timeout, is_finished):
    server = processes(
        sys.executable,
        str(HERE / "serve_fake.py"),
        "--model",
        str(ODD_6L),
        "--port",
        "0",
        "--shutdown-timeout",
        str(shutdown_timeout),
        env={"HYMBA_FAKE_TOKEN_DELAY": "0.05"},
    )
    url = server.wait_for_url()
    thread, lines, first = _stream_in_background(url, {"prompt": "t5", "max_tokens": 20, "stream": True})
    assert first.wait(10)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    health = httpx.get(url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["error"]["code"] == "draining"
    refused = httpx.post(url + "/v1/completions", json={"prompt": "t5", "max_tokens": 1}, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    thread.join(timeout=20)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2].removeprefix("data: "))
    if is_finished:
        text = "".join(json.loads(line.removeprefix("data: "))["choices"][0]["text"] for line in lines[:-1])
        assert len(text.split()) == 20 and last["choices"][0]["finish_reason"] == "length"
    else:
        assert last["error"]["code"] == "draining" and len(lines) < 20
    assert server.proc.wait(timeout=20) == 0, "".join(server.lines)
