"""deploy/: alert rules, Grafana dashboard, Prometheus config and docker-compose, checked
against the gateway's metric contract (no promtool: PromQL is scanned for metric names)."""

import json
import re
from pathlib import Path

import pytest
import yaml
from .manifests import CHART, REPO
from .contract import DCGM, METRICS, REJECTION_REASONS, label_values, metric_names, unknown_metrics

DEPLOY = REPO / "deploy"
# The one copy of each; the chart renders them and deploy/docker-compose.yml mounts them.
ALERTS = CHART / "files/alerts.yml"
DASHBOARD = CHART / "files/dashboard.json"


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_scanner_control():
    """Control: the scanner sees a misspelt metric and ignores labels, functions, ranges."""
    assert unknown_metrics('sum by (job) (rate(mdl_request_total{status=~"5.."}[5m]))') == {"mdl_request_total"}
    assert unknown_metrics('histogram_quantile(0.99, sum by (le) (rate(mdl_ttft_seconds_bucket[5m])))') == set()


def test_alert_rules_are_well_formed(rules):
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert r["labels"]["severity"] in {"critical", "warning", "info"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", r["for"])
        assert r["expr"].count("(") == r["expr"].count(")") and r["expr"].count("{") == r["expr"].count("}")


def test_alert_rules_use_only_contract_metrics(rules):
    for r in rules:
        assert not unknown_metrics(r["expr"]), (r["alert"], unknown_metrics(r["expr"]))
        assert label_values(r["expr"], "reason") <= REJECTION_REASONS


def test_required_alerts_exist(rules):
    by_metric = {r["alert"]: metric_names(r["expr"]) for r in rules}

    def alerts_on(metric):
        return [a for a, ms in by_metric.items() if metric in ms]

    assert alerts_on("mdl_engine_up"), "engine down"
    errors = [r for r in rules if "mdl_requests_total" in metric_names(r["expr"]) and "5.." in r["expr"]]
    assert errors, "error rate"
    ttft = [r for r in rules if "mdl_ttft_seconds_bucket" in metric_names(r["expr"]) and "0.99" in r["expr"]]
    assert ttft, "TTFT p99"
    saturation = [r for r in rules if "queue_full" in label_values(r["expr"], "reason")
                  or "mdl_queue_length" in metric_names(r["expr"])]
    assert saturation, "queue saturation"


def test_dashboard_uses_only_contract_metrics(dashboard):
    exprs = dashboard_exprs(dashboard)
    assert exprs
    for e in exprs:
        assert not unknown_metrics(e), (e, unknown_metrics(e))
        assert label_values(e, "reason") <= REJECTION_REASONS


def test_dashboard_covers_the_operating_signals(dashboard):
    read = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard)))
    for m in ("mdl_requests_total", "mdl_ttft_seconds_bucket", "mdl_request_duration_seconds_bucket",
              "mdl_clips_in_flight", "mdl_queue_length", "mdl_rejections_total",
              "mdl_engine_kv_cache_usage_ratio", "mdl_engine_up"):
        assert m in read, m
    assert read & DCGM, "GPU panels"
    exprs = " ".join(dashboard_exprs(dashboard))
    for q in ("0.5", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(mdl_ttft_seconds_bucket" in exprs
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert "${datasource}" in json.dumps(dashboard) and dashboard["uid"] == "midashenglm-serve"


def test_every_contract_metric_is_shown_or_alerted(dashboard, rules):
    used = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard) + [r["expr"] for r in rules]))
    base = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert METRICS <= base, METRICS - base


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_server_service(compose):
    s = compose["services"]["mdl-serve"]
    assert s["build"]["context"] == ".." and (DEPLOY / ".." / "Dockerfile").exists()
    gpu = s["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert int(s["stop_grace_period"].rstrip("s")) > int(s["environment"]["MDL_DRAIN_TIMEOUT"])
    targets = {re.search(r":(/[^:]*)(:ro|:rw)?$", v).group(1): v for v in s["volumes"]}
    assert targets["/models"].endswith(":ro") and "/cache" in targets
    assert s["read_only"] is True and "/tmp" in s["tmpfs"]
    assert s["ports"][0].endswith(":8000")


def host_mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a compose service's bind mounts (named volumes left out)."""
    return {v.split(":")[1]: (DEPLOY / v.split(":")[0]).resolve() for v in service["volumes"] if v.startswith(".")}


def test_compose_monitoring_wiring(compose):
    prom = compose["services"]["prometheus"]
    mounts = host_mounts(prom)
    assert all(src.exists() for src in mounts.values()), mounts
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert mounts["/etc/prometheus/alerts.yml"] == ALERTS
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert targets["mdl-serve"] == ["mdl-serve:8000"] and "dcgm-exporter" in compose["services"]
    graf = compose["services"]["grafana"]
    gmounts = host_mounts(graf)
    assert all(src.exists() for src in gmounts.values()), gmounts
    provider = yaml.safe_load((gmounts["/etc/grafana/provisioning"] / "dashboards/midashenglm-serve.yml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    assert gmounts[f"{dashboards}/midashenglm-serve.json"] == DASHBOARD
    ds = yaml.safe_load((gmounts["/etc/grafana/provisioning"] / "datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


def test_operations_guide_sections():
    text = (DEPLOY / "OPERATIONS.md").read_text().lower()
    for topic in ("sizing", "clips in flight", "upgrade", "scaling", "warm"):
        assert topic in text, topic
