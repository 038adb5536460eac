"""Lago invoices against the oracle: the right usage in the right period of the right
subscription, with Lago's clock (tests/support/lago.py models lago-api v1.51).

Time is driven by the test: the sync runs with a controlled ``now`` (every event
with a time before it counts as acknowledged) and the stand-in's clock runs Lago's
hourly billing at :10. Events come through the real pipeline, right up to each
period's end; the oracle is computed here from the events themselves.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from pgmeter.config import ConfigError, LagoConfig, Settings, load_settings
from pgmeter.db.pool import create_pool
from pgmeter.lago.client import MAX_RETRY_WAIT, LagoClient, retry_wait
from pgmeter.lago.plan import metric_problem, split_value
from pgmeter.lago.sync import RunReport, run_sync
from tests.support.app import AppServer, write_config
from tests.support.ingest import make_event, post_events, wait_until_stored
from tests.support.lago import FakeLago, Invoice

METERS = [
    {"slug": "api_calls", "eventType": "api.call", "aggregation": "COUNT"},
    {"slug": "api_latency", "eventType": "api.call", "aggregation": "SUM", "valueProperty": "$.ms"},
    {"slug": "peak_rate", "eventType": "api.call", "aggregation": "MAX", "valueProperty": "$.ms"},
]
MAPPINGS = [{"meter": "api_calls", "code": "calls"}, {"meter": "api_latency", "code": "latency_ms"}]


@pytest.fixture
def app(settings: Settings) -> Iterator[AppServer]:
    with AppServer(settings, {"api", "sink", "refresher"}) as server:
        with server.client() as client:
            for meter in METERS:
                assert client.post("/api/v1/meters", json=meter).status_code == 201
        yield server


def configure(settings: Settings, lago: FakeLago, subjects: dict[str, str], mappings: list[dict[str, str]] = MAPPINGS,
              **extra: Any) -> None:
    settings.lago = LagoConfig.model_validate({"url": lago.url, "apiKey": lago.api_key, "mappings": mappings,
                                               "subjects": subjects, **extra})


def standard_metrics(lago: FakeLago) -> None:
    lago.add_metric("calls", "sum_agg", "value")  # COUNT meters: sum_agg, pgmeter sends the count
    lago.add_metric("latency_ms", "sum_agg", "value")


def ingest(app: AppServer, settings: Settings, events: list[dict[str, Any]]) -> None:
    with app.client() as client:
        for start in range(0, len(events), 500):
            assert post_events(client, events[start:start + 500]).status_code == 204
    wait_until_stored(settings.postgres.url, len(events))


def call(n: int, subject: str, at: datetime, ms: int | str) -> dict[str, Any]:
    return make_event(id=f"e{n}", source="bank", type="api.call", subject=subject, time=at,
                      data={"endpoint": "/accounts", "ms": ms})


def sync(settings: Settings, lago: FakeLago, now: datetime, *, client_url: str | None = None) -> RunReport:
    async def go() -> RunReport:
        pool = await create_pool(settings.postgres.url, size=3)
        client = LagoClient(client_url or lago.url, lago.api_key)
        try:
            return await run_sync(pool, settings, client, now=now)
        finally:
            await client.aclose()
            await pool.close()

    return asyncio.run(go())


def drive(settings: Settings, lago: FakeLago, runs: list[datetime], actions: dict[datetime, Any] | None = None,
          ) -> list[RunReport]:
    """Sync at each instant in order, Lago's clock following; ``actions`` run (after
    Lago's clock reached them) at their instants, e.g. an upgrade."""
    reports = []
    moments = sorted(set(runs) | set(actions or {}))
    for moment in moments:
        lago.advance(moment)
        if actions and moment in actions:
            actions[moment]()
        if moment in runs:
            report = sync(settings, lago, moment)
            assert report.errors == [] and report.refused == [], (report.errors, report.refused)
            reports.append(report)
    return reports


def oracle(events: list[dict[str, Any]], subject: str, start: datetime, end: datetime) -> dict[str, Decimal]:
    """COUNT and SUM of ``subject``'s events in [start, end)."""
    units: dict[str, Decimal] = defaultdict(Decimal)
    for event in events:
        at = datetime.fromisoformat(event["time"])
        if event["subject"] == subject and start <= at < end:
            units["calls"] += 1
            units["latency_ms"] += Decimal(str(event["data"]["ms"]))
    return dict(units)


def no_double_billing(lago: FakeLago) -> None:
    ids = [(e["external_subscription_id"], e["transaction_id"]) for e in lago.stored]
    assert len(ids) == len(set(ids))


def periodic(lago: FakeLago, external_id: str) -> list[Invoice]:
    return [i for i in lago.final_invoices() if i.subscription.external_id == external_id
            and i.reason == "subscription_periodic"]


# Customers whose February ends at 00:00, 05:00, 18:30 and 18:15 UTC.
ZONES = {"tpp-utc": "UTC", "tpp-ny": "America/New_York", "tpp-kolkata": "Asia/Kolkata",
         "tpp-kathmandu": "Asia/Kathmandu"}
PERIOD_END = {"tpp-utc": datetime(2026, 3, 1, tzinfo=UTC), "tpp-ny": datetime(2026, 3, 1, 5, tzinfo=UTC),
              "tpp-kolkata": datetime(2026, 2, 28, 18, 30, tzinfo=UTC),
              "tpp-kathmandu": datetime(2026, 2, 28, 18, 15, tzinfo=UTC)}


@pytest.mark.parametrize("window", ["HOUR", "DAY"])
def test_invoices_equal_usage_for_periods_ending_at_any_hour_and_zone(settings: Settings, app: AppServer,
                                                                       window: str) -> None:
    start = datetime(2026, 2, 28, 12, tzinfo=UTC)
    lago = FakeLago(now=start)
    standard_metrics(lago)
    for subject, zone in ZONES.items():
        lago.add_customer(f"cust-{subject}", zone, grace_days=0)  # Lago's default: final at once
        lago.subscribe(f"sub-{subject}", f"cust-{subject}", datetime(2026, 1, 10, 9, 41, 7, 250_000, tzinfo=UTC))
    lago.start()
    try:
        configure(settings, lago, {subject: f"sub-{subject}" for subject in ZONES}, window=window)
        events = []
        n = 0
        for index, subject in enumerate(ZONES):
            at = start + timedelta(seconds=17 * index)
            while at < datetime(2026, 3, 1, 9, tzinfo=UTC):
                events.append(call(n, subject, at, [3, "1.25", 40][n % 3]))
                n += 1
                at += timedelta(minutes=4, seconds=11)
            end = PERIOD_END[subject]
            for edge in (end - timedelta(seconds=1), end - timedelta(milliseconds=1), end,
                         end + timedelta(milliseconds=500)):  # acknowledged right up to the end
                events.append(call(n, subject, edge, 1000 + n))
                n += 1
        ingest(app, settings, events)
        # Runs: every 97 minutes, and one a minute after each period end (lago.interval).
        runs = [start + timedelta(minutes=97 * k) for k in range(13)]
        runs += [end + timedelta(minutes=1) for end in PERIOD_END.values()]
        drive(settings, lago, sorted(runs))
        lago.advance(datetime(2026, 3, 1, 12, tzinfo=UTC))
        for subject in ZONES:
            invoices = periodic(lago, f"sub-{subject}")
            assert len(invoices) == 1, subject
            invoice = invoices[0]
            assert invoice.to == PERIOD_END[subject]
            assert invoice.units == oracle(events, subject, invoice.from_, invoice.to), subject
            assert invoice.units["calls"] > 50
        no_double_billing(lago)
    finally:
        lago.stop()


def test_start_at_0830_and_upgrade_at_1420_bill_exactly(settings: Settings, app: AppServer) -> None:
    day = datetime(2026, 2, 28, tzinfo=UTC)
    started = day + timedelta(hours=8, minutes=30, milliseconds=250)
    upgraded = day + timedelta(hours=14, minutes=20, milliseconds=600)
    lago = FakeLago(now=day + timedelta(hours=7))
    standard_metrics(lago)
    # Lago invoices an upgrade at once; a grace period keeps that invoice open for
    # the last minute of usage (the README's advice for plan changes).
    lago.add_customer("acme", "Europe/Paris", grace_days=1)
    lago.subscribe("sub-acme", "acme", started, plan_code="basic")
    lago.start()
    try:
        configure(settings, lago, {"tpp-acme": "sub-acme"})
        events = []
        at = day + timedelta(hours=8, seconds=3)
        while at < day + timedelta(hours=23, minutes=30):
            events.append(call(len(events), "tpp-acme", at, len(events) % 7))
            at += timedelta(minutes=2, seconds=13)
        for edge in (timedelta(hours=8, minutes=29, seconds=59), timedelta(hours=8, minutes=30, seconds=1),
                     timedelta(hours=14, minutes=19, seconds=59, milliseconds=900),
                     timedelta(hours=14, minutes=20, milliseconds=300), timedelta(hours=14, minutes=20, seconds=1),
                     timedelta(hours=22, minutes=59, seconds=59)):  # Paris midnight is 23:00 UTC
            events.append(call(len(events), "tpp-acme", day + edge, 100))
        ingest(app, settings, events)
        runs = [day + timedelta(hours=7, minutes=83 * k) for k in range(13)]
        runs += [upgraded + timedelta(minutes=1), day + timedelta(hours=23, minutes=1)]
        actions = {upgraded: lambda: lago.upgrade("sub-acme", upgraded, "premium")}
        reports = drive(settings, lago, sorted(runs), actions)
        lago.advance(day + timedelta(days=2, hours=1))
        invoices = [i for i in lago.final_invoices() if i.subscription.external_id == "sub-acme"]
        old = next(i for i in invoices if i.subscription.plan_code == "basic")
        new = next(i for i in invoices if i.subscription.plan_code == "premium")
        assert old.reason == "termination" and new.reason == "subscription_periodic"
        # pgmeter cuts ranges at whole seconds: [08:30:00, 14:20:00) and [14:20:00, 23:00).
        assert old.units == oracle(events, "tpp-acme", day + timedelta(hours=8, minutes=30),
                                   day + timedelta(hours=14, minutes=20))
        assert new.units == oracle(events, "tpp-acme", day + timedelta(hours=14, minutes=20),
                                   day + timedelta(hours=23))
        # Usage before the subscription started is not sent; it is refused, with why.
        refused = [item for report in reports for item in report.refused_items]
        assert refused and all("not active" in (item.reason or "") for item in refused)
        latest = {item.window_start: item.window_value for item in refused if item.code == "calls"}
        assert sum(latest.values()) == oracle(events, "tpp-acme", day, day + timedelta(hours=8, minutes=30))["calls"]
        no_double_billing(lago)
    finally:
        lago.stop()


def test_misconfigured_mappings_are_refused_and_reported(settings: Settings, app: AppServer) -> None:
    lago = FakeLago()
    lago.add_metric("calls_counted", "count_agg")           # counts pgmeter's events, not calls
    lago.add_metric("latency_ms", "sum_agg", "response_ms")  # reads another property
    lago.add_metric("peak", "sum_agg", "value")              # a MAX meter needs max_agg
    lago.add_metric("calls", "sum_agg", "value")
    lago.subscribe("sub-1", "cust-1", datetime(2026, 1, 1, tzinfo=UTC))
    lago.start()
    try:
        mappings = [{"meter": "api_calls", "code": "calls_counted"}, {"meter": "api_latency", "code": "latency_ms"},
                    {"meter": "peak_rate", "code": "peak"}, {"meter": "api_calls", "code": "missing_metric"},
                    {"meter": "api_calls", "code": "calls"}]
        configure(settings, lago, {"tpp-1": "sub-1", "tpp-2": "sub-unknown"}, mappings)
        at = datetime(2026, 3, 2, 8, tzinfo=UTC)
        events = [call(n, ["tpp-1", "tpp-2"][n % 2], at + timedelta(minutes=n), 5) for n in range(40)]
        ingest(app, settings, events)
        now = at + timedelta(hours=2)
        report = sync(settings, lago, now)
        reasons = "\n".join(report.refused)
        assert len(report.refused) == 4
        assert "calls_counted aggregates with count_agg; a COUNT meter needs sum_agg" in reasons
        assert "latency_ms reads property 'response_ms', but the mapping sends 'value'" in reasons
        assert "peak aggregates with sum_agg; a MAX meter needs max_agg" in reasons
        assert "missing_metric does not exist in Lago" in reasons
        assert REGISTRY.get_sample_value("pgmeter_lago_mappings_refused") == 4
        # Only the valid mapping was sent, and only for the subscription Lago knows.
        assert {(e["code"], e["external_subscription_id"]) for e in lago.stored} == {("calls", "sub-1")}
        assert sum(Decimal(e["properties"]["value"]) for e in lago.stored) == 20
        assert {item.external_subscription_id for item in report.refused_items} == {"sub-unknown"}
        status = subprocess.run([sys.executable, "-m", "pgmeter", "--config", str(config_file(settings)),
                                 "lago-sync", "--status"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert status.stdout.count("refused mapping default/") == 4
        assert "subscription sub-unknown does not exist in Lago" in status.stdout
        # The operator fixes the metric in Lago: the usage that waited goes at the next run.
        lago.add_metric("latency_ms", "sum_agg", "value")
        fixed = sync(settings, lago, now)
        assert len(fixed.refused) == 3
        sent = sum(Decimal(e["properties"]["value"]) for e in lago.stored
                   if e["code"] == "latency_ms" and e["external_subscription_id"] == "sub-1")
        assert sent == 5 * 20
        assert REGISTRY.get_sample_value("pgmeter_lago_mappings_refused") == 3
        # Mappings removed from the configuration are not reported any more.
        configure(settings, lago, {"tpp-1": "sub-1", "tpp-2": "sub-unknown"}, [mappings[1], mappings[4]])
        assert sync(settings, lago, now).refused == []
        assert REGISTRY.get_sample_value("pgmeter_lago_mappings_refused") == 0
    finally:
        lago.stop()


@pytest.mark.parametrize("store", ["postgres", "clickhouse"])
def test_values_of_1e12_or_more_bill_exactly_on_both_stores(settings: Settings, app: AppServer, store: str) -> None:
    at = datetime(2026, 3, 30, 10, tzinfo=UTC)
    lago = FakeLago(store=store, now=at)
    standard_metrics(lago)
    lago.subscribe("sub-big", "cust-big", datetime(2026, 3, 1, tzinfo=UTC))
    lago.start()
    try:
        configure(settings, lago, {"tpp-big": "sub-big"})
        events = [call(0, "tpp-big", at, "1500000000000"), call(1, "tpp-big", at + timedelta(minutes=1), "2.5"),
                  call(2, "tpp-big", at + timedelta(hours=30), "999999999999.75")]
        ingest(app, settings, events)
        sync(settings, lago, at + timedelta(minutes=30))
        sync(settings, lago, datetime(2026, 4, 1, 0, 1, tzinfo=UTC))
        latency = [Decimal(e["properties"]["value"]) for e in lago.stored if e["code"] == "latency_ms"]
        assert len(latency) >= 3 and all(abs(v) < Decimal(10) ** 12 for v in latency)
        lago.advance(datetime(2026, 4, 1, 1, tzinfo=UTC))
        [invoice] = periodic(lago, "sub-big")
        assert invoice.units == {"calls": 3, "latency_ms": Decimal("1500000000000") + Decimal("2.5") + Decimal("999999999999.75")}
        # Resending everything changes nothing: duplicates are recognised (Postgres
        # store: 422 value_already_exist) or deduplicated (ClickHouse store: 200).
        stored = len(lago.stored)
        with lago.lock:
            resend = [{k: v for k, v in e.items() if k != "lago_id"} for e in lago.stored]
        response = httpx.post(lago.url + "/api/v1/events/batch", json={"events": resend},
                              headers={"Authorization": f"Bearer {lago.api_key}"})
        assert response.status_code == (422 if store == "postgres" else 200)
        assert len(lago.stored) == stored
    finally:
        lago.stop()


def test_batch_size_setting_is_used(settings: Settings, app: AppServer) -> None:
    lago = FakeLago(batch_max=7)  # a self-hosted Lago with LAGO_EVENTS_BATCH_MAX_LENGTH=7
    standard_metrics(lago)
    lago.subscribe("sub-b", "cust-b", datetime(2026, 1, 1, tzinfo=UTC))
    lago.start()
    try:
        configure(settings, lago, {}, batchSize=7)
        at = datetime(2026, 3, 2, tzinfo=UTC)
        events = [call(n, "sub-b", at + timedelta(hours=n), 1) for n in range(20)]
        ingest(app, settings, events)
        report = sync(settings, lago, at + timedelta(days=1))
        assert report.delivered == 40 and report.pending == 0 and lago.calls == 6  # ceil(40 / 7)
    finally:
        lago.stop()


def test_status_warns_when_delivery_is_slower_than_lago_invoices(settings: Settings) -> None:
    lago = FakeLago()
    lago.add_customer("quick", "UTC", grace_days=0)
    lago.add_customer("patient", "Asia/Kolkata", grace_days=2)
    lago.subscribe("sub-quick", "quick", datetime(2026, 1, 1, tzinfo=UTC))
    lago.subscribe("sub-patient", "patient", datetime(2026, 1, 1, tzinfo=UTC))
    lago.start()
    try:
        # The hourly set-up: fine for a customer with a grace period, not for one without.
        configure(settings, lago, {"tpp-q": "sub-quick", "tpp-p": "sub-patient"}, interval="1h", grace="15m")
        status = subprocess.run([sys.executable, "-m", "pgmeter", "--config", str(config_file(settings)),
                                 "lago-sync", "--status"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        warnings = [line for line in status.stdout.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and "sub-quick" in warnings[0] and "1:15:00" in warnings[0]
        # The defaults (a run a minute, no grace) beat Lago's clock for both.
        configure(settings, lago, {"tpp-q": "sub-quick", "tpp-p": "sub-patient"})
        status = subprocess.run([sys.executable, "-m", "pgmeter", "--config", str(config_file(settings)),
                                 "lago-sync", "--status"], capture_output=True, text=True, timeout=60)
        assert "warning:" not in status.stdout and "delay: interval 0:01:00 + grace 0:00:00" in status.stdout
    finally:
        lago.stop()


def test_stand_in_accepts_what_lago_accepts_and_bills_only_what_lago_bills() -> None:
    """The stand-in's own contract, so the tests above are held to Lago's behaviour."""
    lago = FakeLago(now=datetime(2026, 3, 31, 23, tzinfo=UTC))
    lago.add_metric("calls", "sum_agg", "value")
    lago.subscribe("sub-1", "cust-1", datetime(2026, 3, 10, 8, 30, tzinfo=UTC))
    lago.start()
    try:
        def event(n: int, at: datetime, subscription: str = "sub-1", code: str = "calls") -> dict[str, Any]:
            return {"transaction_id": f"t{n}", "external_subscription_id": subscription, "code": code,
                    "timestamp": at.timestamp(), "properties": {"value": "2"}}

        inside = datetime(2026, 3, 20, tzinfo=UTC)
        batch = [event(1, inside), event(2, inside, "sub-unknown"), event(3, inside, ""),
                 event(4, inside, code="unknown_code"),
                 event(5, datetime(2026, 3, 10, 8, 29, 59, tzinfo=UTC)),  # before started_at
                 event(6, datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC))]     # next period
        headers = {"Authorization": f"Bearer {lago.api_key}"}
        assert httpx.post(lago.url + "/api/v1/events/batch", json={"events": batch}, headers=headers).status_code \
            == 200
        again = httpx.post(lago.url + "/api/v1/events/batch", json={"events": batch[:1]}, headers=headers)
        assert again.status_code == 422
        assert again.json()["error_details"] == {"0": {"transaction_id": ["value_already_exist"]}}
        lago.advance(datetime(2026, 4, 1, 0, 9, tzinfo=UTC))
        assert lago.final_invoices() == []  # not before :10
        lago.advance(datetime(2026, 4, 1, 0, 11, tzinfo=UTC))
        [invoice] = lago.final_invoices()
        assert invoice.units == {"calls": 2} and invoice.from_ == datetime(2026, 3, 10, 8, 30, tzinfo=UTC)
    finally:
        lago.stop()


def config_file(settings: Settings) -> Path:
    return write_config(settings, Path(tempfile.mkdtemp()) / "pgmeter.yaml")


# -- units: no services -------------------------------------------------------------------


def test_retry_wait_reads_seconds_and_epochs_and_is_capped() -> None:
    now = 1_800_000_000.0
    assert retry_wait(httpx.Headers({"Retry-After": "7"}), now=now) == 7
    assert retry_wait(httpx.Headers({"X-RateLimit-Reset": "12"}), now=now) == 12
    assert retry_wait(httpx.Headers({"X-RateLimit-Reset": str(now + 30)}), now=now) == 30
    assert retry_wait(httpx.Headers({"X-RateLimit-Reset": str(now + 86_400 * 365)}), now=now) == MAX_RETRY_WAIT
    assert retry_wait(httpx.Headers({"Retry-After": "99999"}), now=now) == MAX_RETRY_WAIT
    assert retry_wait(httpx.Headers({"X-RateLimit-Reset": str(now - 5)}), now=now) == 0
    assert retry_wait(httpx.Headers({}), now=now) == 1


def test_lago_url_is_normalised(tmp_path: Path) -> None:
    for url in ("http://lago:3000", "http://lago:3000/", "http://lago:3000/api/v1", "http://lago:3000/api/v1/"):
        assert LagoConfig.model_validate({"url": url}).url == "http://lago:3000"
    path = tmp_path / "pgmeter.yaml"
    path.write_text("lago: {batchSize: 0}\n")
    with pytest.raises(ConfigError, match="lago.batchSize"):
        load_settings(path)
    defaults = LagoConfig()
    assert defaults.interval == timedelta(minutes=1) and defaults.grace == timedelta(0)
    assert defaults.batch_size == 100


def test_split_values_are_exact_and_below_1e12() -> None:
    for value in (Decimal("1500000000000"), Decimal("-2000000000000.5"), Decimal("999999999999.99"),
                  Decimal("5e15")):
        parts = split_value(value)
        assert sum(parts) == value and all(abs(p) < Decimal(10) ** 12 for p in parts)
    assert split_value(Decimal(7)) == [Decimal(7)]


def test_metric_checks() -> None:
    def metric(kind: str, field: str | None = "value", **extra: Any) -> dict[str, Any]:
        return {"aggregation_type": kind, "field_name": field, "recurring": False, "expression": None, **extra}

    assert metric_problem("COUNT", "value", metric("sum_agg"), "c") is None
    assert metric_problem("SUM", "value", metric("sum_agg"), "c") is None
    assert metric_problem("MAX", "value", metric("max_agg"), "c") is None
    assert metric_problem("LATEST", "value", metric("latest_agg"), "c") is None
    assert "count_agg" in (metric_problem("COUNT", "value", metric("count_agg", None), "c") or "")
    assert "unique_count_agg" in (metric_problem("SUM", "value", metric("unique_count_agg"), "c") or "")
    assert "latest_agg" in (metric_problem("LATEST", "value", metric("max_agg"), "c") or "")
    assert "recurring" in (metric_problem("SUM", "value", metric("sum_agg", recurring=True), "c") or "")
    assert "expression" in (metric_problem("SUM", "value", metric("sum_agg", expression="value * 2"), "c") or "")
    assert "does not exist" in (metric_problem("SUM", "value", None, "c") or "")


def test_segments_cut_at_starts_and_ends_to_the_second() -> None:
    from pgmeter.lago.subscriptions import Owner, Record, piece_timestamp

    day = datetime(2026, 2, 28, tzinfo=UTC)
    old = Record("a", day + timedelta(hours=8, minutes=30, milliseconds=250), day + timedelta(hours=14, minutes=20))
    new = Record("b", day + timedelta(hours=14, minutes=20, milliseconds=600), None)
    owner = Owner("sub", [new, old])
    cuts = [(r.lago_id if r else None, s, e) for r, s, e in owner.segments(day + timedelta(hours=8), day + timedelta(
        hours=15))]
    assert cuts == [(None, day + timedelta(hours=8), day + timedelta(hours=8, minutes=30)),
                    ("a", day + timedelta(hours=8, minutes=30), day + timedelta(hours=14, minutes=20)),
                    ("b", day + timedelta(hours=14, minutes=20), day + timedelta(hours=15))]
    # Timestamps: inside each record's range; the new record's event goes past the
    # second the old one ended in (Lago terminates it milliseconds after the start).
    old_ended = Record("a", old.started_at, day + timedelta(hours=14, minutes=20, milliseconds=603))
    assert piece_timestamp(day + timedelta(hours=8), old, [old, new]) == \
        Decimal(int(old.started_at.timestamp())) + Decimal("0.25")
    assert piece_timestamp(day + timedelta(hours=14), new, [old_ended, new]) == \
        Decimal(int((day + timedelta(hours=14, minutes=20, seconds=1)).timestamp()))
    assert piece_timestamp(day + timedelta(hours=15), new, [old_ended, new]) == \
        Decimal(int((day + timedelta(hours=15)).timestamp()))


def test_latest_corrections_are_newer_and_stay_in_their_piece() -> None:
    from pgmeter.lago.plan import Piece, Sent, next_items

    start = datetime(2026, 3, 2, 8, tzinfo=UTC)
    piece = Piece("s", start, start + timedelta(hours=1), "sub", "rec", start + timedelta(minutes=30),
                  start + timedelta(hours=1), Decimal(int((start + timedelta(minutes=30)).timestamp())) + Decimal("0.25"),
                  Decimal(9))

    def plan(history: list[Sent]) -> list[Any]:
        return next_items(aggregation="LATEST", meter_key="m", code="c", property="value", piece=piece,
                          history=history)

    [first] = plan([])
    assert first.value == 9 and first.timestamp == piece.timestamp and first.lago_event()["timestamp"] == \
        float(piece.timestamp)
    assert plan([Sent(0, Decimal(9), Decimal(9))]) == []
    [correction] = plan([Sent(0, Decimal(4), Decimal(4)), Sent(1, Decimal(5), Decimal(5))])
    assert correction.revision == 2 and correction.timestamp == piece.timestamp + 2
    [late] = plan([Sent(r, Decimal(1), Decimal(1)) for r in range(5000)])
    assert late.timestamp < Decimal(int(piece.end.timestamp()))  # capped inside the piece
    [big] = next_items(aggregation="MAX", meter_key="m", code="c", property="value", history=[],
                       piece=Piece(**{**piece.__dict__, "usage": Decimal(10) ** 12}))
    assert big.status == "refused" and "cannot be split" in (big.reason or "")
