"""A real hymba-serve in a subprocess on 127.0.0.1 (the hymba-odd-6L checkpoint, the real engine on CPU, a queue of
2), started once for the loadtest tests and stopped with SIGTERM at the end; and helpers to read its /metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parents[2]
ODD_6L = ROOT / "tests" / "data" / "conformance" / "hymba-odd-6L"
MODEL = "hymba-odd-6L"
MAX_QUEUE = 2
START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the server's /metrics (0 when absent), e.g. metric("hymba_requests_total", status="429")."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            metric_name, _, label_text = series.partition("{")
            if metric_name == name and all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                return float(value)
        return 0.0


def _is_up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    argv = [sys.executable, "-m", "server", "--model", str(ODD_6L), "--port", str(port), "--max-queue", str(MAX_QUEUE)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _is_up(server.url):
            assert proc.poll() is None, "the server exited:\n" + log.read_text()
            assert time.monotonic() < deadline, "the server did not start:\n" + log.read_text()
            time.sleep(0.1)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
