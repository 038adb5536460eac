"""The Grafana dashboard shipped in the chart."""

from __future__ import annotations

import json
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "chart" / "dashboards" / "pgmeter.json"

REQUIRED_METRICS = {
    "ingest rate": "rate(openmeter_events_ingested_total",
    "processed rate": "openmeter_events_processed_total",
    "sink lag": "pgmeter_sink_pending_messages",
    "refresher lag events": "pgmeter_refresher_lag_events",
    "refresher lag seconds": "pgmeter_refresher_lag_seconds",
    "query latency p50": "histogram_quantile(0.5, sum by (le) (rate(openmeter_query_latency_seconds_bucket",
    "query latency p99": "histogram_quantile(0.99, sum by (le) (rate(openmeter_query_latency_seconds_bucket",
    "http latency": "http_server_request_duration_seconds_bucket",
    "cache hits": "pgmeter_cache_hits_total",
    "cache requests": "pgmeter_cache_requests_total",
    "dead letters": "pgmeter_dead_letters_total",
    "usage per meter": "sum by (meter) (rate(pgmeter_meter_events_merged_total",
}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_has_every_panel() -> None:
    dashboard = load()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for what, needle in REQUIRED_METRICS.items():
        assert any(needle in e for e in exprs), f"no panel for {what}"
    ratio = next(e for e in exprs if "pgmeter_cache_hits_total" in e)
    assert ratio.index("pgmeter_cache_hits_total") < ratio.index("/") < ratio.index("pgmeter_cache_requests_total")


def test_dashboard_is_well_formed() -> None:
    dashboard = load()
    assert dashboard["uid"] == "pgmeter" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]


def test_dashboard_configmap(render, default_render) -> None:
    assert not [d for d in default_render.of_kind("ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]
    rendered = render({"grafanaDashboard": {"enabled": True, "namespace": "monitoring",
                                            "annotations": {"grafana_folder": "Metering"}}})
    cm = rendered.get("ConfigMap", "pgmeter-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Metering"}
    assert json.loads(cm["data"]["pgmeter.json"]) == load()
