"""Sink failover (issue 19): a sink killed with events in flight hides them for seconds, not a minute.

A live sink keeps every message it holds alive with in-progress acks, so JetStream's
``nats.ackWait`` (5 s by default) only decides how soon a *dead* sink's messages go
to another sink. The test makes sure the first sink really holds uncommitted events
when it dies: a lock on ``event_dedup`` holds its transaction, the kill comes, the
lock goes, and the second sink (another process, already running) must store every
event well within the old 60 s.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import psycopg

from pgmeter.config import Settings
from pgmeter.devstack.process import free_port
from tests.support.app import AppServer, RoleProcess
from tests.support.ingest import make_event, post_events, stored_count

EVENTS = 200
FAILOVER_BOUND = 15.0  # seconds; generous against the 5 s ackWait, far below the old 60 s


def consumer_state(settings: Settings) -> tuple[int, int, int, int, int]:
    """(num_pending, num_ack_pending, ack floor, last stream seq, num_redelivered) of the sink's consumer."""
    async def run() -> tuple[int, int, int, int, int]:
        nc = await nats.connect(settings.nats.url)
        try:
            js = nc.jetstream()
            info = await js.consumer_info(settings.nats.stream, settings.nats.consumer)
            last = (await js.stream_info(settings.nats.stream)).state.last_seq
            return (info.num_pending or 0, info.num_ack_pending or 0, info.ack_floor.stream_seq, last,
                    info.num_redelivered or 0)
        finally:
            await nc.close()
    return asyncio.run(run())


def wait_until(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_killed_sinks_events_are_stored_by_another_within_seconds(settings: Settings, tmp_path: Path) -> None:
    assert settings.nats.ack_wait.total_seconds() == 5  # the shipped default is what is measured
    url = settings.postgres.url
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sink_a = RoleProcess(settings.model_copy(update={"address": f"127.0.0.1:{free_port()}"}), "sink", tmp_path / "a")
    sink_b = RoleProcess(settings.model_copy(update={"address": f"127.0.0.1:{free_port()}"}), "sink", tmp_path / "b")
    with AppServer(settings, {"api"}) as api, api.client() as client:
        sink_a.start()
        try:
            sink_a.wait_ready()
            with psycopg.connect(url) as blocker:
                # Sink A's next transaction waits on this lock with its messages in hand.
                blocker.execute("LOCK TABLE event_dedup IN ACCESS EXCLUSIVE MODE")
                for n in range(EVENTS // 10):
                    events = [make_event(f"failover-{n}-{m}", source="failover") for m in range(10)]
                    assert post_events(client, events).status_code == 204
                wait_until(lambda: (lambda s: s[0] == 0 and s[1] > 0 and s[2] < s[3])(consumer_state(settings)),
                           30, "sink A holding every message")
                delivered = time.monotonic()
                sink_b.start()
                sink_b.wait_ready()
                # Alive but stuck for twice ackWait: its keep-alives must prevent any redelivery.
                time.sleep(max(0.0, delivered + 2 * settings.nats.ack_wait.total_seconds() - time.monotonic()))
                pending, held, floor, last, redelivered = consumer_state(settings)
                assert (pending, redelivered, stored_count(url)) == (0, 0, 0) and held == last - floor > 0
                sink_a.kill()  # SIGKILL with every event in flight
                killed = time.monotonic()
                blocker.rollback()
            wait_until(lambda: stored_count(url) >= EVENTS, 60, "every event stored by sink B")
            failover = time.monotonic() - killed
            print(f"failover: {EVENTS} in-flight events of a killed sink stored by another in {failover:.1f} s "
                  f"(nats.ackWait {settings.nats.ack_wait.total_seconds():.0f} s)")
            assert failover < FAILOVER_BOUND
            with psycopg.connect(url) as conn:
                assert conn.execute("SELECT count(*), count(DISTINCT id) FROM events").fetchone() == (EVENTS, EVENTS)
        finally:
            sink_a.kill()
            sink_b.stop()
