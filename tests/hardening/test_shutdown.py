"""Shutdown of the real process, beyond tests/server/test_main.py (one stream through a drain, and a drain cut off by
--shutdown-timeout): several streams at once, running and waiting, all finish whole within the timeout while new work
gets 503, and the process exits 0; a second SIGTERM cancels what is left at once and still exits 0."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import httpx

from tests.server.conftest import ODD_6L, wait_until

FLAGS = ["--model", str(ODD_6L), "--max-model-len", "1024", "--port", "0"]
DRAINING = {"message": "The server is shutting down.", "type": "service_unavailable_error", "param": None,
            "code": "draining"}  # fmt: skip


class Stream(threading.Thread):
    """One streamed completion read in the background: its SSE payloads and when it ended."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.payloads: list = []
        self.ended_at = 0.0

    def run(self) -> None:
        body = {"prompt": "t5", "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", self.url + "/v1/completions", json=body | {"stream_options": {"include_usage": True}},
                          timeout=120) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data: "):
                    payload = line.removeprefix("data: ")
                    self.payloads.append(payload if payload == "[DONE]" else json.loads(payload))
        self.ended_at = time.monotonic()


def wait_for_queue(url: str, num_running: int, num_waiting: int) -> None:
    def is_there() -> bool:
        text = httpx.get(url + "/metrics", timeout=5).text
        return f"hymba_requests_running {num_running}.0" in text and f"hymba_requests_waiting {num_waiting}.0" in text

    wait_until(is_there, timeout=30)


def refuses_new_work(url: str) -> None:
    wait_until(lambda: httpx.get(url + "/health", timeout=5).status_code == 503)
    r = httpx.post(url + "/v1/completions", json={"prompt": "t5", "max_tokens": 1}, timeout=5)
    assert r.status_code == 503 and r.json()["error"] == DRAINING and r.headers["retry-after"] == "1"


def test_sigterm_lets_every_admitted_stream_finish_whole_then_exits_0(processes):
    shutdown_timeout = 30
    server = processes(sys.executable, "-m", "server", *FLAGS, "--shutdown-timeout", str(shutdown_timeout))
    url = server.wait_for_url()
    streams = [Stream(url, 200) for _ in range(3)]  # one worker: one runs, two wait in the queue
    for s in streams:
        s.start()
    wait_for_queue(url, 1, 2)
    server.proc.send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    refuses_new_work(url)
    assert server.proc.wait(timeout=shutdown_timeout + 10) == 0, "".join(server.lines)
    exited_after = time.monotonic() - signalled_at
    for s in streams:
        s.join(timeout=10)
        assert s.payloads[-1] == "[DONE]" and s.payloads[-2]["usage"]["completion_tokens"] == 200, s.payloads[-3:]
        assert s.payloads[-3]["choices"][0]["finish_reason"] == "length"
    assert exited_after < shutdown_timeout
    print(f"shutdown: 3 streams (1 running, 2 waiting) finished whole; exit 0 {exited_after:.2f} s after SIGTERM")


def test_a_second_sigterm_cancels_at_once_and_still_exits_0(processes):
    server = processes(sys.executable, "-m", "server", *FLAGS, "--shutdown-timeout", "60")
    url = server.wait_for_url()
    streams = [Stream(url, 1000) for _ in range(2)]  # 1000 tokens: many seconds, far past the checks below
    for s in streams:
        s.start()
    wait_for_queue(url, 1, 1)
    server.proc.send_signal(signal.SIGTERM)
    refuses_new_work(url)
    assert all(s.is_alive() for s in streams), "the drain must still be waiting on both streams"
    server.proc.send_signal(signal.SIGTERM)
    second_at = time.monotonic()
    assert server.proc.wait(timeout=30) == 0, "".join(server.lines)
    exited_after = time.monotonic() - second_at
    for s in streams:
        s.join(timeout=10)
        assert s.payloads[-2:] == [{"error": DRAINING}, "[DONE]"], s.payloads[-3:]
    ended_after = max(s.ended_at for s in streams) - second_at
    assert ended_after < 2 and exited_after < 10  # exiting includes the interpreter and torch tearing down
    print(f"second SIGTERM: streams ended {ended_after:.2f} s after it, exit 0 after {exited_after:.2f} s")
