"""Meter queries by customer (``filterCustomerId``, ``groupBy=customer_id``) and
entitlement usage over a customer's several subjects, against the oracle.

A customer's usage is the events whose subject is its key or one of its subject
keys (OpenMeter). Every aggregation is computed over that set at once: a distinct
count or a latest value across several subjects is not a sum (or a maximum) of the
per-subject values, so the answers are compared with tests/support/oracle.py,
which groups events by customer from the same inputs, while nothing, part, or
all of the events are merged into the rollups.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from pgmeter.config import Settings
from pgmeter.meters import store as meter_store
from pgmeter.query.engine import usage_in_ranges
from pgmeter.query.params import QueryParams
from tests.support import events_sql, meter_env, oracle
from tests.support.app import AppServer
from tests.support.events_sql import Event
from tests.test_oracle import compare, same_value

START = datetime(2024, 3, 30, 20, tzinfo=UTC)  # across Berlin's DST change
METERS = (
    oracle.MeterDef("calls", "COUNT", "api.call"),
    oracle.MeterDef("tokens", "SUM", "api.call", "$.n", {"model": "$.model"}),
    oracle.MeterDef("users", "UNIQUE_COUNT", "api.call", "$.user"),
    oracle.MeterDef("seats", "LATEST", "api.call", "$.seats"),
    oracle.MeterDef("mean", "AVG", "api.call", "$.n"),
)
# key -> subject keys; the key is a usage subject too.
CUSTOMERS = {"acme": ["acme-web", "acme-app"], "beta": ["beta-1"], "idle": ["idle-1"]}
SUBJECTS = ["acme", "acme-web", "acme-app", "beta", "beta-1", "stranger"]


def create_customers(api: httpx.Client) -> dict[str, str]:
    ids = {}
    for key, subjects in CUSTOMERS.items():
        response = api.post("/api/v1/customers", json={"name": key, "key": key,
                                                       "usageAttribution": {"subjectKeys": subjects}})
        assert response.status_code == 201, response.text
        ids[key] = response.json()["id"]
    return ids


def attribution(ids: dict[str, str], *keys: str, customers: dict[str, list[str]] = CUSTOMERS,
                ) -> dict[str, tuple[str, ...]]:
    return {ids[key]: (key, *customers[key]) for key in keys}


@pytest.fixture
def api(settings: Settings) -> Iterator[httpx.Client]:
    with AppServer(settings, {"api"}) as server, server.client() as client:
        for meter in METERS:
            body: dict[str, Any] = {"slug": meter.slug, "eventType": meter.event_type,
                                    "aggregation": meter.aggregation, "groupBy": meter.group_by}
            if meter.value_property:
                body["valueProperty"] = meter.value_property
            assert client.post("/api/v1/meters", json=body).status_code == 201
        yield client


def test_queries_by_customer_match_the_oracle(api: httpx.Client, settings: Settings) -> None:
    url = settings.postgres.url
    ids = create_customers(api)
    rng = random.Random(13)
    events = [Event(subject=rng.choice(SUBJECTS), type="api.call",
                    time=START + timedelta(seconds=rng.randrange(0, 30 * 3600)),
                    data={"n": rng.choice([1, 2, 5, 0.5]), "model": rng.choice(["a", "b"]),
                          "user": f"u{rng.randrange(6)}", "seats": rng.randrange(1, 50)})
              for _ in range(400)]
    stored: list[oracle.Stored] = []

    def insert(batch: list[Event]) -> None:
        with psycopg.connect(url) as conn:
            events_sql.insert(conn, batch)
        stored.extend(oracle.Stored(e.seq or 0, e.type, e.subject, e.time, e.data) for e in batch)

    def queries(customers: dict[str, list[str]]) -> list[oracle.Query]:
        both = attribution(ids, "acme", "beta", customers=customers)
        return [
            oracle.Query(customers=attribution(ids, "acme", customers=customers)),
            oracle.Query(customers=both, group_by=("customer_id",)),
            oracle.Query(customers=both, group_by=("subject",), window_size="DAY", zone="Europe/Berlin"),
            # Subject and customer filters together: both must match (OpenMeter ANDs them).
            oracle.Query(customers=attribution(ids, "acme", "beta", "idle", customers=customers),
                         subjects=("acme-web", "beta", "stranger")),
            oracle.Query(customers=both, window_size="HOUR", from_=START + timedelta(minutes=97, seconds=13),
                         to=START + timedelta(hours=26, minutes=3)),
            oracle.Query(customers=attribution(ids, "idle", customers=customers)),  # no usage: no row, even COUNT
            oracle.Query(customers=both, group_by=("model",), window_size="HOUR"),
        ]

    def check(stage: str, customers: dict[str, list[str]] = CUSTOMERS) -> None:
        for meter in METERS:
            for index, query in enumerate(queries(customers)):
                if "model" in query.group_by and not meter.group_by:
                    continue
                if index % 2:
                    response = api.post(f"/api/v1/meters/{meter.slug}/query", json=meter_env.query_body(query))
                else:
                    response = api.get(f"/api/v1/meters/{meter.slug}/query", params=meter_env.query_string(query))
                assert response.status_code == 200, response.text
                rows = response.json()["data"]
                want = oracle.answer(meter, stored, query)
                assert compare(meter, rows, want) is None, f"{stage} {meter.slug} {query}: {compare(meter, rows, want)}"
                assert all(("customerId" in row) == bool(query.customers) for row in rows)

    insert(events[:250])
    check("nothing merged")
    ranges("nothing merged", url, ids, stored, rng)
    meter_env.refresh(url)
    insert(events[250:])  # a tail past the watermark, some of it inside merged minutes
    check("partly merged")
    ranges("partly merged", url, ids, stored, rng)
    meter_env.refresh(url)
    check("all merged")
    ranges("all merged", url, ids, stored, rng)
    # The answer follows the customer's subject keys (the cache key carries them).
    assert api.put(f"/api/v1/customers/{ids['beta']}", json={
        "name": "beta", "key": "beta", "usageAttribution": {"subjectKeys": ["beta-1", "stranger"]}}).status_code == 200
    check("subject keys changed", {**CUSTOMERS, "beta": ["beta-1", "stranger"]})


def ranges(stage: str, url: str, ids: dict[str, str], stored: list[oracle.Stored], rng: random.Random) -> None:
    """``usage_in_ranges`` (one statement for many adjacent ranges, what an entitlement
    value reads) equals the oracle's answer range by range, for every aggregation."""
    cuts = {START - timedelta(hours=2), START + timedelta(hours=31)}  # a range before and after the data
    cuts |= {START + timedelta(minutes=rng.randrange(0, 30 * 60)) for _ in range(12)}  # minute-aligned
    cuts |= {START + timedelta(seconds=rng.randrange(0, 30 * 3600)) for _ in range(4)}  # not aligned
    bounds = sorted(cuts)
    customers = attribution(ids, "acme")

    async def read() -> dict[str, list[Decimal | None]]:
        conn = await asyncpg.connect(url)
        try:
            out = {}
            for meter in METERS:
                found = await meter_store.get_by_slug(conn, "default", meter.slug)
                assert found is not None
                params = QueryParams(customers=customers, filter_group_by={"model": ("a",)} if meter.group_by else {})
                out[meter.slug] = await usage_in_ranges(conn, found, params, bounds)
            return out
        finally:
            await conn.close()

    got = asyncio.run(read())
    for meter in METERS:
        want = []
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            query = oracle.Query(from_=lo, to=hi, customers=customers,
                                 filter_group_by={"model": ("a",)} if meter.group_by else {})
            rows = oracle.answer(meter, stored, query)
            want.append(rows[0].value if rows else None)
        assert len(got[meter.slug]) == len(want), stage
        for index, (value, expected) in enumerate(zip(got[meter.slug], want, strict=True)):
            assert (value is None) == (expected is None) and (
                value is None or same_value(meter.aggregation, float(value), expected)), \
                f"{stage} {meter.slug} range {index} [{bounds[index]}, {bounds[index + 1]}): {value} want {expected}"


def test_customer_parameters_are_checked(api: httpx.Client, settings: Settings) -> None:
    ids = create_customers(api)
    unknown = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    for response in (api.get("/api/v1/meters/calls/query", params=[("filterCustomerId", ids["acme"]),
                                                                    ("filterCustomerId", unknown)]),
                     api.post("/api/v1/meters/calls/query", json={"filterCustomerId": [unknown]})):
        assert response.status_code == 404, response.text
        assert response.json()["detail"] == f"customer with id {unknown} not found"
    grouped = api.get("/api/v1/meters/calls/query", params={"groupBy": "customer_id"})
    assert grouped.status_code == 400 and "filterCustomerId" in grouped.json()["detail"]
    too_many = api.get("/api/v1/meters/calls/query", params=[("filterCustomerId", ids["acme"])] * 101)
    assert too_many.status_code == 400
    assert api.post("/api/v1/meters/calls/query", json={"filterCustomerId": "x"}).status_code == 400
    # A repeated id counts once; a deleted customer answers no more queries.
    twice = api.get("/api/v1/meters/calls/query", params=[("filterCustomerId", ids["acme"])] * 2)
    assert twice.status_code == 200 and twice.json()["data"] == []
    assert api.delete(f"/api/v1/customers/{ids['idle']}").status_code == 204
    assert api.get("/api/v1/meters/calls/query", params={"filterCustomerId": ids["idle"]}).status_code == 404
    # The events list by customer: the events of its key and subject keys (OpenMeter); unknown ids are a 400.
    recent = datetime.now(UTC) - timedelta(hours=1)
    with psycopg.connect(settings.postgres.url) as conn:
        events_sql.insert(conn, [Event(subject=s, time=recent, data={}, type="api.call", id=f"ev-{s}")
                                 for s in ("acme", "acme-web", "beta", "stranger")])
    listed = api.get("/api/v1/events", params=[("customerId", ids["acme"])])
    assert listed.status_code == 200 and sorted(e["event"]["subject"] for e in listed.json()) == ["acme", "acme-web"]
    listed = api.get("/api/v1/events", params=[("customerId", ids["acme"]), ("customerId", ids["beta"])])
    assert sorted(e["event"]["subject"] for e in listed.json()) == ["acme", "acme-web", "beta"]
    missing = api.get("/api/v1/events", params=[("customerId", ids["beta"]), ("customerId", unknown),
                                                ("customerId", ids["idle"])])  # deleted above
    assert missing.status_code == 400 and missing.json()["detail"].endswith(f": {unknown}, {ids['idle']}")
    csv = api.get("/api/v1/meters/calls/query", params={"filterCustomerId": ids["acme"]},
                  headers={"Accept": "text/csv"})
    assert csv.status_code == 200 and csv.text.splitlines()[0] == "window_start,window_end,customer_id,value"


# -- entitlement usage over several subjects ---------------------------------------

@pytest.fixture(scope="module")
def ent_api(pg_server: Any, nats_server: Any, valkey_server: Any) -> Iterator[tuple[httpx.Client, str]]:
    """One server for every hypothesis example (each example uses its own customer)."""
    with meter_env.database(pg_server) as url:
        settings = meter_env.settings_for(url, nats_server, valkey_server)
        with AppServer(settings, {"api"}) as server, server.client() as client:
            for slug, aggregation, prop in (("users", "UNIQUE_COUNT", "$.user"), ("seats", "LATEST", "$.seats")):
                assert client.post("/api/v1/meters", json={"slug": slug, "eventType": slug, "aggregation": aggregation,
                                                           "valueProperty": prop}).status_code == 201
                assert client.post("/api/v1/features", json={"key": slug, "name": slug,
                                                             "meterSlug": slug}).status_code == 201
            yield client, url


usage_events = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 179), st.integers(0, 4), st.integers(1, 60)),
                        min_size=1, max_size=25)


@hypothesis_settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(points=usage_events)
def test_entitlement_usage_over_a_customers_subjects(ent_api: tuple[httpx.Client, str],
                                                     points: list[tuple[int, int, int, int]]) -> None:
    """``usage`` of UNIQUE_COUNT and LATEST entitlements equals the oracle's value over
    the customer's three subjects together (the sum or maximum per subject would not)."""
    api, url = ent_api
    key = f"c{uuid.uuid4().hex[:10]}"  # hypothesis seeds random: not from there
    subjects = [key, f"{key}-web", f"{key}-app"]
    assert api.post("/api/v1/customers", json={"name": key, "key": key, "usageAttribution": {
        "subjectKeys": subjects[1:]}}).status_code == 201
    t0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)
    for slug in ("users", "seats"):
        ent = api.post(f"/api/v2/customers/{key}/entitlements", json={
            "type": "metered", "featureKey": slug, "usagePeriod": {"interval": "DAY", "anchor": t0.isoformat()},
            "measureUsageFrom": t0.isoformat(), "issueAfterReset": 1000})
        assert ent.status_code == 201, ent.text
        with psycopg.connect(url) as conn:
            conn.execute("UPDATE entitlements SET active_from = %s, created_at = %s WHERE id = %s",
                         (t0, t0, ent.json()["id"]))
    events = []
    for subject, offset, user, seats in points:
        at = t0 + timedelta(minutes=offset, seconds=user * 7)
        events.append(Event(subject=subjects[subject], time=at, data={"user": f"u{user}"}, type="users"))
        events.append(Event(subject=subjects[subject], time=at, data={"seats": seats}, type="seats"))
    with psycopg.connect(url) as conn:
        events_sql.insert(conn, events)
    at = t0 + timedelta(hours=3)
    stored = [oracle.Stored(e.seq or 0, e.type, e.subject, e.time, e.data) for e in events]
    for meter in (oracle.MeterDef("users", "UNIQUE_COUNT", "users", "$.user"),
                  oracle.MeterDef("seats", "LATEST", "seats", "$.seats")):
        rows = oracle.answer(meter, stored, oracle.Query(to=at, customers={"c": tuple(subjects)}))
        want = rows[0].value if rows else Decimal(0)
        got = api.get(f"/api/v2/customers/{key}/entitlements/{meter.slug}/value",
                      params={"time": at.isoformat()})
        assert got.status_code == 200, got.text
        assert (Decimal(str(got.json()["usage"])), Decimal(str(got.json()["balance"]))) == (want, 1000 - want), meter
