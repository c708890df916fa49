"""The dashboard and the alert rules against a real server and a real Prometheus, both on 127.0.0.1.

The server serves the hymba-odd-6L conformance checkpoint through the real engine; Prometheus scrapes it every
second with deploy/prometheus/prometheus.yml (only the target and the intervals changed) and loads alerts.yml. Once
it has scraped the idle server, the test sends completions, streams, a chat, an invalid request and a stream it
abandons, then runs every PromQL expression of the dashboard, the alert rules and the KEDA trigger through
Prometheus' HTTP API: each must parse, and each panel query must return at least one number.
"""

from __future__ import annotations

import contextlib
import math
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.support import DEPLOY, ROOT, alert_rules, panel_queries, tool, variable_queries, yaml

MODEL = ROOT / "tests" / "data" / "conformance" / "hymba-odd-6L"
START_DEADLINE_S = 60  # server start (5 to 15 s on a busy 2-core machine) and the first scrape (about 6 s)
DEADLINE_S = 20  # for the queries to see the traffic


@dataclass
class Prometheus:
    url: str
    data_deadline: float = 0.0  # monotonic time by which every panel query should have seen the traffic

    def query(self, expr: str) -> dict:
        """/api/v1/query's body; a parse error is a 400 with status "error"."""
        return httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5).json()

    def values(self, expr: str) -> list[float]:
        body = self.query(expr)
        assert body["status"] == "success", f"{expr}\n{body}"
        return [float(sample["value"][1]) for sample in body["data"]["result"]]


def poll(check, what: str, deadline_s: float = DEADLINE_S):
    deadline = time.monotonic() + deadline_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {deadline_s:.0f} s in vain for {what}")
        time.sleep(0.25)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process(argv: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prometheus_config(target: str, folder: Path) -> Path:
    config = yaml().safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    path = folder / "prometheus.yml"
    path.write_text(yaml().safe_dump(config))
    return path


def send_traffic(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for prompt in ("Hello", "The quick brown fox", "Numbers like 42"):
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
        body = {"prompt": "A model reads", "max_tokens": 8, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200 and "data: [DONE]" in r.read().decode()
        chat = {"messages": [{"role": "user", "content": "Be brief."}], "max_tokens": 8}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        assert client.post("/v1/completions", json={"prompt": "x", "temperature": -1}).status_code == 400
        # Abandoned after its first event: the server cancels it (hymba_cancellations_total{reason=...}).
        body = {"prompt": "Hello world", "max_tokens": 900, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            next(r.iter_lines())

        def cancelled() -> bool:
            return 'hymba_cancellations_total{reason="client_disconnected"} 1.0' in client.get("/metrics").text

        poll(cancelled, "the server to count the abandoned stream as cancelled")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[Prometheus]:
    prometheus_bin = tool("prometheus")
    folder = tmp_path_factory.mktemp("live-prometheus")
    server_address, prometheus_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    host, port = server_address.split(":")
    server_argv = [sys.executable, "-m", "server", "--model", str(MODEL), "--host", host, "--port", port]
    server_argv += ["--device", "cpu", "--max-model-len", "1024"]
    prometheus_argv = [prometheus_bin, f"--config.file={prometheus_config(server_address, folder)}"]
    prometheus_argv += [f"--web.listen-address={prometheus_address}", f"--storage.tsdb.path={folder / 'data'}"]
    prometheus_argv += ["--log.level=warn"]
    # Both start at once: the server loads its model while Prometheus waits out its first scrape.
    with (
        process(server_argv, folder / "server.log") as server,
        process(prometheus_argv, folder / "prometheus.log") as prometheus_process,
    ):
        live = Prometheus(f"http://{prometheus_address}")

        def scraped() -> bool:
            for proc, log in ((server, "server.log"), (prometheus_process, "prometheus.log")):
                assert proc.poll() is None, f"{log}: exited with {proc.returncode}\n{(folder / log).read_text()}"
            return _answers_ok(f"{live.url}/-/ready") and bool(live.values('up{job="hymba-serve"} == 1'))

        # /metrics answers while the model still loads, so a first scrape does not mean the server takes requests:
        # /health turns 200 only once it does.
        poll(scraped, "the first scrape of the server", START_DEADLINE_S)
        poll(lambda: _answers_ok(f"http://{server_address}/health"), "the server to finish loading", START_DEADLINE_S)
        send_traffic(f"http://{server_address}")
        live.data_deadline = time.monotonic() + DEADLINE_S
        yield live


def _answers_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize(("panel", "expr"), panel_queries(), ids=[name for name, _ in panel_queries()])
def test_panel_query_returns_numbers(prometheus, panel, expr):
    wait_s = max(prometheus.data_deadline - time.monotonic(), 2)  # one budget for all: a broken query costs 2 s
    poll(lambda: [v for v in prometheus.values(expr) if math.isfinite(v)], f"numbers from {panel}: {expr}", wait_s)


@pytest.mark.parametrize(("variable", "selector"), variable_queries(), ids=[name for name, _ in variable_queries()])
def test_dashboard_variable_finds_series(prometheus, variable, selector):
    assert prometheus.values(selector), f"${variable}: {selector} matches no series"


@pytest.mark.parametrize("rule", alert_rules(), ids=[rule["alert"] for rule in alert_rules()])
def test_alert_expression_parses(prometheus, rule):
    prometheus.values(rule["expr"])


def test_alert_rules_are_loaded_and_evaluate(prometheus):
    def evaluated() -> list[dict]:
        groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else []

    rules = poll(evaluated, "the rules to be evaluated")
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_the_autoscaler_query_parses(prometheus):
    scaler = yaml().safe_load((DEPLOY / "k8s" / "scaledobject.yaml").read_text())
    for trigger in scaler["spec"]["triggers"]:
        prometheus.values(trigger["metadata"]["query"])
