"""pgmeter's query answers equal an independent in-memory computation.

One module-wide dataset, ingested through the API (POST /api/v1/events, JetStream,
the sink) in stages: thousands of subjects (skewed), group
values of every JSON type, numeric strings and invalid values, duplicates,
events exactly on window edges (UTC, Berlin, Kolkata, Kathmandu, the Berlin DST
change), and late events arriving after their windows were refreshed. Meters
are created before and after ingest (backfill). Between stages, answers are
checked while nothing, part, or all of the data is merged, and the last refresh
runs two refreshers at once. Then, for every aggregation, every zone x filter shape x
range combination and every window size is compared with tests/support/oracle.py
(see ``combinations`` for how window sizes share the combinations).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest

from tests.support import meter_env, oracle
from tests.support.events_sql import Event
from tests.support.ingest import WIDE_TIME_LIMITS, make_event, post_events, wait_until_stored

START = datetime(2024, 3, 20, tzinfo=UTC)
END = datetime(2024, 4, 5, tzinfo=UTC)
ZONES = ("UTC", "Europe/Berlin", "Asia/Kolkata", "Asia/Kathmandu")
WINDOWS = (None, "MINUTE", "HOUR", "DAY", "MONTH")
AGGREGATIONS = ("COUNT", "SUM", "AVG", "MIN", "MAX", "LATEST", "UNIQUE_COUNT")
GROUP_BY = {"model": "$.model", "region": "$.meta.region"}
HEAVY = [f"tpp-{i:04d}" for i in range(20)]
SUBJECTS = [f"tpp-{i:04d}" for i in range(2000)]
EVENT_FROM = datetime(2024, 3, 27, 12, 0, 0, tzinfo=UTC)

# Ranges: unbounded, unaligned to anything, whole UTC days (the d1 level), and
# local midnights in Berlin across its DST change with only a lower bound.
RANGES: tuple[tuple[datetime | None, datetime | None], ...] = (
    (None, None),
    (datetime(2024, 3, 22, 7, 13, 27, 500000, tzinfo=UTC), datetime(2024, 4, 2, 18, 44, 3, tzinfo=UTC)),
    (datetime(2024, 3, 25, tzinfo=UTC), datetime(2024, 4, 1, tzinfo=UTC)),
    (datetime(2024, 3, 30, tzinfo=ZoneInfo("Europe/Berlin")), None),
)
FILTERS: tuple[dict[str, Any], ...] = (
    {},
    {"group_by": ("subject",)},
    {"group_by": ("model", "region"), "filter_group_by": {"region": ("eu", "")}},
    {"subjects": (HEAVY[0], HEAVY[1], SUBJECTS[1500], "nobody"), "group_by": ("model",)},
)


def value(rng: random.Random) -> Any:
    """Valid numbers of every form, and every kind of value that must be skipped."""
    return rng.choice([
        1, 7, 250, -3, 2.5, 0.1, 0.25, "100", "0.456", "1e3", "-2.5", ".5", "5.", "+4",
        None, "abc", "NaN", "Infinity", "", " 7", True, False, {"a": 1}, [1], "1e400", "0x10",
    ])


def data(rng: random.Random) -> dict[str, Any] | None:
    if rng.random() < 0.02:
        return None
    payload: dict[str, Any] = {}
    if rng.random() < 0.95:
        payload["value"] = value(rng)
    payload["model"] = rng.choice(["gpt-4o", "gpt-4o", "claude", "llama", 7, 2.5, True, None, {"x": 1}, ["y"]])
    if rng.random() < 0.9:
        payload["meta"] = {"region": rng.choice(["eu", "eu", "us", "ap", ""])}
    if rng.random() < 0.92:
        payload["user"] = rng.choice([*(f"user-{i}" for i in range(300)), 1, "1", 2.5, None, True, {"u": 1}])
    return payload


def edge_times() -> list[datetime]:
    """Instants on (and a microsecond before) window edges in every tested zone."""
    times = []
    day = START
    while day < END:
        for zone in ZONES:
            local = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(zone))
            times += [local.astimezone(UTC), local.astimezone(UTC) - timedelta(microseconds=1)]
        for minute in (0, 15, 30, 45):
            edge = day.replace(hour=10, minute=minute)
            times += [edge, edge - timedelta(microseconds=1), edge + timedelta(seconds=59, microseconds=999999)]
        day += timedelta(days=1)
    dst = datetime(2024, 3, 31, 1, tzinfo=UTC)  # Berlin 02:00 CET -> 03:00 CEST
    times += [dst, dst - timedelta(microseconds=1), dst - timedelta(hours=1), datetime(2024, 4, 1, tzinfo=UTC)]
    return times


def generate(rng: random.Random, count: int, lo: datetime, hi: datetime) -> list[Event]:
    span = (hi - lo).total_seconds()
    events = []
    for _ in range(count):
        subject = rng.choice(HEAVY) if rng.random() < 0.5 else rng.choice(SUBJECTS)
        if rng.random() < 0.08:
            at = rng.choice(edge_times())
        else:
            at = lo + timedelta(seconds=rng.uniform(0, span))
        # A few events share a second with each other (LATEST tie-breaks by seq).
        if rng.random() < 0.05:
            at = at.replace(microsecond=0)
        events.append(Event(subject=subject, time=at, data=data(rng),
                            type="request" if rng.random() < 0.93 else "other"))
    return events


@dataclass
class Dataset:
    url: str
    client: httpx.Client
    meters: dict[str, oracle.MeterDef]
    stored: list[oracle.Stored] = field(default_factory=list)
    seen: set[tuple[str, str]] = field(default_factory=set)
    stage_failures: list[str] = field(default_factory=list)

    def ingest(self, events: list[Event]) -> None:
        """POST every event (duplicates too) and wait for the sink to store them.

        The oracle keeps the first of each (source, id), as ingest must; the seq each
        event got (LATEST breaks ties by it) is read back from the database.
        """
        fresh = []
        for event in events:
            if (event.source, event.id) not in self.seen:
                self.seen.add((event.source, event.id))
                fresh.append(event)
        cloudevents = [make_event(e.id, source=e.source, type=e.type, subject=e.subject, time=e.time, data=e.data)
                       for e in events]
        for start in range(0, len(cloudevents), 500):
            response = post_events(self.client, cloudevents[start:start + 500])
            assert response.status_code == 204, response.text
        wait_until_stored(self.url, len(self.seen))
        with psycopg.connect(self.url) as conn:
            seqs = dict(((source, id), seq) for source, id, seq in conn.execute("SELECT source, id, seq FROM events"))
        assert len(seqs) == len(self.seen)  # no duplicate stored
        self.stored += [oracle.Stored(seqs[(e.source, e.id)], e.type, e.subject, e.time, e.data) for e in fresh]

    def create_meter(self, meter: oracle.MeterDef) -> None:
        body: dict[str, Any] = {"slug": meter.slug, "aggregation": meter.aggregation, "eventType": meter.event_type,
                                "groupBy": meter.group_by}
        if meter.value_property:
            body["valueProperty"] = meter.value_property
        if meter.event_from:
            body["eventFrom"] = meter_env.iso(meter.event_from)
        response = self.client.post("/api/v1/meters", json=body)
        assert response.status_code == 201, response.text
        self.meters[meter.slug] = meter

    def mismatch(self, slug: str, query: oracle.Query, *, post: bool = False) -> str | None:
        meter = self.meters[slug]
        if post:
            response = self.client.post(f"/api/v1/meters/{slug}/query", json=meter_env.query_body(query))
        else:
            response = self.client.get(f"/api/v1/meters/{slug}/query", params=meter_env.query_string(query))
        if response.status_code != 200:
            return f"{slug} {query}: HTTP {response.status_code} {response.text}"
        got = response.json()["data"]
        want = oracle.answer(meter, self.stored, query)
        problem = compare(meter, got, want)
        return f"{slug} {query}: {problem}" if problem else None


def compare(meter: oracle.MeterDef, got: list[dict[str, Any]], want: list[oracle.Row]) -> str | None:
    if len(got) != len(want):
        return f"{len(got)} rows, oracle has {len(want)}; first got {got[:2]} want {want[:2]}"
    for index, (row, expected) in enumerate(zip(got, want, strict=False)):
        start = datetime.fromisoformat(row["windowStart"])
        end = datetime.fromisoformat(row["windowEnd"])
        key = (start, end, row["subject"], tuple(row["groupBy"].items()), row.get("customerId"))
        wanted = (expected.window_start, expected.window_end, expected.subject, expected.group_by, expected.customer)
        if key != wanted:
            return f"row {index}: got {key} want {wanted}"
        if not same_value(meter.aggregation, row["value"], expected.value):
            return f"row {index} {key}: value {row['value']!r} want {expected.value}"
    return None


def same_value(aggregation: str, got: int | float, want: Decimal) -> bool:
    if aggregation == "AVG":  # numeric division vs Decimal division: last digits differ
        return abs(Decimal(repr(got)) - want) <= abs(want) * Decimal("1e-12") + Decimal("1e-12")
    return float(got) == float(want)


def spot_checks(dataset: Dataset, stage: str) -> None:
    """A quick sweep of the meters while the rollup is in an intermediate state."""
    queries = [
        oracle.Query(),
        oracle.Query(window_size="HOUR", zone="Asia/Kathmandu", group_by=("subject",)),
        oracle.Query(from_=RANGES[1][0], to=RANGES[1][1], window_size="DAY", zone="Europe/Berlin",
                     group_by=("model",)),
        oracle.Query(from_=RANGES[2][0], to=RANGES[2][1], subjects=(HEAVY[0],)),
    ]
    for slug in dataset.meters:
        for query in queries:
            problem = dataset.mismatch(slug, query)
            if problem:
                dataset.stage_failures.append(f"[{stage}] {problem}")


def meter_defs() -> dict[str, oracle.MeterDef]:
    defs = {}
    for aggregation in AGGREGATIONS:
        value_property = None if aggregation == "COUNT" else ("$.user" if aggregation == "UNIQUE_COUNT" else "$.value")
        defs[aggregation.lower()] = oracle.MeterDef(aggregation.lower(), aggregation, "request",
                                                    value_property, GROUP_BY)
    defs["sum_from"] = oracle.MeterDef("sum_from", "SUM", "request", "$.value", GROUP_BY, EVENT_FROM)
    return defs


@pytest.fixture(scope="module")
def dataset(pg_server, nats_server, valkey_server):  # type: ignore[no-untyped-def]
    rng = random.Random(20240331)
    with meter_env.database(pg_server) as url:
        settings = meter_env.settings_for(url, nats_server, valkey_server, limits=WIDE_TIME_LIMITS)
        with meter_env.api_server(settings, frozenset({"api", "sink"})) as app, app.client() as client:
            data = Dataset(url, client, {})
            defs = meter_defs()
            early = ["count", "sum", "avg", "unique_count", "sum_from"]
            for slug in early:
                data.create_meter(defs[slug])
            first = generate(rng, 5000, START, END)
            data.ingest(first)
            spot_checks(data, "nothing merged")
            meter_env.refresh(url, max_batch=900, batches=4)
            spot_checks(data, "partly merged")
            meter_env.refresh(url, max_batch=2000)
            # Meters created after the data exist: backfilled from the events.
            for slug in defs:
                if slug not in early:
                    data.create_meter(defs[slug])
            # Late events (into refreshed windows), edge instants, and duplicates of
            # already stored events with other data (first wins).
            late = generate(rng, 1500, START, START + timedelta(days=3))
            duplicates = [Event(subject=e.subject, time=e.time + timedelta(hours=1), data={"value": 999},
                                id=e.id, source=e.source) for e in rng.sample(first, 200)]
            data.ingest(late + duplicates + generate(rng, 1000, START, END))
            spot_checks(data, "late events unmerged")
            meter_env.refresh(url, max_batch=1500, replicas=2)  # two refreshers at once
            spot_checks(data, "all merged")
            yield data


def test_intermediate_stages_match(dataset: Dataset) -> None:
    assert dataset.stage_failures == []


def test_everything_merged(dataset: Dataset) -> None:
    import psycopg

    with psycopg.connect(dataset.url) as conn:
        head = conn.execute("SELECT pg_sequence_last_value('events_seq')").fetchone()[0]
        behind = conn.execute("SELECT meter_id FROM meter_rollups WHERE last_seq <> %s", (head,)).fetchall()
    assert behind == []


# strconv.ParseFloat(s, 64) cases, from Go's documentation and its atof tests: the
# oracle's number rule must read strings exactly as OpenMeter's Go code does.
GO_FLOAT_READS = [
    ("100", "100"), ("0.456", "0.456"), ("1e3", "1e3"), ("+4", "4"), ("-2.5", "-2.5"), (".5", "0.5"),
    ("5.", "5"), ("007", "7"), ("1E+2", "100"), ("1_23.50_0_0e+1_2", "1.235e14"), ("1_000", "1000"),
    ("0x1p3", "8"), ("0X1.8P1", "3"), ("0x.8p1", "1"), ("0x_1_2.3_4_5p+1_2", "74565"),
    ("1e00003", "1000"), ("0" * 1500 + "1", "1"), ("1.7976931348623157e308", "1.7976931348623157e308"),
    ("1e-400", "1e-400"),  # underflow is no error in Go (it gives 0); the oracle keeps the exact value
]
GO_FLOAT_ERRORS = [
    "", " 7", "7 ", "abc", "1,5", "+-1", "e3", ".", "1e", "1e+", "1e5.0", "0x10", "0x1p", "0b101", "\u0661",
    "-_123.5e+12", "_123.5e+12", "1__23.5e+12", "123_.5e+12", "123._5e+12", "123.5_e+12", "123.5e_+12",
    "123.5e+_12", "123.5e+12_", "-_0x12.345p+12", "1_",
    "1e400", "1.8e308", "0x1p1024", "0x1.fffffffffffff8p1023",  # ErrRange: past float64's largest value
    "NaN", "nan", "Inf", "-Inf", "+Infinity", "infinity",  # parsed by Go, skipped as not finite
]


@pytest.mark.parametrize(("text", "value"), GO_FLOAT_READS)
def test_oracle_reads_numeric_strings_as_go_does(text: str, value: str) -> None:
    assert oracle.number({"v": text}, "$.v") == Decimal(value)


@pytest.mark.parametrize("text", GO_FLOAT_ERRORS)
def test_oracle_skips_what_go_cannot_read_as_a_finite_number(text: str) -> None:
    assert oracle.number({"v": text}, "$.v") is None


def combinations(window: str | None) -> list[tuple[str, dict[str, Any], tuple[datetime | None, datetime | None]]]:
    """The (zone, filter shape, range) queries a meter gets at one window size.

    Every window size meets every zone, filter shape and range, and across a meter's
    four window sizes every zone x filter x range combination is queried once: window
    size ``w`` takes range ``(zone + filter + w) mod 4``. Without a window the zone only
    names the answer's time zone, so those queries cycle through the zones while
    covering every filter x range.
    """
    if window is None:
        return [(ZONES[(f + r) % len(ZONES)], FILTERS[f], RANGES[r])
                for f in range(len(FILTERS)) for r in range(len(RANGES))]
    w = WINDOWS.index(window)
    return [(zone, FILTERS[f], RANGES[(z + f + w) % len(RANGES)])
            for z, zone in enumerate(ZONES) for f in range(len(FILTERS))]


def test_every_zone_filter_range_combination_is_queried() -> None:
    def key(combo: tuple[str, dict[str, Any], tuple[datetime | None, datetime | None]]) -> tuple[int, int, int]:
        zone, shape, bounds = combo
        return ZONES.index(zone), FILTERS.index(shape), RANGES.index(bounds)

    full = {(z, f, r) for z in range(len(ZONES)) for f in range(len(FILTERS)) for r in range(len(RANGES))}
    windowed = [key(c) for window in WINDOWS if window for c in combinations(window)]
    assert sorted(windowed) == sorted(full)  # each exactly once
    assert {(f, r) for _, f, r in map(key, combinations(None))} == {(f, r) for _, f, r in full}
    for window in WINDOWS:
        keys = [key(c) for c in combinations(window)]
        for position, size in enumerate((len(ZONES), len(FILTERS), len(RANGES))):
            assert {k[position] for k in keys} == set(range(size)), window


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: w or "NONE")
@pytest.mark.parametrize("slug", [a.lower() for a in AGGREGATIONS] + ["sum_from"])
def test_matches_oracle(dataset: Dataset, slug: str, window: str | None) -> None:
    failures = []
    for n, (zone, shape, (lo, hi)) in enumerate(combinations(window)):
        query = oracle.Query(from_=lo, to=hi, window_size=window, zone=zone, **shape)
        problem = dataset.mismatch(slug, query, post=n % 3 == 0)
        if problem:
            failures.append(problem)
    assert failures == []
