"""Fixtures for the bp-pgmeter chart tests.

Everything runs offline through the helm-python-sdk wheel (Helm's Go SDK in a
shared library): no helm binary, no cluster, no network.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "chart"
BLUEPRINT = REPO / "blueprint" / "blueprint.yaml"
RELEASE = "pgmeter"
NAMESPACE = "metering"

CNPG_API = "postgresql.cnpg.io/v1"
MONITORING_API = "monitoring.coreos.com/v1"

_spec = importlib.util.spec_from_file_location("bp_pgmeter_helm_shim", Path(__file__).with_name("helm_shim.py"))
assert _spec and _spec.loader
helm_shim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helm_shim)


@dataclass
class Rendered:
    """The manifests of one render, parsed."""

    files: dict[str, str]
    docs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for path, body in sorted(self.files.items()):
            if path.endswith("NOTES.txt"):
                continue
            self.docs.extend(d for d in yaml.safe_load_all(body) if d)

    @property
    def text(self) -> str:
        return "\n".join(body for path, body in sorted(self.files.items()) if not path.endswith("NOTES.txt"))

    @property
    def notes(self) -> str:
        return next((b for p, b in self.files.items() if p.endswith("NOTES.txt")), "")

    def kinds(self) -> set[str]:
        return {d["kind"] for d in self.docs}

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)} in {self.names()}"
        return found[0]

    def names(self) -> list[tuple[str, str]]:
        return sorted((d["kind"], d["metadata"]["name"]) for d in self.docs)

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(kind/name, pod spec) for every Deployment, StatefulSet, Job and Pod."""
        for d in self.docs:
            name = f'{d["kind"]}/{d["metadata"]["name"]}'
            if d["kind"] in ("Deployment", "StatefulSet", "Job"):
                yield name, d["spec"]["template"]["spec"]
            elif d["kind"] == "Pod":
                yield name, d["spec"]


RenderFn = Callable[..., Rendered]


@pytest.fixture(scope="session")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render() -> RenderFn:
    """render(values=None, api_versions=(), name=..., namespace=...) -> Rendered.

    api_versions plays `helm template --api-versions` (real .Capabilities);
    without it the CRD-gated resources only appear through
    capabilities.assumeAPIVersions, exactly as in an offline `helm template`.
    """

    def _render(values: dict[str, Any] | None = None, *, api_versions: tuple[str, ...] = (),
                name: str = RELEASE, namespace: str = NAMESPACE) -> Rendered:
        files = helm_shim.render(str(CHART_DIR), values, name=name, namespace=namespace,
                                 api_versions=list(api_versions))
        return Rendered(files)

    return _render


@pytest.fixture(scope="session")
def values_yaml() -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text())


@pytest.fixture(scope="session")
def blueprint() -> dict[str, Any]:
    return yaml.safe_load(BLUEPRINT.read_text())


# Values that turn every optional toggle on (the CRD APIs are assumed, as an
# offline render cannot see them).
ALL_ON: dict[str, Any] = {
    "capabilities": {"assumeAPIVersions": [CNPG_API, MONITORING_API]},
    "postgres": {"cluster": {"enabled": True}, "pooler": {"enabled": True}},
    "lago": {"enabled": True, "apiKeySecret": {"name": "lago-api-key", "key": "api-key"}},
    "serviceMonitor": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "hpa": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
    "ingress": {
        "enabled": True,
        "className": "traefik",
        "hosts": [{"host": "metering.example.org", "paths": [{"path": "/", "pathType": "Prefix"}]}],
        "tls": [{"secretName": "metering-tls", "hosts": ["metering.example.org"]}],
    },
    "grafanaDashboard": {"enabled": True},
    "externalSecrets": {
        "enabled": True,
        "items": [{
            "name": "pgmeter-valkey",
            "data": [{"secretKey": "valkey-password",
                      "remoteRef": {"key": "valkey/valkey", "property": "valkey-password"}}],
        }],
    },
    "valkey": {"passwordSecret": {"name": "pgmeter-valkey", "key": "valkey-password"}},
    "auth": {"enabled": True, "tokensSecret": {"name": "pgmeter-tokens", "key": "tokens.json"}},
    "nats": {"credentials": {"type": "credsFile", "secretName": "pgmeter-nats", "credsKey": "pgmeter.creds"}},
    "podDisruptionBudget": {"enabled": True},
    "helmTest": {"enabled": True},
    "migrations": {"enabled": True},
    "collector": {"enabled": True, "tokenSecret": {"name": "pgmeter-collector-token", "key": "token"},
                  "networkPolicy": {"ingress": [{"namespaceSelector": {"matchLabels": {
                      "kubernetes.io/metadata.name": "gateway"}}}]}},
}

# Every toggle explicitly off.
ALL_OFF: dict[str, Any] = {
    "capabilities": {"assumeAPIVersions": []},
    "auth": {"enabled": False},
    "postgres": {"cluster": {"enabled": False}, "pooler": {"enabled": False}},
    "lago": {"enabled": False},
    "serviceMonitor": {"enabled": False},
    "networkPolicy": {"enabled": False},
    "hpa": {"enabled": False},
    "ingress": {"enabled": False},
    "grafanaDashboard": {"enabled": False},
    "externalSecrets": {"enabled": False},
    "podDisruptionBudget": {"enabled": False},
    "helmTest": {"enabled": False},
    "migrations": {"enabled": False},
    "collector": {"enabled": False},
}


@pytest.fixture
def all_on_values() -> dict[str, Any]:
    return copy.deepcopy(ALL_ON)


@pytest.fixture
def all_off_values() -> dict[str, Any]:
    return copy.deepcopy(ALL_OFF)


@pytest.fixture(scope="session")
def default_render(render: RenderFn) -> Rendered:
    return render()


@pytest.fixture(scope="session")
def all_on_render(render: RenderFn) -> Rendered:
    return render(ALL_ON)


@pytest.fixture(scope="session")
def all_off_render(render: RenderFn) -> Rendered:
    return render(ALL_OFF)
