"""Session-wide real services and per-test isolation.

Postgres, NATS and Valkey start once per session (see tests/support/services.py
for the environment variables that use existing servers instead). Each test gets
its own database cloned from a migrated template, its own JetStream stream and
subject prefix, and its own Valkey key prefix.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from pytest_postgresql.janitor import DatabaseJanitor

from pgmeter.config import Settings
from pgmeter.db.migrate import migrate
from pgmeter.devstack.process import free_port
from tests.support import services

TEMPLATE_DB = "pgmeter_test_template"


def _server_dir(prefix: str) -> Path:
    """A directory for server data outside pytest's basetemp.

    Postgres runs as an unprivileged user when the tests run as root, and every new
    pytest session resets its basetemp root to mode 0700, which would lock that user
    out of a server another session is still running.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


@pytest.fixture(scope="session")
def service_dir() -> Iterator[Path]:
    path = _server_dir("pgmeter-test-services-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server_dir() -> Iterator[Path]:
    """Per-test directory for private servers (fault and dev-stack tests)."""
    path = _server_dir("pgmeter-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(service_dir: Path) -> Iterator[services.PostgresServer]:
    server = services.start_postgres(service_dir)
    janitor = _janitor(server, TEMPLATE_DB, as_template=True)
    _drop_quietly(server, TEMPLATE_DB)
    janitor.init()
    migrate(server.url(TEMPLATE_DB))
    try:
        yield server
    finally:
        try:
            _drop_quietly(server, TEMPLATE_DB)
        finally:
            if server.executor is not None:
                server.executor.stop()


def _janitor(server: services.PostgresServer, dbname: str, *, as_template: bool = False,
             template: str | None = None) -> DatabaseJanitor:
    return DatabaseJanitor(user=server.user, host=server.host, port=server.port, password=server.password,
                           dbname=dbname, template_dbname=template, as_template=as_template,
                           maintenance_dbname=server.maintenance_db)


def _drop_quietly(server: services.PostgresServer, dbname: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(server.url(server.maintenance_db), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(sql.Identifier(dbname)))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


@pytest.fixture(scope="session")
def nats_server(service_dir: Path) -> Iterator[services.ProcessServer]:
    server = services.start_nats(service_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def valkey_server(service_dir: Path) -> Iterator[services.ProcessServer]:
    server = services.start_valkey(service_dir)
    yield server
    server.stop()


@pytest.fixture
def database_url(pg_server: services.PostgresServer) -> Iterator[str]:
    name = f"pgmeter_test_{uuid.uuid4().hex[:12]}"
    janitor = _janitor(pg_server, name, template=TEMPLATE_DB)
    janitor.init()
    yield pg_server.url(name)
    _drop_quietly(pg_server, name)


@pytest.fixture
def settings(database_url: str, nats_server: services.ProcessServer,
             valkey_server: services.ProcessServer) -> Iterator[Settings]:
    tag = uuid.uuid4().hex[:10]
    built = Settings(
        address=f"127.0.0.1:{free_port()}",
        postgres={"url": database_url},
        nats={"url": nats_server.url, "stream": f"T_{tag}", "subject_prefix": f"t{tag}.events",
              "consumer": f"sink_{tag}"},
        valkey={"url": valkey_server.url, "key_prefix": f"t{tag}:"},
        portal={"token_secret": f"test-portal-signing-key-{tag}-0123456789"},
    )
    yield built
    asyncio.run(_delete_stream(nats_server.url, built.nats.stream))


async def _delete_stream(url: str, stream: str) -> None:
    try:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    except Exception:
        return  # a fault test may have left NATS down; its stream dies with the session
    try:
        await nc.jetstream().delete_stream(stream)
    except Exception:
        pass  # the test never created it
    finally:
        await nc.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: the test talks to PostgreSQL (CI runs these on PG 15 too)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "pg_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)
