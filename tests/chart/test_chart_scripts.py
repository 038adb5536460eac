"""Run chart/tests/*.sh (written for the real helm binary) against a helm stand-in.

The stand-in (helm_shim.py) renders with the helm-python-sdk, including
--api-versions, so the scripts' assertions run here exactly as in the
Blueprint release CI (`bash <script> <chart_dir>`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "chart"
SCRIPTS = sorted((CHART_DIR / "tests").glob("*.sh"))


@pytest.fixture(scope="module")
def helm_path(tmp_path_factory) -> str:
    bin_dir = tmp_path_factory.mktemp("bin")
    helm = bin_dir / "helm"
    helm.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).with_name("helm_shim.py")}" "$@"\n')
    helm.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def run(script: Path, chart_dir: Path, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), str(chart_dir)], env={**os.environ, "PATH": path},
                          capture_output=True, text=True, timeout=60)


def test_scripts_exist_and_are_strict() -> None:
    assert {s.name for s in SCRIPTS} >= {"observability-toggle.sh", "cnpg-cluster.sh"}
    for script in SCRIPTS:
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "set -euo pipefail" in text
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes(script, helm_path) -> None:
    result = run(script, CHART_DIR, helm_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout


def _mutated_chart(tmp_path: Path, template: str, old: str, new: str) -> Path:
    copy = tmp_path / "bp-pgmeter"
    shutil.copytree(CHART_DIR, copy)
    target = copy / "templates" / template
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new))
    return copy


def test_observability_script_catches_a_broken_gate(tmp_path, helm_path) -> None:
    # Drop the Capabilities half of the double gate: case 3 must fail.
    broken = _mutated_chart(tmp_path, "servicemonitor.yaml",
                            '(include "pgmeter.hasAPI" (dict "root" . "api" "monitoring.coreos.com/v1"))', "true")
    result = run(CHART_DIR / "tests" / "observability-toggle.sh", broken, helm_path)
    assert result.returncode != 0
    assert "without monitoring.coreos.com/v1" in result.stderr


def test_cnpg_script_catches_the_pooler_leaking_into_workers(tmp_path, helm_path) -> None:
    broken = _mutated_chart(tmp_path, "_helpers.tpl", '(eq .role "api") (include "pgmeter.poolerRendered"',
                            '(ne .role "x") (include "pgmeter.poolerRendered"')
    result = run(CHART_DIR / "tests" / "cnpg-cluster.sh", broken, helm_path)
    assert result.returncode != 0
    assert "PGMETER_POSTGRES_QUERY_URL" in result.stderr


def test_shim_fails_like_helm_on_bad_values(helm_path) -> None:
    result = subprocess.run(["helm", "template", "x", str(CHART_DIR), "--set", "catalystBlueprint.backend.kind=clickhouse"],
                            env={**os.environ, "PATH": helm_path}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "backend/kind" in result.stderr
