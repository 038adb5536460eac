"""The wheel carries every module and data file: what `pip install .` and the image get.

Tests run against an editable install, which finds modules on the source tree; a package
missing from the wheel would pass them and fail in the image. So build the wheel, install
it into an empty target directory and import every module from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "src" / "pgmeter"


def _modules_in_tree() -> set[str]:
    found = set()
    for path in SOURCE.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.add(".".join(parts))
    return found


def test_wheel_ships_every_module_and_data_file(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(tmp_path / "dist"), str(REPO)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("pgmeter-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    shipped = {name[:-3].replace("/", ".").removesuffix(".__init__") for name in names if name.endswith(".py")}
    assert _modules_in_tree() <= shipped
    sql_files = {f"pgmeter/sql/{p.relative_to(REPO / 'sql')}" for p in (REPO / "sql").rglob("*.sql")}
    assert sql_files and sql_files <= names
    assert {"pgmeter/api/openapi.yaml", "pgmeter/devstack/example.yaml", "pgmeter/py.typed"} <= names
    static = REPO / "src" / "pgmeter" / "console" / "static"
    console_files = {f"pgmeter/console/static/{p.relative_to(static)}" for p in static.rglob("*") if p.is_file()}
    assert "pgmeter/console/static/vendor/chart.js.LICENSE.md" in console_files
    assert console_files <= names, console_files - names

    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    # Import every module from the unpacked wheel alone (dependencies from this venv,
    # but not the source tree): a module that needs a file the wheel lacks fails here.
    script = (
        "import importlib, sys\n"
        "mods = sys.argv[1:]\n"
        "for m in mods:\n"
        "    mod = importlib.import_module(m)\n"
        f"    assert mod.__file__.startswith({str(target)!r}), (m, mod.__file__)\n"
        "from pgmeter.db.migrate import known_migrations\n"
        "assert len(known_migrations()) >= 5\n"
        "from pgmeter.rollup.templates import load\n"
        "assert load('merge')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}
    # pgmeter.__main__ runs the CLI when imported; its presence is checked above.
    subprocess.run([sys.executable, "-c", script, *sorted(_modules_in_tree() - {"pgmeter.__main__"})],
                   check=True, cwd=tmp_path, env=env, timeout=120)
