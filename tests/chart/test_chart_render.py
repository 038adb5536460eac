"""Which objects each configuration renders, names, labels, and the CH-less profile."""

from __future__ import annotations

import re

import pytest

RELEASE = "pgmeter"
CNPG_API = "postgresql.cnpg.io/v1"
MONITORING_API = "monitoring.coreos.com/v1"

DEFAULT_OBJECTS = [
    ("ConfigMap", "pgmeter-config"),
    ("ConfigMap", "pgmeter-migrate-config"),
    ("Deployment", "pgmeter-api"),
    ("Deployment", "pgmeter-refresher"),
    ("Deployment", "pgmeter-sink"),
    ("Job", "pgmeter-migrate"),
    ("Pod", "pgmeter-test-health"),
    ("PodDisruptionBudget", "pgmeter-api"),
    ("PodDisruptionBudget", "pgmeter-refresher"),
    ("PodDisruptionBudget", "pgmeter-sink"),
    ("Service", "pgmeter"),
    ("Service", "pgmeter-metrics"),
    ("ServiceAccount", "pgmeter"),
    ("ServiceAccount", "pgmeter-migrate"),
]
OPTIONAL_KINDS = {"Cluster", "Pooler", "ServiceMonitor", "NetworkPolicy", "HorizontalPodAutoscaler",
                  "Ingress", "ExternalSecret", "PrometheusRule"}


def test_default_render_is_exactly_the_core(default_render) -> None:
    assert default_render.names() == DEFAULT_OBJECTS
    assert not default_render.kinds() & OPTIONAL_KINDS
    # The Blueprint CI smoke step wants at least 5 lines from a no-values render.
    assert len(default_render.text.splitlines()) >= 5


def test_every_toggle_on_renders_every_optional_object(all_on_render) -> None:
    names = set(all_on_render.names())
    assert set(DEFAULT_OBJECTS) <= names
    assert names - set(DEFAULT_OBJECTS) == {
        ("Cluster", "pgmeter-pg"),
        ("Pooler", "pgmeter-pg-pooler"),
        ("ServiceMonitor", "pgmeter"),
        ("NetworkPolicy", "pgmeter"),
        ("NetworkPolicy", "pgmeter-api"),
        ("NetworkPolicy", "pgmeter-lago-sync"),
        ("NetworkPolicy", "pgmeter-test"),
        ("HorizontalPodAutoscaler", "pgmeter-api"),
        ("Ingress", "pgmeter"),
        ("ExternalSecret", "pgmeter-valkey"),
        ("Deployment", "pgmeter-lago-sync"),
        ("ConfigMap", "pgmeter-dashboard"),
        ("ConfigMap", "pgmeter-collector"),
        ("Service", "pgmeter-collector"),
        ("Service", "pgmeter-collector-headless"),
        ("StatefulSet", "pgmeter-collector"),
        ("NetworkPolicy", "pgmeter-collector"),
    }


def test_every_toggle_explicitly_off(all_off_render) -> None:
    assert all_off_render.names() == [
        ("ConfigMap", "pgmeter-config"),
        ("Deployment", "pgmeter-api"),
        ("Deployment", "pgmeter-refresher"),
        ("Deployment", "pgmeter-sink"),
        ("Service", "pgmeter"),
        ("Service", "pgmeter-metrics"),
        ("ServiceAccount", "pgmeter"),
    ]


@pytest.mark.parametrize(("values", "api_versions", "expected"), [
    # The ServiceMonitor double gate, with the real .Capabilities (helm --api-versions).
    ({"serviceMonitor": {"enabled": True}}, (MONITORING_API,), {"ServiceMonitor"}),
    ({"serviceMonitor": {"enabled": True}}, (), set()),
    ({"serviceMonitor": {"enabled": False}}, (MONITORING_API,), set()),
    # ...and the offline override.
    ({"serviceMonitor": {"enabled": True}, "capabilities": {"assumeAPIVersions": [MONITORING_API]}}, (),
     {"ServiceMonitor"}),
    # CNPG Cluster: on by default, gated on postgresql.cnpg.io/v1.
    ({}, (CNPG_API,), {"Cluster"}),
    ({"postgres": {"cluster": {"enabled": False}}}, (CNPG_API,), set()),
    ({"postgres": {"pooler": {"enabled": True}}}, (CNPG_API,), {"Cluster", "Pooler"}),
    ({"postgres": {"pooler": {"enabled": True}}}, (), set()),
    ({"capabilities": {"assumeAPIVersions": [CNPG_API]}}, (), {"Cluster"}),
])
def test_crd_resources_are_capabilities_gated(render, values, api_versions, expected) -> None:
    rendered = render(values, api_versions=api_versions)
    assert rendered.kinds() & {"Cluster", "Pooler", "ServiceMonitor"} == expected


def test_notes_warn_when_the_cluster_cannot_be_rendered(render) -> None:
    assert "no CNPG Cluster was rendered" in render().notes
    assert "no CNPG Cluster was rendered" not in render(api_versions=(CNPG_API,)).notes


LEAK = re.compile(r"clickhouse|kafka|bitnami|altinity", re.IGNORECASE)


def test_no_clickhouse_kafka_or_bitnami(default_render, all_on_render) -> None:
    for rendered in (default_render, all_on_render):
        assert not LEAK.search(rendered.text), LEAK.search(rendered.text)


LABELS = {
    "app.kubernetes.io/name": "pgmeter",
    "app.kubernetes.io/instance": RELEASE,
    "app.kubernetes.io/managed-by": "Helm",
    "app.kubernetes.io/version": "0.1.0",
    "app.kubernetes.io/part-of": "pgmeter",
    "helm.sh/chart": "bp-pgmeter-0.1.0",
    "catalyst.openova.io/blueprint": "bp-pgmeter",
    "catalyst.openova.io/backend": "cnpg",
}


def test_every_resource_and_pod_carries_the_labels(all_on_render, default_render) -> None:
    for rendered in (all_on_render, default_render):
        for doc in rendered.docs:
            labels = doc["metadata"].get("labels", {})
            assert LABELS.items() <= labels.items(), (doc["kind"], doc["metadata"]["name"], labels)
        for name, _ in rendered.pod_specs():
            kind, _, obj = name.partition("/")
            doc = rendered.get(kind, obj)
            if kind != "Pod":
                pod_labels = doc["spec"]["template"]["metadata"]["labels"]
                assert LABELS.items() <= pod_labels.items(), name


def test_common_labels_reach_every_resource(render) -> None:
    rendered = render({"commonLabels": {"catalyst.openova.io/sovereign": "omantel-1"}})
    for doc in rendered.docs:
        assert doc["metadata"]["labels"]["catalyst.openova.io/sovereign"] == "omantel-1"


@pytest.mark.parametrize(("release", "prefix"), [
    ("pgmeter", "pgmeter"),
    ("smoke-bp-pgmeter", "smoke-bp-pgmeter"),
    ("metering", "metering-pgmeter"),
])
def test_resource_names(render, release, prefix) -> None:
    rendered = render(name=release)
    assert rendered.get("Deployment", f"{prefix}-api")
    assert rendered.get("Service", prefix)


def test_long_release_names_stay_within_limits(render) -> None:
    rendered = render({"capabilities": {"assumeAPIVersions": [CNPG_API]}, "postgres": {"pooler": {"enabled": True}},
                       "lago": {"enabled": True}}, name="a" * 53)
    for doc in rendered.docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
    # CNPG derives "<cluster>-rw"/"<cluster>-pooler..." names from these.
    assert len(rendered.of_kind("Cluster")[0]["metadata"]["name"]) <= 50


def test_image_defaults_to_app_version(default_render, render) -> None:
    images = {c["image"] for _, spec in default_render.pod_specs() for c in spec["containers"]}
    assert images == {"ghcr.io/openova-io/pgmeter:0.1.0"}
    tagged = render({"image": {"tag": "0.1.1"}})
    assert {c["image"] for _, s in tagged.pod_specs() for c in s["containers"]} == {"ghcr.io/openova-io/pgmeter:0.1.1"}
    digest = "sha256:" + "a" * 64
    pinned = render({"image": {"digest": digest}})
    assert {c["image"] for _, s in pinned.pod_specs() for c in s["containers"]} == {f"ghcr.io/openova-io/pgmeter@{digest}"}


def test_no_plaintext_secret_values(all_on_render) -> None:
    """Credentials reach pods only through secretKeyRef, never as literal values."""
    for name, spec in all_on_render.pod_specs():
        for container in spec["containers"]:
            for env in container.get("env", []):
                if re.search(r"PASSWORD|API_KEY|TOKEN|POSTGRES_URL$|NATS_USER", env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (name, env)
    assert not all_on_render.of_kind("Secret")
