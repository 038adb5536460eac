"""The layering DESIGN promises: the core never imports the rooms, config.py no domain.

Rooms (entitlements, quota, notify, credits, collect, console) are optional domains
built on the core; the core (api, ingest, sink, rollup, query, meters, db, lago,
config, runtime, ...) reaches them only through hooks they register on the Runtime
(``post_commit``, ``meter_guards``, ``quota_values``), and names their services
through small Protocols of its own (``QuotaService``, ``NotifyService``) rather than
importing them, even for type checking. Only the composition roots wire rooms in.

Between rooms, the rule is one direction: a room may import another only if that one
does not import it back, directly or through a third (quota, notify and credits
build on entitlements, notify on quota). Where both would need each other, the dependency the other way goes
through a Runtime hook: the entitlements routes read quota's Valkey-first values from
``runtime.quota_values``, which the composition root sets to ``pgmeter.quota.reader``.

Read from the source with :mod:`ast` rather than by importing it: every import
counts, also one inside a function (the lazy imports that keep start-up light), and
no module runs. import-linter states the same contracts, but as a new dependency for
some fifty lines.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

import pgmeter

SOURCE = Path(pgmeter.__file__).parent
ROOMS = {"entitlements", "quota", "notify", "credits", "collect", "console"}
# Modules whose job is to know which module implements what: they may import anything.
COMPOSITION_ROOTS = {"pgmeter.roles", "pgmeter.cli", "pgmeter.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(module: str, source: str, is_package: bool = False) -> set[str]:
    """Every pgmeter module ``source`` imports (as ``pgmeter.x.y``), relative imports
    resolved, wherever in the file the import statement sits."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from pgmeter import quota`` imports the module pgmeter.quota.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "pgmeter" or name.startswith("pgmeter.")}


def layer(name: str) -> str:
    """``pgmeter.api.meters`` -> ``api``; ``pgmeter.config`` -> ``config``."""
    return name.split(".")[1] if name.count(".") else ""


def modules() -> dict[str, set[str]]:
    return {module_name(path): imported(module_name(path), path.read_text(), path.name == "__init__.py")
            for path in sorted(SOURCE.rglob("*.py"))}


def core_imports_of_rooms() -> set[tuple[str, str]]:
    found = set()
    for module, names in modules().items():
        if layer(module) in ROOMS or module in COMPOSITION_ROOTS:
            continue
        found.update((module, layer(name)) for name in names if layer(name) in ROOMS)
    return found


def room_imports() -> set[tuple[str, str]]:
    """(room, room it imports) over every module of every room."""
    return {(layer(module), layer(name)) for module, names in modules().items() if layer(module) in ROOMS
            for name in names if layer(name) in ROOMS and layer(name) != layer(module)}


def test_the_core_never_imports_a_room() -> None:
    found = sorted(core_imports_of_rooms())
    assert not found, f"core modules importing rooms (register a hook on the Runtime instead): {found}"


def test_rooms_import_each_other_one_way_only() -> None:
    edges = room_imports()
    graph: dict[str, set[str]] = {}
    for room, imported_room in edges:
        graph.setdefault(room, set()).add(imported_room)
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"rooms importing each other (pass one direction through a Runtime hook): {exc.args[1]}")
    # The dependencies the docstring names, so the rule is seen to bite.
    assert {("quota", "entitlements"), ("notify", "entitlements"), ("credits", "entitlements")} <= edges


def test_config_imports_no_pgmeter_module() -> None:
    """config.py is plain settings: every module may import it, so it imports none."""
    assert imported("pgmeter.config", (SOURCE / "config.py").read_text()) == set()


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("pgmeter.api.meters", "from pgmeter.quota import reader", {"pgmeter.quota", "pgmeter.quota.reader"}),
    ("pgmeter.api.meters", "def f():\n    import pgmeter.notify.api\n", {"pgmeter.notify.api"}),
    ("pgmeter.api.meters", "from ..console import routes", {"pgmeter.console", "pgmeter.console.routes"}),
    ("pgmeter.api.meters", "from . import http", {"pgmeter.api", "pgmeter.api.http"}),
    ("pgmeter.lago", "from .sync import start", {"pgmeter.lago.sync", "pgmeter.lago.sync.start"}),
    ("pgmeter.api.meters", "import json\nfrom starlette import routing", set()),
])
def test_imports_are_found_however_written(module: str, source: str, expected: set[str]) -> None:
    is_package = module == "pgmeter.lago"
    assert imported(module, source, is_package) == expected
