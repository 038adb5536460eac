"""The Blueprint release CI's packaging steps, offline: package, guards, smoke render of the .tgz."""

from __future__ import annotations

import tarfile
from pathlib import Path

import helm_python
import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "chart"


def test_package_and_smoke_render(tmp_path) -> None:
    archive = Path(helm_python.package(CHART_DIR, destination=tmp_path))
    assert archive.name == "bp-pgmeter-0.1.0.tgz"
    names = set(tarfile.open(archive).getnames())
    # Guard 1/2: no dependencies to vendor, so nothing under charts/.
    assert not any(n.startswith("bp-pgmeter/charts/") for n in names)
    # What the templates read must ship; the shell tests (run on the directory) need not.
    assert {"bp-pgmeter/dashboards/pgmeter.json", "bp-pgmeter/values.schema.json",
            "bp-pgmeter/templates/tests/test-health.yaml", "bp-pgmeter/README.md"} <= names
    assert not any(n.startswith("bp-pgmeter/tests/") for n in names)

    # Smoke: `helm template smoke-<name> <tgz> --namespace smoke-<name>` with default values.
    with helm_python.Chart.load(archive) as chart:
        assert chart.dependencies == []
        assert chart.metadata["annotations"]["catalyst.openova.io/no-upstream"] == "true"
        files = chart.render(name="smoke-bp-pgmeter", namespace="smoke-bp-pgmeter")
    manifests = "\n---\n".join(body for path, body in files.items() if not path.endswith("NOTES.txt"))
    assert len(manifests.splitlines()) >= 5
    kinds = {d["kind"] for d in yaml.safe_load_all(manifests) if d}
    assert {"Deployment", "Service", "ConfigMap", "Job"} <= kinds
