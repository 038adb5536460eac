"""Chart.yaml and the Catalyst Blueprint agree with each other and the house rules."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "chart"


def test_chart_metadata(chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "bp-pgmeter"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == "0.1.0"
    assert meta["type"] == "application"
    # No upstream chart: the hollow-chart CI guard accepts zero dependencies
    # only with this annotation.
    assert meta["annotations"]["catalyst.openova.io/no-upstream"] == "true"
    assert not meta.get("dependencies")
    assert chart.dependencies == []


def test_app_version_is_the_package_version(chart) -> None:
    # image.tag defaults to appVersion, so it must name the image built from this tree.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert chart.metadata["appVersion"] == pyproject["project"]["version"]


def test_blueprint_identity_and_version(chart, blueprint) -> None:
    assert blueprint["apiVersion"] == "catalyst.openova.io/v1alpha1"
    assert blueprint["kind"] == "Blueprint"
    assert blueprint["metadata"]["name"] == "bp-pgmeter" == chart.metadata["name"]
    assert str(blueprint["spec"]["version"]) == chart.metadata["version"]


def test_blueprint_card_owner_and_manifests(blueprint) -> None:
    spec = blueprint["spec"]
    card = spec["card"]
    for key in ("title", "summary", "icon", "category", "tags", "documentation", "license"):
        assert card.get(key), f"card.{key} is empty"
    assert card["license"] == "Apache-2.0"
    assert spec["visibility"] == "listed"
    assert spec["owner"]["team"] and spec["owner"]["contact"]
    assert spec["manifests"] == {"chart": "./chart"}
    assert spec["placementSchema"]["default"] in spec["placementSchema"]["modes"]
    assert spec["upgrades"]["from"]
    assert spec["observability"]["metrics"] == "prometheus"
    assert spec["observability"]["logs"] == "stdout"


def test_blueprint_depends_exactly_on_cnpg_and_jetstream(blueprint) -> None:
    depends = [(d["blueprint"], d["version"]) for d in blueprint["spec"]["depends"]]
    assert depends == [("bp-cnpg", "^1"), ("bp-nats-jetstream", "^1")]


def _leaves(schema: dict[str, Any], path: tuple[str, ...] = ()):
    """(path, leaf schema) for every non-object property of a JSON Schema."""
    for key, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            yield from _leaves(sub, path + (key,))
        else:
            yield path + (key,), sub


def _lookup(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = values
    for key in path:
        assert isinstance(node, dict) and key in node, f"values.yaml has no {'.'.join(path)}"
        node = node[key]
    return node


def test_config_schema_mirrors_values_paths_and_defaults(blueprint, values_yaml) -> None:
    config_schema = blueprint["spec"]["configSchema"]
    leaves = list(_leaves(config_schema))
    assert len(leaves) >= 20
    for path, leaf in leaves:
        assert "default" in leaf, f"configSchema {'.'.join(path)} has no default"
        assert _lookup(values_yaml, path) == leaf["default"], f"default of {'.'.join(path)} differs"


def test_config_schema_is_valid_and_accepts_the_chart_defaults(blueprint, values_yaml) -> None:
    config_schema = blueprint["spec"]["configSchema"]
    jsonschema.Draft7Validator.check_schema(config_schema)
    jsonschema.Draft7Validator(config_schema).validate(values_yaml)
    kinds = config_schema["properties"]["catalystBlueprint"]["properties"]
    assert kinds["backend"]["properties"]["kind"]["enum"] == ["cnpg"]
    assert kinds["backend"]["properties"]["kind"]["default"] == "cnpg"
    assert kinds["eventBus"]["properties"]["kind"]["default"] == "jetstream"


@pytest.mark.parametrize("overlay", [
    {"catalystBlueprint": {"backend": {"kind": "clickhouse"}}},
    {"catalystBlueprint": {"eventBus": {"kind": "kafka"}}},
    {"api": {"replicas": 0}},
])
def test_config_schema_rejects(blueprint, overlay) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(blueprint["spec"]["configSchema"]).validate(overlay)


def test_values_record_the_ch_less_profile(values_yaml) -> None:
    assert values_yaml["catalystBlueprint"]["backend"]["kind"] == "cnpg"
    assert values_yaml["catalystBlueprint"]["eventBus"]["kind"] == "jetstream"


def test_observability_and_optional_toggles_default_off(values_yaml) -> None:
    for toggle in ("serviceMonitor", "networkPolicy", "hpa", "ingress", "grafanaDashboard", "externalSecrets"):
        assert values_yaml[toggle]["enabled"] is False, toggle
    assert values_yaml["lago"]["enabled"] is False
    assert values_yaml["postgres"]["pooler"]["enabled"] is False


def test_readme_discloses_the_annotation_and_valkey_choice() -> None:
    readme = (CHART_DIR / "README.md").read_text()
    assert "catalyst.openova.io/no-upstream" in readme
    assert "bp-valkey" in readme
    assert "helm install" in readme


def test_auth_is_on_by_default_and_offered_by_the_blueprint(values_yaml, blueprint) -> None:
    assert values_yaml["auth"]["enabled"] is True
    assert values_yaml["nats"]["credentials"]["type"] == ""
    schema = blueprint["spec"]["configSchema"]
    assert schema["properties"]["auth"]["properties"]["enabled"]["default"] is True
    validator = jsonschema.Draft7Validator(schema)
    # A kind of NATS credentials without its Secret is refused by the console form too.
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"nats": {"credentials": {"type": "token", "secretName": ""}}})
    validator.validate({"nats": {"credentials": {"type": "token", "secretName": "pgmeter-nats"}}})
