"""Faults that hit work in flight: kill -9 of the sink, the postmaster and nats-server.

Each test streams events through the real api while the fault happens, with a
producer that retries the way OpenMeter's SDK does (on 5xx and connection errors,
resending the same ids) and counts an event only once it was acknowledged (204).
Before each strike the test makes sure the fault hits work in flight: it holds a
lock every sink write transaction needs (tests/support/faults.py), waits until a
sink transaction is blocked on it, and asserts that more events were acknowledged
than committed at that moment. Otherwise a kill of an idle process would prove
nothing.

After recovery: every acknowledged event is stored exactly once, nothing else is
stored, and a meter's totals per subject equal a tally of the acknowledged events
computed here. Postgres and NATS faults use private servers in the test's tmp dir
so the session's servers stay up.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from pgmeter.config import Settings
from pgmeter.devstack.process import free_port
from tests.support.app import AppServer, RoleProcess
from tests.support.faults import consumer_idle, hold_sink_writes, kill_postmaster, wait_for_blocked_writer
from tests.support.ingest import (
    PrivateNats,
    PrivatePostgres,
    isolated_settings,
    make_event,
    post_with_retry,
    stored_count,
)

BATCH = 20
SUBJECTS = 7
SHORT_ACK_WAIT = timedelta(seconds=2)  # a crashed sink's messages come back quickly
METER = {"slug": "fault_n", "aggregation": "SUM", "eventType": "api.call", "valueProperty": "$.n"}


def fault_event(n: int) -> dict[str, Any]:
    return make_event(f"fault-{n:06d}", source="faults", subject=f"s{n % SUBJECTS}", data={"n": n})


class Producer(threading.Thread):
    """Sends numbered events in batches until stopped, each batch retried until it is accepted.

    ``acknowledged`` is the number of events answered 204: ids ``fault-000000`` up to
    ``acknowledged - 1``, since a batch is retried until accepted before the next is sent.
    """

    def __init__(self, base_url: str, pause: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.pause = pause
        self.acknowledged = 0
        self.attempts = 0
        self.batches = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.base_url, timeout=10) as client:
                while not self._halt.is_set():
                    batch = [fault_event(n) for n in range(self.acknowledged, self.acknowledged + BATCH)]
                    self.attempts += post_with_retry(client, batch, deadline=60)
                    self.batches += 1
                    self.acknowledged += BATCH
                    time.sleep(self.pause)
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    def finish(self, timeout: float = 90) -> int:
        """Stop after the batch in hand is acknowledged; returns how many events were."""
        self._halt.set()
        self.join(timeout)
        assert not self.is_alive(), "producer did not finish"
        if self.error is not None:
            raise self.error
        return self.acknowledged


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


def strike_in_flight(url: str, producer: Producer, kill: Callable[[], None], *, after: int) -> tuple[int, int]:
    """Kill while a sink transaction holds acknowledged events it has not committed.

    Waits for ``after`` events to be stored (the sink is working), blocks sink writes,
    waits until a sink transaction waits on the block and more events are acknowledged
    than stored, then calls ``kill`` with the block still held. Returns (acknowledged,
    stored) measured right before the kill.
    """
    wait_until(lambda: safe_count(url) >= after, 60, f"{after} events stored before the fault")
    with hold_sink_writes(url) as holder:
        wait_for_blocked_writer(url, holder)
        stored = stored_count(url)
        wait_until(lambda: producer.acknowledged >= stored + 2 * BATCH, 30, "acknowledged events piling up")
        acknowledged, stored = producer.acknowledged, stored_count(url)
        assert acknowledged > stored, "the fault must hit acknowledged events that are not yet committed"
        kill()
    return acknowledged, stored


def assert_nothing_acknowledged_while_down(producer: Producer) -> None:
    """With JetStream gone no request may be answered 204 (the producer gets 503s or waits).

    Sampled once answers already on their way at the strike have arrived.
    """
    time.sleep(0.3)
    acknowledged = producer.acknowledged
    time.sleep(1)
    assert producer.acknowledged == acknowledged, "events acknowledged while NATS was down"


def assert_exactly_once(url: str, acknowledged: int, api: AppServer) -> None:
    """Every acknowledged event stored once, nothing else; the meter equals our own tally."""
    wait_until(lambda: safe_count(url) >= acknowledged, 60, f"{acknowledged} events stored")
    # Until no redelivery can come any more (a killed sink's messages come back after
    # ack_wait); they must change nothing.
    nats_cfg = api.settings.nats
    wait_until(lambda: consumer_idle(nats_cfg.url, nats_cfg.stream, nats_cfg.consumer), 60, "the consumer idle")
    with psycopg.connect(url) as conn:
        total, distinct = conn.execute("SELECT count(*), count(DISTINCT (source, id)) FROM events").fetchone()  # type: ignore[misc]
        [keys] = conn.execute("SELECT count(*) FROM event_dedup").fetchone()  # type: ignore[misc]
        [highest] = conn.execute("SELECT max(id) FROM events").fetchone()  # type: ignore[misc]
    assert (total, distinct, keys) == (acknowledged, acknowledged, acknowledged)
    assert highest == f"fault-{acknowledged - 1:06d}"  # ids 0..acknowledged-1, none other
    tally: Counter[str] = Counter()
    for n in range(acknowledged):
        tally[f"s{n % SUBJECTS}"] += n
    with api.client() as client:
        response = client.get(f"/api/v1/meters/{METER['slug']}/query", params={"groupBy": "subject"})
    assert response.status_code == 200, response.text
    assert {row["subject"]: row["value"] for row in response.json()["data"]} == {
        subject: float(value) for subject, value in tally.items()}


def with_short_ack_wait(settings: Settings, **changes: Any) -> Settings:
    nats = settings.nats.model_copy(update={"ack_wait": SHORT_ACK_WAIT})
    return settings.model_copy(update={"nats": nats, "meters": [METER], **changes})


def test_sink_killed_with_sigkill_holding_uncommitted_events(settings: Settings, tmp_path: Path) -> None:
    settings = with_short_ack_wait(settings)
    sink_settings = settings.model_copy(update={"address": f"127.0.0.1:{free_port()}"})
    url = settings.postgres.url
    with AppServer(settings, {"api"}) as api:
        sink = RoleProcess(sink_settings, "sink", tmp_path).start()
        try:
            sink.wait_ready()
            producer = Producer(api.base_url)
            producer.start()
            for round_ in range(2):  # twice, at different points of the stream
                strike_in_flight(url, producer, sink.kill, after=(round_ + 1) * 5 * BATCH)
                assert sink.process is not None and sink.process.returncode == -9
                sink = RoleProcess(sink_settings, "sink", tmp_path).start()
                sink.wait_ready()
            assert_exactly_once(url, producer.finish(), api)
        finally:
            sink.stop()


@contextmanager
def on_private_postgres(tmp_path: Path, nats_url: str) -> Iterator[tuple[PrivatePostgres, AppServer]]:
    """An api and a sink on a Postgres of the test's own, which it may kill or stop."""
    postgres = PrivatePostgres(tmp_path).start()
    tag = uuid.uuid4().hex[:10]
    try:
        settings = Settings(
            address=f"127.0.0.1:{free_port()}", postgres={"url": postgres.url}, meters=[METER],
            nats={"url": nats_url, "stream": f"PG_{tag}", "subject_prefix": f"pg{tag}.events",
                  "consumer": f"sink_{tag}", "ackWait": SHORT_ACK_WAIT})
        with AppServer(settings, {"api", "sink"}) as app:
            yield postgres, app
    finally:
        postgres.stop()


@contextmanager
def on_private_nats(tmp_path: Path, pg_server: Any) -> Iterator[tuple[PrivateNats, AppServer]]:
    """An api and a sink on a NATS of the test's own, which it may kill or stop."""
    broker = PrivateNats(tmp_path).start()
    try:
        with isolated_settings(pg_server, broker.url, nats={"ackWait": SHORT_ACK_WAIT}, meters=[METER]) as settings, \
                AppServer(settings, {"api", "sink"}) as app:
            yield broker, app
    finally:
        broker.stop()


def test_postmaster_killed_with_sigkill_mid_transaction(tmp_path: Path, nats_server: Any) -> None:
    with on_private_postgres(tmp_path, nats_server.url) as (postgres, app):
        producer = Producer(app.base_url)
        producer.start()
        backends: list[int] = []

        def kill() -> None:
            assert postgres.process is not None
            backends.append(kill_postmaster(postgres.process))

        strike_in_flight(postgres.url, producer, kill, after=5 * BATCH)
        assert backends[0] > 0
        time.sleep(1)  # the api keeps accepting (JetStream holds the events); the sink retries
        acknowledged_while_down = producer.acknowledged
        postgres.start()  # crash recovery
        wait_until(lambda: producer.acknowledged > acknowledged_while_down, 30, "ingest after the restart")
        assert_exactly_once(postgres.url, producer.finish(), app)


def test_postgres_restarted_mid_transaction(tmp_path: Path, nats_server: Any) -> None:
    """A fast shutdown (SIGINT) rolls the blocked sink transaction back: same promise."""
    with on_private_postgres(tmp_path, nats_server.url) as (postgres, app):
        producer = Producer(app.base_url)
        producer.start()
        strike_in_flight(postgres.url, producer, postgres.stop, after=5 * BATCH)
        time.sleep(1)
        postgres.start()
        assert_exactly_once(postgres.url, producer.finish(), app)


def test_nats_killed_with_sigkill_while_the_sink_holds_events(tmp_path: Path, pg_server: Any) -> None:
    with on_private_nats(tmp_path, pg_server) as (broker, app):
        producer = Producer(app.base_url)
        producer.start()
        url = app.settings.postgres.url
        assert broker.process is not None
        _, stored = strike_in_flight(url, producer, broker.process.kill, after=5 * BATCH)
        # The block is gone: the sink commits what it holds while NATS is down, so its
        # acks are lost and JetStream redelivers events that are already stored.
        wait_until(lambda: stored_count(url) > stored, 30, "the held events committed")
        assert_nothing_acknowledged_while_down(producer)
        broker.start()  # same port and store: JetStream recovers what it acknowledged
        assert_exactly_once(url, producer.finish(), app)


def test_nats_restarted_mid_stream(tmp_path: Path, pg_server: Any) -> None:
    with on_private_nats(tmp_path, pg_server) as (broker, app):
        producer = Producer(app.base_url)
        producer.start()
        url = app.settings.postgres.url
        strike_in_flight(url, producer, broker.stop, after=5 * BATCH)
        assert_nothing_acknowledged_while_down(producer)
        broker.start()
        assert_exactly_once(url, producer.finish(), app)
