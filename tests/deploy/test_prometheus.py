"""deploy/prometheus: promtool accepts the config and the rules, the rules' unit tests pass, the Prometheus
Operator's copy of the rules is the same, and every metric the rules name is one the server exports."""

from __future__ import annotations

from tests.deploy.support import ALERTS, DEPLOY, ROOT, alert_rules, exported_series, metric_names, run, tool, yaml


def test_promtool_checks_the_config_and_its_rule_files():
    result = run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_checks_the_rules():
    result = run(tool("promtool"), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_in_the_rules_unit_tests():
    tests = ROOT / "tests" / "deploy" / "alerts_test.yml"
    result = run(tool("promtool"), "test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {t["alertname"] for case in yaml().safe_load(tests.read_text())["tests"] for t in case["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in alert_rules()}


def test_the_operator_rules_are_the_same_rules():
    operator = yaml().safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())
    assert operator["spec"] == yaml().safe_load(ALERTS.read_text())


def test_the_rules_name_only_exported_metrics():
    exported = exported_series()
    for rule in alert_rules():
        assert metric_names(rule["expr"]) <= exported, rule["alert"]
