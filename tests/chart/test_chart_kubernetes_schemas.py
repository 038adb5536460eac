"""Every rendered manifest is a valid Kubernetes object.

Built-in kinds are validated with kubernetes-validate against the upstream
OpenAPI-derived JSON Schemas in strict mode (unknown fields are errors). CRD
kinds (CNPG Cluster/Pooler, ServiceMonitor, ExternalSecret) have no bundled
schema, so they are checked by shape: apiVersion, kind, metadata.name and the
spec keys their controllers require.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

# Oldest and newest Kubernetes minors we promise to render valid objects for.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
CNPG_API = "postgresql.cnpg.io/v1"
MONITORING_API = "monitoring.coreos.com/v1"

CRD_SHAPES: dict[str, tuple[set[str], dict[str, set[str]]]] = {
    # kind: (accepted apiVersions, {"spec": required keys, ...})
    "Cluster": ({CNPG_API}, {"spec": {"instances", "imageName", "bootstrap", "storage"}}),
    "Pooler": ({CNPG_API}, {"spec": {"cluster", "instances", "type", "pgbouncer"}}),
    "ServiceMonitor": ({MONITORING_API}, {"spec": {"selector", "endpoints"}}),
    "ExternalSecret": ({"external-secrets.io/v1beta1", "external-secrets.io/v1"},
                       {"spec": {"secretStoreRef", "target", "data", "refreshInterval"}}),
}


def check_crd_shape(doc: dict[str, Any]) -> None:
    api_versions, required = CRD_SHAPES[doc["kind"]]
    assert doc["apiVersion"] in api_versions, doc["apiVersion"]
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"]
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    assert required["spec"] <= set(doc["spec"]), (doc["kind"], sorted(doc["spec"]))
    if doc["kind"] == "Cluster":
        assert set(doc["spec"]["bootstrap"]["initdb"]) >= {"database", "owner"}
        assert doc["spec"]["storage"]["size"]
    if doc["kind"] == "Pooler":
        assert doc["spec"]["type"] in {"rw", "ro"}
        assert doc["spec"]["pgbouncer"]["poolMode"] in {"session", "transaction"}
        assert all(isinstance(v, str) for v in doc["spec"]["pgbouncer"].get("parameters", {}).values())
    if doc["kind"] == "ServiceMonitor":
        assert all("port" in e for e in doc["spec"]["endpoints"])
    if doc["kind"] == "ExternalSecret":
        assert all({"secretKey", "remoteRef"} <= set(d) for d in doc["spec"]["data"])


def validate(doc: dict[str, Any]) -> None:
    if doc["kind"] in CRD_SHAPES:
        check_crd_shape(doc)
        return
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


RENDERS = {
    "default": ({}, ()),
    "cnpg-api": ({}, (CNPG_API, MONITORING_API)),
    "pooler": ({"postgres": {"pooler": {"enabled": True}}}, (CNPG_API,)),
    "dsn-secret": ({"postgres": {"dsnSecret": {"name": "external-pg"}, "cluster": {"enabled": False}}}, ()),
    "ingress-no-host": ({"ingress": {"enabled": True}}, ()),
    "auth-off": ({"auth": {"enabled": False}}, ()),
    "nats-user-password": ({"nats": {"credentials": {"type": "userPassword", "secretName": "pgmeter-nats"}}}, ()),
    "collector-ha": ({"networkPolicy": {"enabled": True}, "collector": {
        "enabled": True, "replicas": 3, "storage": {"storageClassName": "fast"},
        "authTokensSecret": {"name": "producer-tokens", "key": "tokens.json"},
        "pipelines": [{"name": "otel", "source": {"type": "otlp_logs", "grpcListen": "0.0.0.0:4317"}},
                      {"name": "pods", "source": {"type": "kubernetes", "namespaces": ["tpp-a"]}},
                      {"name": "all-pods", "source": {"type": "kubernetes"}}],
        "networkPolicy": {"ingress": [{"podSelector": {}}]}}}, ()),
    "nats-token": ({"nats": {"credentials": {"type": "token", "secretName": "pgmeter-nats"}}}, ()),
    "network-policy-pod-peers": ({"lago": {"enabled": True}, "networkPolicy": {"enabled": True, "ingress": {
        "api": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}},
                {"ipBlock": {"cidr": "10.0.0.0/8"}}],
        "metrics": []}}}, ()),
}


@pytest.mark.parametrize("case", sorted(RENDERS))
def test_manifests_are_valid(render, case) -> None:
    values, api_versions = RENDERS[case]
    rendered = render(values, api_versions=api_versions)
    assert rendered.docs
    for doc in rendered.docs:
        validate(doc)


def test_all_on_and_all_off_manifests_are_valid(all_on_render, all_off_render) -> None:
    kinds = set()
    for rendered in (all_on_render, all_off_render):
        for doc in rendered.docs:
            validate(doc)
            kinds.add(doc["kind"])
    assert set(CRD_SHAPES) <= kinds  # the shape checks really ran


def test_validation_is_live(default_render, all_on_render) -> None:
    """A broken copy of a rendered manifest is rejected: the checks can fail."""
    deployment = copy.deepcopy(default_render.get("Deployment", "pgmeter-api"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)

    cluster = copy.deepcopy(all_on_render.get("Cluster", "pgmeter-pg"))
    del cluster["spec"]["bootstrap"]
    with pytest.raises((AssertionError, KeyError)):
        validate(cluster)
