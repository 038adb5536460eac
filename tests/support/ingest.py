"""Helpers to ingest events through the real API and wait for the sink.

Typical use in a test (``settings`` is the isolated per-test fixture)::

    from tests.support.app import AppServer
    from tests.support.ingest import make_event, post_events, wait_until_stored

    with AppServer(settings, {"api", "sink"}) as server, server.client() as client:
        events = [make_event(subject="tpp-1", data={"tokens": 5}) for _ in range(10)]
        assert post_events(client, events).status_code == 204
        wait_until_stored(settings.postgres.url, 10)

``make_event`` builds a valid CloudEvent dict (a fresh unique ``id`` unless given);
``post_events`` sends one event or a list with any of the three content types;
``wait_until_stored`` polls Postgres until the ``events`` table holds at least
``count`` rows and returns the count (it fails the test on timeout).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import psycopg
from psycopg import sql

from pgmeter.config import Settings
from pgmeter.devstack import services as devstack
from pgmeter.devstack.process import ManagedProcess, free_port

# limits for tests that send fixed dates (2024, 2031...) through the api: the default
# window (limits.eventMaxAge 400 days back, eventMaxAhead 1 day ahead) would refuse them.
WIDE_TIME_LIMITS = {"eventMaxAge": timedelta(days=100 * 365), "eventMaxAhead": timedelta(days=10 * 365)}

CLOUDEVENT = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
JSON = "application/json"


def rfc3339(value: datetime) -> str:
    """``2024-01-01T00:00:00.123456Z`` (UTC) for an aware datetime."""
    value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return text + "Z"


def make_event(id: str | None = None, *, source: str = "pgmeter-tests", type: str = "api.call",
               subject: str = "customer-1", time: datetime | str | None = None,
               data: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A valid CloudEvent. ``time`` may be a datetime (sent as RFC 3339 UTC) or a raw string;
    ``None`` leaves it out (the server uses its own clock). Extra keys are added as given."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": id or uuid.uuid4().hex,
        "source": source,
        "type": type,
        "subject": subject,
    }
    if time is not None:
        event["time"] = rfc3339(time) if isinstance(time, datetime) else time
    if data is not None:
        event["data"] = data
    event.update(extra)
    return event


def post_events(client: httpx.Client, events: dict[str, Any] | list[dict[str, Any]],
                content_type: str | None = None) -> httpx.Response:
    """POST ``events`` to ``/api/v1/events``.

    The content type defaults to ``application/cloudevents+json`` for one event (a dict)
    and ``application/cloudevents-batch+json`` for a list.
    """
    if content_type is None:
        content_type = CLOUDEVENT if isinstance(events, dict) else BATCH
    return client.post("/api/v1/events", content=json.dumps(events), headers={"content-type": content_type})


def stored_count(database_url: str, namespace: str | None = None) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        if namespace is None:
            row = conn.execute("SELECT count(*) FROM events").fetchone()
        else:
            row = conn.execute("SELECT count(*) FROM events WHERE namespace = %s", (namespace,)).fetchone()
    assert row is not None
    return int(row[0])


def wait_until_stored(database_url: str, count: int, timeout: float = 60, namespace: str | None = None) -> int:
    """Wait until at least ``count`` events are committed; return how many there are."""
    deadline = time.monotonic() + timeout
    found = 0
    while time.monotonic() < deadline:
        found = stored_count(database_url, namespace)
        if found >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"only {found} of {count} events stored after {timeout:.0f}s")


def dead_letters(database_url: str) -> list[dict[str, Any]]:
    """Every dead letter, oldest first: stream_seq, item, subject, reason, payload."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        cursor = conn.execute("SELECT stream_seq, item, subject, reason, payload FROM dead_letters ORDER BY id")
        names = [column.name for column in cursor.description or []]
        return [dict(zip(names, row, strict=False)) for row in cursor.fetchall()]


def post_with_retry(client: httpx.Client, events: list[dict[str, Any]], *, content_type: str = BATCH,
                    deadline: float = 120) -> int:
    """POST until the server answers 204, retrying as OpenMeter's SDK does: on 500, 502,
    503 and 504 and on connection errors, with backoff. Returns the number of attempts."""
    stop = time.monotonic() + deadline
    attempt = 0
    delay = 0.05
    while True:
        attempt += 1
        try:
            response = post_events(client, events, content_type)
            if response.status_code == 204:
                return attempt
            if response.status_code not in (500, 502, 503, 504):
                raise AssertionError(f"unexpected {response.status_code}: {response.text}")
        except httpx.TransportError:
            pass
        if time.monotonic() > stop:
            raise AssertionError(f"events not accepted after {attempt} attempts")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


# -- isolated settings for a whole test module --------------------------------------------

TEMPLATE_DB = "pgmeter_test_template"  # migrated once per session by tests/conftest.py


@contextmanager
def isolated_settings(pg_server: Any, nats_url: str, valkey_url: str | None = None,
                      **overrides: Any) -> Iterator[Settings]:
    """Settings with a fresh database (cloned from the migrated template), stream, subject
    prefix and consumer: for module-scoped servers. Cleans both up afterwards."""
    tag = uuid.uuid4().hex[:10]
    name = f"pgmeter_ing_{tag}"
    admin = pg_server.url(pg_server.maintenance_db)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                       sql.Identifier(TEMPLATE_DB)))
    nats_settings = {"url": nats_url, "stream": f"T_{tag}", "subject_prefix": f"t{tag}.events",
                     "consumer": f"sink_{tag}", **overrides.pop("nats", {})}
    built = Settings(
        address=f"127.0.0.1:{free_port()}",
        postgres={"url": pg_server.url(name)},
        nats=nats_settings,
        valkey={"url": valkey_url, "key_prefix": f"t{tag}:"} if valkey_url else {},
        **overrides,
    )
    try:
        yield built
    finally:
        asyncio.run(delete_stream(nats_url, built.nats.stream))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def delete_stream(url: str, stream: str) -> None:
    try:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    except Exception:
        return
    try:
        await nc.jetstream().delete_stream(stream)
    except Exception:
        pass
    finally:
        await nc.close()


# -- private servers that a test may stop and restart ------------------------------------


def _restartable(start: Callable[[], tuple[ManagedProcess, str]], attempts: int = 3) -> tuple[ManagedProcess, str]:
    """Start a server on its fixed port, trying again if it exits during start-up.

    A restart must reuse the port the app was configured with, and while the server
    was down any process on the machine may have used that (ephemeral-range) port
    for an outgoing connection for a moment; the bind fails until it is closed.
    """
    for attempt in range(attempts):
        try:
            return start()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


class PrivateNats:
    """A nats-server (JetStream) of the test's own, restartable on the same port and store."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "nats"
        self.port = free_port()
        self.process: ManagedProcess | None = None
        self.url = f"nats://127.0.0.1:{self.port}"

    def start(self) -> PrivateNats:
        self.process, self.url = _restartable(lambda: devstack.start_nats(
            self.dir, self.port, log_path=self.dir.parent / "nats.log"))
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class PrivatePostgres:
    """A PostgreSQL of the test's own (migrated), restartable on the same port and data."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "postgres"
        self.port = free_port()
        self.process: ManagedProcess | None = None
        self.url = ""

    def start(self) -> PrivatePostgres:
        from pgmeter.db.migrate import migrate

        self.process, self.url = _restartable(lambda: devstack.start_postgres(
            self.dir, self.port, log_path=self.dir.parent / "pg.log"))
        migrate(self.url)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
