"""Lago sync against a stand-in that behaves like Lago (tests/support/lago.py).

Events go through the real pipeline (API → JetStream → sink → Postgres); usage is
read through the query engine; the oracle is computed here from the same events.
The property every scenario checks: what Lago holds per subscription and metric
equals the meter's true usage up to the sync's ``now`` (running totals of open
windows included), and no transaction was billed twice. Invoices, time zones and
subscription changes are in test_lago_billing.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pgmeter.config import Settings
from pgmeter.db.pool import create_pool
from pgmeter.lago.client import LagoClient
from pgmeter.lago.sync import LAGO_LOCK_KEY, RunReport, run_sync
from tests.support.app import AppServer, write_config
from tests.support.ingest import make_event, post_events, wait_until_stored
from tests.support.lago import FakeLago

BASE = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
NOW = BASE + timedelta(days=1)
METERS = [
    {"slug": "api_calls", "eventType": "api.call", "aggregation": "COUNT"},
    {"slug": "api_latency", "eventType": "api.call", "aggregation": "SUM", "valueProperty": "$.ms"},
    {"slug": "peak_rate", "eventType": "api.call", "aggregation": "MAX", "valueProperty": "$.ms"},
    {"slug": "avg_latency", "eventType": "api.call", "aggregation": "AVG", "valueProperty": "$.ms"},
]
MAPPINGS = [
    {"meter": "api_calls", "code": "calls"},
    {"meter": "api_latency", "code": "latency_ms"},
]


SUBSCRIPTIONS = {"tpp-1": "tpp-1", "tpp-2": "tpp-2", "tpp-3": "tpp-3", "tpp-mapped": "sub-42"}


def lago_with_subscriptions() -> FakeLago:
    """A Lago set up as the README says: sum_agg/max_agg metrics on ``value``, and an
    active subscription (started well before the events) for every subject."""
    server = FakeLago()
    for code in ("calls", "latency_ms"):
        server.add_metric(code, "sum_agg", "value")
    server.add_metric("peak", "max_agg", "value")
    for external_id in SUBSCRIPTIONS.values():
        server.subscribe(external_id, f"cust-{external_id}", datetime(2026, 1, 1, tzinfo=UTC))
    return server


@pytest.fixture
def lago() -> Iterator[FakeLago]:
    server = lago_with_subscriptions().start()
    yield server
    server.stop()


@pytest.fixture
def pipeline(settings: Settings, lago: FakeLago) -> Iterator[tuple[Settings, AppServer]]:
    settings.lago = settings.lago.model_validate({
        "enabled": False,  # runs are driven by the test, not by the scheduler
        "url": lago.url + "/api/v1/", "apiKey": lago.api_key, "window": "HOUR",  # url as operators write it
        "mappings": MAPPINGS, "subjects": {"tpp-mapped": "sub-42"},
    })
    with AppServer(settings, {"api", "sink", "refresher"}) as app:
        with app.client() as client:
            for meter in METERS:
                response = client.post("/api/v1/meters", json=meter)
                assert response.status_code == 201, response.text
        yield settings, app


def ingest(app: AppServer, settings: Settings, events: list[dict[str, Any]], stored_before: int) -> int:
    with app.client() as client:
        post_events(client, events)
    total = stored_before + len({(e["source"], e["id"]) for e in events})
    wait_until_stored(settings.postgres.url, total)
    return total


def api_call(n: int, subject: str, at: datetime, ms: int | str | None) -> dict[str, Any]:
    data = {"endpoint": "/accounts"} if ms is None else {"endpoint": "/accounts", "ms": ms}
    return make_event(id=f"e{n}", source="bank", type="api.call", subject=subject, time=at, data=data)


def first_copies(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dedup as OpenMeter does: the first event with a (source, id) wins."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for event in events:
        if (event["source"], event["id"]) not in seen:
            seen.add((event["source"], event["id"]))
            kept.append(event)
    return kept


def truth(events: list[dict[str, Any]], *, until: datetime, subjects: dict[str, str]) -> dict[tuple[str, str], Decimal]:
    """The oracle: COUNT and SUM per subscription of every event before ``until`` (the
    sync's now: open windows are sent as running totals)."""
    totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for event in first_copies(events):
        time = datetime.fromisoformat(event["time"])
        if time >= until:
            continue
        subscription = subjects.get(event["subject"], event["subject"])
        totals[(subscription, "calls")] += 1
        value = event["data"].get("ms")
        if value is not None:
            totals[(subscription, "latency_ms")] += Decimal(str(value))
    return {k: v for k, v in totals.items() if v}


def sync(settings: Settings, lago: FakeLago, now: datetime, *, dry_run: bool = False) -> RunReport:
    async def go() -> RunReport:
        pool = await create_pool(settings.postgres.url, size=3)
        client = LagoClient(lago.url, lago.api_key)
        try:
            return await run_sync(pool, settings, client, now=now, dry_run=dry_run)
        finally:
            await client.aclose()
            await pool.close()

    return asyncio.run(go())


def generated_events(start: int = 0) -> list[dict[str, Any]]:
    events = []
    subjects = ["tpp-1", "tpp-2", "tpp-3", "tpp-mapped"]
    for n in range(start, start + 240):
        at = BASE + timedelta(minutes=7 * n, seconds=n % 60)
        ms: int | str | None = [120, "35.5", None, 7][n % 4]
        events.append(api_call(n, subjects[n % len(subjects)], at, ms))
    events.append(api_call(start, "tpp-1", BASE, 999))  # a duplicate: counted once
    return events


def assert_lago_matches(lago: FakeLago, expected: dict[tuple[str, str], Decimal]) -> None:
    assert lago.totals() == expected
    ids = [(e["external_subscription_id"], e["transaction_id"]) for e in lago.stored]
    assert len(ids) == len(set(ids)), "a transaction was billed twice"


def test_normal_run_sends_usage_up_to_now_exactly(pipeline: tuple[Settings, AppServer], lago: FakeLago) -> None:
    settings, app = pipeline
    events = generated_events()
    ingest(app, settings, events, 0)
    cutoff = datetime(2026, 3, 2, 20, 0, 30, tzinfo=UTC)  # mid-window: its running total goes too
    report = sync(settings, lago, cutoff)
    assert report.errors == [] and report.refused == [] and report.delivered == len(report.planned) > 0
    assert_lago_matches(lago, truth(events, until=cutoff, subjects=settings.lago.subjects))
    # Mapped subjects go to their subscription; nothing under the raw subject.
    assert any(e["external_subscription_id"] == "sub-42" for e in lago.stored)
    assert not any(e["external_subscription_id"] == "tpp-mapped" for e in lago.stored)
    # A second run with nothing new sends nothing.
    calls = lago.calls
    again = sync(settings, lago, cutoff)
    assert again.planned == [] and lago.calls == calls
    # A minute later the open window's growth goes as a delta, then the rest.
    sync(settings, lago, cutoff + timedelta(minutes=7))
    assert_lago_matches(lago, truth(events, until=cutoff + timedelta(minutes=7), subjects=settings.lago.subjects))
    sync(settings, lago, NOW + timedelta(days=1))
    assert_lago_matches(lago, truth(events, until=NOW + timedelta(days=1), subjects=settings.lago.subjects))


def test_late_events_send_corrections_not_duplicates(pipeline: tuple[Settings, AppServer], lago: FakeLago) -> None:
    settings, app = pipeline
    events = generated_events()
    stored = ingest(app, settings, events, 0)
    sync(settings, lago, NOW)
    sent_before = len(lago.stored)
    late = [api_call(1000 + n, ["tpp-1", "tpp-2"][n % 2], BASE + timedelta(minutes=13 * n), 50 + n)
            for n in range(30)]
    ingest(app, settings, late, stored)
    report = sync(settings, lago, NOW + timedelta(minutes=5))
    corrections = [item for item in report.planned if item.window_start < NOW]
    assert corrections and all(item.revision >= 1 for item in corrections)
    assert len(lago.stored) > sent_before
    assert_lago_matches(lago, truth(events + late, until=NOW + timedelta(minutes=5), subjects=settings.lago.subjects))


def test_crash_between_sending_and_recording_bills_once(pipeline: tuple[Settings, AppServer], lago: FakeLago) -> None:
    settings, app = pipeline
    events = generated_events()
    ingest(app, settings, events, 0)
    lago.hold_answers.set()  # Lago commits the batch but the sync never hears back...
    process = subprocess.Popen([sys.executable, "-m", "pgmeter", "--config", str(_config_path(settings)),
                                "lago-sync", "--once"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not lago.stored and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lago.stored, "the sync never reached Lago"
    finally:
        process.kill()  # ...because it dies right there
        process.wait(10)
        lago.hold_answers.clear()
    in_lago = len(lago.stored)
    retry = sync(settings, lago, datetime.now(UTC))
    assert retry.duplicates == in_lago  # value_already_exist: recognised as delivered, not re-billed
    assert_lago_matches(lago, truth(events, until=datetime.now(UTC), subjects=settings.lago.subjects))
    # An answer lost in flight (Lago stored, then failed the response) is healed the same way.
    late = [api_call(4000 + n, "tpp-1", BASE + timedelta(minutes=n), 1) for n in range(5)]
    ingest(app, settings, late, len({(e["source"], e["id"]) for e in events}))
    lago.fail_after_store = 1
    healed = sync(settings, lago, datetime.now(UTC))
    assert healed.duplicates > 0 and healed.pending == 0
    assert_lago_matches(lago, truth(events + late, until=datetime.now(UTC), subjects=settings.lago.subjects))


def test_lago_down_then_back(pipeline: tuple[Settings, AppServer], lago: FakeLago) -> None:
    settings, app = pipeline
    events = generated_events()
    ingest(app, settings, events, 0)
    lago.outage = 100
    down = sync(settings, lago, NOW)
    assert down.delivered == 0 and down.pending == len(down.planned) > 0
    assert lago.stored == []
    lago.outage = 0
    back = sync(settings, lago, NOW)
    assert back.delivered == len(down.planned)
    assert_lago_matches(lago, truth(events, until=NOW, subjects=settings.lago.subjects))


def test_429_storm_is_waited_out(pipeline: tuple[Settings, AppServer], lago: FakeLago) -> None:
    settings, app = pipeline
    events = generated_events()
    ingest(app, settings, events, 0)
    lago.rate_limit, lago.rate_limit_reset = 2, "0"
    report = sync(settings, lago, NOW)
    assert report.errors == [] and report.pending == 0
    assert lago.calls >= 3
    lago.rate_limit = 1000  # a storm longer than one run: deferred, then delivered
    more = [api_call(2000 + n, "tpp-3", NOW + timedelta(hours=1, minutes=n), 5) for n in range(10)]
    ingest(app, settings, more, len({(e["source"], e["id"]) for e in events}))
    stormy = sync(settings, lago, NOW + timedelta(hours=3))
    assert stormy.pending > 0 and any("429" in e for e in stormy.errors)
    lago.rate_limit = 0
    sync(settings, lago, NOW + timedelta(hours=3))
    assert_lago_matches(lago, truth(events + more, until=NOW + timedelta(hours=3), subjects=settings.lago.subjects))


def test_unbillable_subject_is_refused_and_the_rest_goes(pipeline: tuple[Settings, AppServer],
                                                         lago: FakeLago) -> None:
    settings, app = pipeline
    # Lago would accept these with 200 and drop them at invoicing; pgmeter refuses them.
    settings.lago.subjects["tpp-3"] = ""
    settings.lago.subjects["tpp-2"] = "sub-ghost"
    events = generated_events()
    ingest(app, settings, events, 0)
    report = sync(settings, lago, NOW)
    refused = report.refused_items
    assert refused and report.delivered == len(report.to_send) > 0
    assert {item.subject for item in refused} == {"tpp-2", "tpp-3"}
    assert not any(e["external_subscription_id"] in ("", "sub-ghost") for e in lago.stored)
    expected = {k: v for k, v in truth(events, until=NOW, subjects=settings.lago.subjects).items()
                if k[0] not in ("", "sub-ghost")}
    assert_lago_matches(lago, expected)
    # A second run does not refuse the same usage again; an open window that keeps
    # growing keeps one refusal row, updated.
    assert sync(settings, lago, NOW).planned == []
    sync(settings, lago, NOW + timedelta(minutes=20))
    sync(settings, lago, NOW + timedelta(minutes=40))

    async def refusal_rows() -> tuple[int, int]:
        conn = await asyncpg.connect(settings.postgres.url)
        try:
            row = await conn.fetchrow("SELECT count(*) AS n, count(DISTINCT (code, subject, window_start)) AS d "
                                      "FROM lago_outbox WHERE status = 'refused'")
            return row["n"], row["d"]
        finally:
            await conn.close()

    rows, distinct = asyncio.run(refusal_rows())
    assert rows == distinct > len(refused)
    status = subprocess.run([sys.executable, "-m", "pgmeter", "--config", str(_config_path(settings)),
                             "lago-sync", "--status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert f"refused {rows}" in status.stdout
    assert "subscription sub-ghost does not exist in Lago" in status.stdout
    assert "empty external_subscription_id" in status.stdout
    # The operator fixes both: sub-ghost is created in Lago (backdated), tpp-3's
    # mapping is corrected. The refused usage is read again and billed, once.
    lago.subscribe("sub-ghost", "cust-ghost", datetime(2026, 1, 1, tzinfo=UTC))
    settings.lago.subjects["tpp-3"] = "tpp-3"
    sync(settings, lago, NOW + timedelta(minutes=40))
    sync(settings, lago, NOW + timedelta(minutes=40))
    assert_lago_matches(lago, truth(events, until=NOW + timedelta(minutes=40), subjects=settings.lago.subjects))


def _config_path(settings: Settings) -> Path:
    import tempfile

    return write_config(settings, Path(tempfile.mkdtemp()) / "pgmeter.yaml")


def test_only_one_sync_runs_at_a_time(pipeline: tuple[Settings, AppServer], lago: FakeLago) -> None:
    settings, app = pipeline
    ingest(app, settings, generated_events(), 0)

    async def contended() -> RunReport:
        holder = await asyncpg.connect(settings.postgres.url)
        try:
            assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", LAGO_LOCK_KEY)
            pool = await create_pool(settings.postgres.url, size=2)
            try:
                return await run_sync(pool, settings, LagoClient(lago.url, lago.api_key), now=NOW)
            finally:
                await pool.close()
        finally:
            await holder.close()

    report = asyncio.run(contended())
    assert report.skipped and report.planned == [] and lago.calls == 0


def test_dry_run_prints_and_changes_nothing(pipeline: tuple[Settings, AppServer], lago: FakeLago) -> None:
    settings, app = pipeline
    events = generated_events()
    ingest(app, settings, events, 0)
    result = subprocess.run([sys.executable, "-m", "pgmeter", "--config", str(_config_path(settings)),
                             "lago-sync", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"transaction_id"')]
    assert lines and {line["code"] for line in lines} == {"calls", "latency_ms"}
    assert lago.calls == 0  # Lago was read (metrics, subscriptions), nothing sent
    real = sync(settings, lago, datetime.now(UTC))
    assert sorted(e["transaction_id"] for e in lines) == sorted(i.transaction_id for i in real.planned)


def test_meters_lago_cannot_correct_are_refused(pipeline: tuple[Settings, AppServer], lago: FakeLago) -> None:
    settings, app = pipeline
    settings.lago.mappings.append(settings.lago.mappings[0].model_validate({"meter": "avg_latency", "code": "avg"}))
    ingest(app, settings, generated_events(), 0)
    report = sync(settings, lago, NOW)
    assert any("AVG" in error and "cannot correct" in error for error in report.errors)
    assert not any(e["code"] == "avg" for e in lago.stored)
    assert any(e["code"] == "calls" for e in lago.stored)


def test_max_meter_corrections_raise_the_max(pipeline: tuple[Settings, AppServer], lago: FakeLago) -> None:
    settings, app = pipeline
    settings.lago.mappings = [settings.lago.mappings[0].model_validate({"meter": "peak_rate", "code": "peak"})]
    events = generated_events()
    stored = ingest(app, settings, events, 0)
    sync(settings, lago, NOW)
    late = [api_call(3000, "tpp-2", BASE + timedelta(minutes=1), 5000)]
    ingest(app, settings, late, stored)
    sync(settings, lago, NOW)
    # Lago's max_agg over what it received equals the true max per subscription.
    received: dict[str, Decimal] = defaultdict(Decimal)
    for event in lago.stored:
        sub = event["external_subscription_id"]
        received[sub] = max(received[sub], Decimal(event["properties"]["value"]))
    assert received["tpp-2"] == 5000
    expected_max: dict[str, Decimal] = defaultdict(Decimal)
    for event in first_copies(events + late):
        value = event["data"].get("ms")
        if value is not None and datetime.fromisoformat(event["time"]) < NOW:
            sub = settings.lago.subjects.get(event["subject"], event["subject"])
            expected_max[sub] = max(expected_max[sub], Decimal(str(value)))
    assert dict(received) == dict(expected_max)


def test_recreated_meter_is_not_billed_again(pipeline: tuple[Settings, AppServer], lago: FakeLago) -> None:
    settings, app = pipeline
    events = generated_events()
    stored = ingest(app, settings, events, 0)
    sync(settings, lago, NOW)
    sent = len(lago.stored)
    with app.client() as client:  # same slug, new meter id
        assert client.delete("/api/v1/meters/api_calls").status_code == 204
        assert client.post("/api/v1/meters", json=METERS[0]).status_code == 201
    assert sync(settings, lago, NOW).planned == [] and len(lago.stored) == sent
    late = [api_call(5000, "tpp-2", BASE + timedelta(minutes=3), 10)]
    ingest(app, settings, late, stored)
    report = sync(settings, lago, NOW)
    assert [item.revision for item in report.planned if item.code == "calls"] == [1]
    assert_lago_matches(lago, truth(events + late, until=NOW, subjects=settings.lago.subjects))


def test_rejected_usage_is_billed_with_the_next_change() -> None:
    from pgmeter.lago.plan import Piece, Sent, next_items

    window = datetime(2026, 3, 2, 8, tzinfo=UTC)
    piece = Piece("s", window, window + timedelta(hours=1), "s", "sub-1", window, window + timedelta(hours=1),
                  Decimal(int(window.timestamp())), Decimal(105))

    def plan(history: list[Sent]) -> list[Any]:
        return next_items(aggregation="SUM", meter_key="default/m", code="c", property="value", piece=piece,
                          history=history)

    items = plan([Sent(0, Decimal(100), Decimal(100), "failed")])
    assert [(i.revision, i.value) for i in items] == [(1, 105)]
    assert [(i.revision, i.value) for i in plan([Sent(0, Decimal(100), Decimal(100))])] == [(1, 5)]
    # Rejected as it stands, and unchanged since: not sent again every run.
    assert plan([Sent(0, Decimal(105), Decimal(105), "failed")]) == []


def test_rows_from_before_subscription_splits_are_not_billed_again(pipeline: tuple[Settings, AppServer],
                                                                   lago: FakeLago) -> None:
    settings, app = pipeline
    events = generated_events()
    stored = ingest(app, settings, events, 0)
    sync(settings, lago, NOW - timedelta(minutes=30))  # the 07:00 window is open

    async def as_if_written_before_migration_007() -> None:
        conn = await asyncpg.connect(settings.postgres.url)
        try:
            await conn.execute("UPDATE lago_outbox SET lago_subscription_id = ''")
        finally:
            await conn.close()

    asyncio.run(as_if_written_before_migration_007())
    late = [api_call(6000 + n, "tpp-1", BASE + timedelta(hours=2, minutes=n), 3) for n in range(3)]
    ingest(app, settings, late, stored)
    sync(settings, lago, NOW)  # the open window grows, a closed one gets late events
    assert_lago_matches(lago, truth(events + late, until=NOW, subjects=settings.lago.subjects))
