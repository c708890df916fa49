"""deploy/grafana and deploy/docker-compose.yml, read without Grafana: the dashboard is well formed, shows every
metric the server exports and no other, and the provisioning and compose files point at files that exist."""

from __future__ import annotations

import re

from tests.deploy.support import DASHBOARD, DEPLOY, dashboard, exported_series, metric_names, panel_queries, yaml

PANEL_TYPES = {"row", "timeseries", "stat"}


def test_panels_have_unique_ids_and_do_not_overlap():
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = {}
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_every_query_has_a_ref_id_and_uses_the_datasource_variable():
    board = dashboard()
    (variable,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), panel["title"]


def test_the_dashboard_shows_every_exported_metric_and_no_other():
    shown = set().union(*(metric_names(expr) for _, expr in panel_queries()))
    exported = exported_series()
    assert shown <= exported, f"not exported by server/metrics.py: {shown - exported}"
    unshown = {metric(n) for n in exported} - {metric(n) for n in shown}
    assert not unshown, f"exported but on no panel: {sorted(unshown)}"


def metric(series: str) -> str:
    """The metric a series belongs to: a histogram's _bucket, _sum and _count are one metric."""
    return re.sub(r"_(bucket|sum|count)$", "", series)


def test_provisioning_points_at_the_dashboards_and_the_compose_prometheus():
    grafana = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml().safe_load((grafana / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml().safe_load((grafana / "dashboards" / "hymba-serve.yml").read_text())["providers"]
    compose = yaml().safe_load((DEPLOY / "docker-compose.yml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    assert f"./{DASHBOARD.parent.relative_to(DEPLOY)}:{provider['options']['path']}:ro" in volumes


def test_compose_mounts_files_that_exist_and_binds_loopback_only():
    compose = yaml().safe_load((DEPLOY / "docker-compose.yml").read_text())
    server = compose["services"]["hymba-serve"]
    assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name}: {volume}"
    scrape = yaml().safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert scrape[0]["static_configs"][0]["targets"] == ["hymba-serve:8000"]  # the compose service
