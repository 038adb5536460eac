"""Faults mid-stream: kill -9 the sink, restart Postgres, restart NATS.

Each test streams N distinct events through the real api while the fault happens,
with producers that retry the way OpenMeter's SDK does (on 5xx and connection
errors, resending the same ids), then checks that exactly N events are stored,
none twice. Postgres and NATS faults use private servers in the test's tmp dir so
the session's servers stay up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg

from pgmeter.config import Settings
from pgmeter.devstack.process import free_port
from tests.support.app import AppServer, RoleProcess
from tests.support.ingest import (
    PrivateNats,
    PrivatePostgres,
    isolated_settings,
    make_event,
    post_with_retry,
    stored_count,
)

TOTAL = 3000
BATCH = 50
SHORT_ACK_WAIT = timedelta(seconds=2)  # a crashed sink's messages come back quickly


class Producer(threading.Thread):
    """Sends TOTAL distinct events in batches, each retried until it is accepted."""

    def __init__(self, base_url: str, pause: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.pause = pause
        self.sent = 0
        self.attempts = 0
        self.error: BaseException | None = None
        self.events = [make_event(f"fault-{n:06d}", source="faults", subject=f"s{n % 7}", data={"n": n})
                       for n in range(TOTAL)]

    def run(self) -> None:
        import httpx

        try:
            with httpx.Client(base_url=self.base_url, timeout=10) as client:
                for start in range(0, TOTAL, BATCH):
                    self.attempts += post_with_retry(client, self.events[start:start + BATCH], deadline=120)
                    self.sent += BATCH
                    time.sleep(self.pause)
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    def finish(self, timeout: float = 150) -> None:
        self.join(timeout)
        assert not self.is_alive(), "producer did not finish"
        if self.error is not None:
            raise self.error


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def safe_count(url: str) -> int:
    try:
        return stored_count(url)
    except psycopg.OperationalError:
        return -1  # Postgres is the thing being restarted


def assert_exactly_once(url: str) -> None:
    # Let late redeliveries (after ack_wait) arrive; they must change nothing.
    wait_until(lambda: safe_count(url) >= TOTAL, 120, f"{TOTAL} events stored")
    time.sleep(SHORT_ACK_WAIT.total_seconds() + 1)
    with psycopg.connect(url) as conn:
        total, distinct = conn.execute("SELECT count(*), count(DISTINCT (source, id)) FROM events").fetchone()  # type: ignore[misc]
        keys = conn.execute("SELECT count(*) FROM event_dedup").fetchone()
        expected_ids = conn.execute("SELECT count(*) FROM events WHERE id LIKE 'fault-%%'").fetchone()
    assert (total, distinct, keys, expected_ids) == (TOTAL, TOTAL, (TOTAL,), (TOTAL,))


def with_short_ack_wait(settings: Settings, **changes: Any) -> Settings:
    nats = settings.nats.model_copy(update={"ack_wait": SHORT_ACK_WAIT})
    return settings.model_copy(update={"nats": nats, **changes})


def test_sink_killed_with_sigkill_mid_stream(settings: Settings, tmp_path: Path) -> None:
    settings = with_short_ack_wait(settings)
    sink_settings = settings.model_copy(update={"address": f"127.0.0.1:{free_port()}"})
    url = settings.postgres.url
    with AppServer(settings, {"api"}) as api:
        sink = RoleProcess(sink_settings, "sink", tmp_path).start()
        try:
            sink.wait_ready()
            producer = Producer(api.base_url)
            producer.start()
            for round_ in range(2):  # kill it twice, at different points of the stream
                threshold = TOTAL * (round_ + 1) // 4
                wait_until(lambda threshold=threshold: stored_count(url) >= threshold, 60, f"{threshold} events before the kill")
                sink.kill()  # SIGKILL: no graceful anything
                time.sleep(0.3)
                sink = RoleProcess(sink_settings, "sink", tmp_path).start()
                sink.wait_ready()
            producer.finish()
            assert_exactly_once(url)
        finally:
            sink.stop()


def test_postgres_restarted_mid_stream(tmp_path: Path, nats_server: Any) -> None:
    postgres = PrivatePostgres(tmp_path).start()
    try:
        settings = Settings(
            address=f"127.0.0.1:{free_port()}", postgres={"url": postgres.url},
            nats={"url": nats_server.url, "stream": f"PGR_{free_port()}", "subject_prefix": f"pgr{free_port()}.events",
                  "consumer": "sink_pg_restart", "ackWait": SHORT_ACK_WAIT})
        with AppServer(settings, {"api", "sink"}) as app:
            producer = Producer(app.base_url)
            producer.start()
            wait_until(lambda: safe_count(postgres.url) >= TOTAL // 4, 60, "events before the restart")
            postgres.stop()
            time.sleep(1.5)  # the api keeps accepting (JetStream holds the events); the sink retries
            postgres.start()
            producer.finish()
            assert_exactly_once(postgres.url)
    finally:
        postgres.stop()


def test_nats_restarted_mid_stream(tmp_path: Path, pg_server: Any) -> None:
    broker = PrivateNats(tmp_path).start()
    try:
        with isolated_settings(pg_server, broker.url, nats={"ackWait": SHORT_ACK_WAIT}) as settings, \
                AppServer(settings, {"api", "sink"}) as app:
            producer = Producer(app.base_url)
            producer.start()
            url = settings.postgres.url
            wait_until(lambda: stored_count(url) >= TOTAL // 4, 60, "events before the restart")
            broker.stop()
            time.sleep(1.5)  # producers get 503s and retry
            broker.start()
            producer.finish()
            assert producer.attempts > TOTAL // BATCH, "the outage should have made producers retry"
            assert_exactly_once(url)
    finally:
        broker.stop()
