"""Static checks of the Dockerfile (docker cannot build on this machine)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_contract() -> None:
    ins = instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    runtime = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM"):]
    ops = dict(runtime)
    assert ops["USER"].split(":")[0] == "10001"
    assert json.loads(ops["ENTRYPOINT"]) == ["pgmeter"]
    assert json.loads(ops["CMD"]) == ["api"]
    assert re.search(r"useradd .*--uid 10001", ops["RUN"])
    installs = [rest for op, rest in ins if op == "RUN" and "pip install" in rest]
    assert installs and all(re.search(r"pip install \.(\s|$)", r) for r in installs)
    assert not any("[dev]" in r or "dev]" in r for r in installs)


def test_dockerfile_copies_what_the_package_build_needs() -> None:
    copied = " ".join(rest for op, rest in instructions() if op == "COPY")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "pyproject.toml" in copied and "src" in copied
    assert pyproject["project"]["readme"] in copied
    assert pyproject["project"]["scripts"]["pgmeter"]
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" or ".venv" in ignore
    for needed in ("pyproject.toml", "README.md", "src/", "sql/"):
        assert f"!{needed}" in ignore
