"""NetworkPolicies: the ingress controller reaches the api port, the monitoring stack
the metrics port, and nothing else reaches pgmeter; egress only to what pgmeter uses."""

from __future__ import annotations

from typing import Any

import helm_python
import pytest

NS = "kubernetes.io/metadata.name"
SELECTOR = {"app.kubernetes.io/name": "pgmeter", "app.kubernetes.io/instance": "pgmeter"}


def policies(rendered) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"] for d in rendered.of_kind("NetworkPolicy")}


def ingress_rules(rendered) -> list[tuple[dict[str, str], dict[str, Any], list[dict[str, Any]]]]:
    """(selected pods' labels, peer, ports) for every ingress peer of every policy."""
    out = []
    for spec in policies(rendered).values():
        for rule in spec.get("ingress") or []:
            assert rule.get("from"), "an ingress rule without `from` admits every source"
            for peer in rule["from"]:
                out.append((spec["podSelector"]["matchLabels"], peer, rule["ports"]))
    return out


def egress_to(spec: dict[str, Any], **match: str) -> dict[str, Any]:
    for rule in spec["egress"]:
        for peer in rule["to"]:
            for selector in ("namespaceSelector", "podSelector"):
                if peer.get(selector, {}).get("matchLabels") == match:
                    return rule
    raise AssertionError(f"no egress rule to {match}")


def test_ingress_admits_exactly_the_controller_to_the_api_and_monitoring_to_metrics(all_on_render) -> None:
    found = policies(all_on_render)
    assert set(found) == {"pgmeter", "pgmeter-api", "pgmeter-lago-sync", "pgmeter-test", "pgmeter-collector"}
    http = [{"port": "http", "protocol": "TCP"}]
    collector = {**SELECTOR, "app.kubernetes.io/component": "collector"}
    assert sorted(ingress_rules(all_on_render), key=repr) == sorted([
        # Monitoring scrapes every role (all pgmeter pods) on the metrics (http) port.
        (SELECTOR, {"namespaceSelector": {"matchLabels": {NS: "monitoring"}}}, http),
        # The ingress controller and the helm test Pod reach only the api pods.
        ({**SELECTOR, "app.kubernetes.io/component": "api"},
         {"namespaceSelector": {"matchLabels": {NS: "traefik"}}}, http),
        ({**SELECTOR, "app.kubernetes.io/component": "api"},
         {"podSelector": {"matchLabels": {**SELECTOR, "app.kubernetes.io/component": "test"}}}, http),
        # The collector delivers to the api, and its producers (configured peers) reach it.
        ({**SELECTOR, "app.kubernetes.io/component": "api"}, {"podSelector": {"matchLabels": collector}}, http),
        (collector, {"namespaceSelector": {"matchLabels": {NS: "gateway"}}}, http),
    ], key=repr)
    # The catch-all policy selects every pgmeter pod and denies any other ingress.
    assert found["pgmeter"]["podSelector"]["matchLabels"] == SELECTOR
    assert set(found["pgmeter"]["policyTypes"]) == {"Ingress", "Egress"}
    # Never "every pod of the namespace": no bare podSelector {} peer anywhere.
    assert all(peer != {"podSelector": {}} for _, peer, _ in ingress_rules(all_on_render))


def test_peers_are_configurable_selectors(render) -> None:
    controller = {"namespaceSelector": {"matchLabels": {NS: "ingress-nginx"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}
    prometheus = {"namespaceSelector": {"matchLabels": {NS: "observability"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    rendered = render({"networkPolicy": {"enabled": True, "ingress": {"api": [controller], "metrics": [prometheus]}},
                       "helmTest": {"enabled": False}})
    found = policies(rendered)
    assert set(found) == {"pgmeter", "pgmeter-api"}
    assert found["pgmeter-api"]["ingress"] == [{"from": [controller], "ports": [{"port": "http", "protocol": "TCP"}]}]
    assert found["pgmeter"]["ingress"] == [{"from": [prometheus], "ports": [{"port": "http", "protocol": "TCP"}]}]


def test_no_peers_means_no_ingress_not_everyone(render) -> None:
    rendered = render({"networkPolicy": {"enabled": True, "ingress": {"api": [], "metrics": []}},
                       "helmTest": {"enabled": False}})
    found = policies(rendered)
    assert found["pgmeter"]["ingress"] == [] and "Ingress" in found["pgmeter"]["policyTypes"]
    assert found["pgmeter-api"]["ingress"] == [] and found["pgmeter-api"]["policyTypes"] == ["Ingress"]


def test_an_empty_peer_is_refused(chart) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        chart.validate_schema({"networkPolicy": {"ingress": {"metrics": [{}]}}})


def test_egress(all_on_render, render) -> None:
    found = policies(all_on_render)
    spec = found["pgmeter"]
    assert {(p["port"], p["protocol"]) for p in egress_to(spec, **{NS: "kube-system"})["ports"]} == {
        (53, "UDP"), (53, "TCP")}
    assert egress_to(spec, **{NS: "nats-system"})["ports"] == [{"port": 4222, "protocol": "TCP"}]
    pg = egress_to(spec, **{"cnpg.io/cluster": "pgmeter-pg"})
    assert pg["ports"] == [{"port": 5432, "protocol": "TCP"}]
    # Database pods live in our namespace: a pod selector with no namespace selector.
    assert all("namespaceSelector" not in peer for peer in pg["to"])
    assert {"podSelector": {"matchLabels": {"cnpg.io/poolerName": "pgmeter-pg-pooler"}}} in pg["to"]
    assert egress_to(spec, **{NS: "valkey"})["ports"] == [{"port": 6379, "protocol": "TCP"}]
    # Lago only from lago-sync, the one role that holds the key.
    with pytest.raises(AssertionError):
        egress_to(spec, **{NS: "lago"})
    lago = found["pgmeter-lago-sync"]
    assert lago["podSelector"]["matchLabels"] == {**SELECTOR, "app.kubernetes.io/component": "lago-sync"}
    assert lago["policyTypes"] == ["Egress"]
    assert egress_to(lago, **{NS: "lago"})["ports"] == [{"port": 3000, "protocol": "TCP"}]
    # Only the helm test Pod may call the api; no role calls another.
    test = found["pgmeter-test"]
    assert test["podSelector"]["matchLabels"] == {**SELECTOR, "app.kubernetes.io/component": "test"}
    assert egress_to(test, **{**SELECTOR, "app.kubernetes.io/component": "api"})["ports"] == [
        {"port": 8888, "protocol": "TCP"}]
    with pytest.raises(AssertionError):
        egress_to(spec, **{**SELECTOR, "app.kubernetes.io/component": "api"})

    no_lago = render({"networkPolicy": {"enabled": True, "egress": {"nats": {"namespace": "nats", "port": 4223}}}})
    assert "pgmeter-lago-sync" not in policies(no_lago)
    egress = policies(no_lago)["pgmeter"]["egress"]
    peers = [p.get("namespaceSelector", {}).get("matchLabels", {}).get(NS) for r in egress for p in r["to"]]
    assert "lago" not in peers and "nats" in peers and "nats-system" not in peers
    assert egress_to(policies(no_lago)["pgmeter"], **{NS: "nats"})["ports"] == [{"port": 4223, "protocol": "TCP"}]
