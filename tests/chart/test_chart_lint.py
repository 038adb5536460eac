"""`helm lint --strict` through the helm-python-sdk (Helm v4's own linter)."""

from __future__ import annotations

import shutil
from pathlib import Path

import helm_python

CHART_DIR = Path(__file__).resolve().parents[2] / "chart"
WARNING = 2  # lint severities: 1 info, 2 warning, 3 error


def _problems(report: dict) -> list[dict]:
    return [m for m in report["messages"] if m["severity"] >= WARNING]


def test_lint_strict_with_defaults() -> None:
    report = helm_python.lint(CHART_DIR, strict=True, namespace="metering")
    assert report["total_charts_linted"] == 1
    assert _problems(report) == [] and report["errors"] == []


def test_lint_strict_with_every_toggle_on(all_on_values) -> None:
    report = helm_python.lint(CHART_DIR, all_on_values, strict=True, namespace="metering")
    assert _problems(report) == [] and report["errors"] == []


def test_lint_strict_with_every_toggle_off(all_off_values) -> None:
    report = helm_python.lint(CHART_DIR, all_off_values, strict=True, namespace="metering")
    assert _problems(report) == [] and report["errors"] == []


def test_lint_is_live(tmp_path) -> None:
    """The linter really reports problems: a broken copy of the chart fails."""
    broken = tmp_path / "bp-pgmeter"
    shutil.copytree(CHART_DIR, broken)
    (broken / "templates" / "broken.yaml").write_text("kind: ConfigMap\nmetadata: {name: [unclosed\n")
    report = helm_python.lint(broken, strict=True)
    assert _problems(report), report

    schema_violation = helm_python.lint(CHART_DIR, {"catalystBlueprint": {"backend": {"kind": "clickhouse"}}},
                                        strict=True)
    assert _problems(schema_violation), schema_violation
