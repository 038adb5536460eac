"""Subjects, group-by values and UNIQUE_COUNT values of any length are counted exactly.

A group-by value comes from event data and a meter may be created after the event
arrived, so no limit at the door can keep it short; subjects already stored (or
published on the stream directly) may be long too. The rollups key on hashes of
the texts and keep the texts whole: every answer, listing and view returns them
byte for byte, before and after the refresher merged them.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from pgmeter.config import Settings
from pgmeter.db.pool import create_pool
from pgmeter.meters import store
from pgmeter.meters.model import MeterSpec
from tests.support import events_sql, oracle
from tests.support.app import AppServer
from tests.support.events_sql import Event
from tests.support.meter_env import query_body, refresh

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
# 10 KB group values that differ only in their last character, a 3 KB subject with
# multi-byte characters, and long UNIQUE_COUNT values differing at the end too.
LONG_A = "g" * 10_239 + "a"
LONG_B = "g" * 10_239 + "b"
LONG_SUBJECT = "tpp-é€" * 500 + "-end"
LONG_U1 = "u" * 5000 + "1"
LONG_U2 = "u" * 5000 + "2"
METERS = {
    "tokens": oracle.MeterDef("tokens", "SUM", "call", "$.n", {"k": "$.k"}),
    "users": oracle.MeterDef("users", "UNIQUE_COUNT", "call", "$.u", {"k": "$.k"}),
    "calls": oracle.MeterDef("calls", "COUNT", "call"),
}


def events() -> list[Event]:
    out = []
    for i in range(60):
        subject = [LONG_SUBJECT, "short", LONG_SUBJECT + "x"][i % 3]
        k = [LONG_A, LONG_B, "a", LONG_A][i % 4]
        u = [LONG_U1, LONG_U2, "v", LONG_U1, "w"][i % 5]
        out.append(Event(subject, NOW - timedelta(minutes=90) + timedelta(minutes=i * 3, seconds=i),
                         {"n": i % 7 + 1, "k": k, "u": u}, type="call"))
    return out


def queries() -> list[oracle.Query]:
    hour = NOW - timedelta(hours=1)
    return [
        oracle.Query(),
        oracle.Query(group_by=("subject", "k")),
        oracle.Query(window_size="HOUR", group_by=("k",), filter_group_by={"k": (LONG_A, "a")}),
        oracle.Query(window_size="MINUTE", subjects=(LONG_SUBJECT,), group_by=("k",),
                     filter_group_by={"k": (LONG_B,)}),
        oracle.Query(from_=hour - timedelta(seconds=17), to=NOW, window_size="DAY", zone="Europe/Berlin",
                     subjects=(LONG_SUBJECT + "x", "short"), group_by=("subject",)),
        oracle.Query(filter_group_by={"k": (LONG_A + "z", "g" * 10_240)}),  # near misses match nothing
    ]


def answers(client: Any, meter: oracle.MeterDef) -> list[tuple[Any, ...]]:
    out = []
    for query in queries():
        if meter.slug == "calls" and (query.group_by != ("subject",) and query.group_by or query.filter_group_by):
            continue  # the COUNT meter has no group-by key
        response = client.post(f"/api/v1/meters/{meter.slug}/query", json=query_body(query))
        assert response.status_code == 200, response.text
        out.append(tuple((r["value"], r["subject"], tuple(sorted(r["groupBy"].items())),
                          datetime.fromisoformat(r["windowStart"])) for r in response.json()["data"]))
    return out


def expected(meter: oracle.MeterDef, stored: list[oracle.Stored]) -> list[tuple[Any, ...]]:
    out = []
    for query in queries():
        if meter.slug == "calls" and (query.group_by != ("subject",) and query.group_by or query.filter_group_by):
            continue
        out.append(tuple((float(r.value), r.subject, tuple(sorted(r.group_by)), r.window_start)
                         for r in oracle.answer(meter, stored, query)))
    return out


def test_long_subjects_and_group_values_are_counted_exactly(settings: Settings) -> None:
    url = settings.postgres.url

    async def create_meters() -> None:
        pool = await create_pool(url, size=1)
        async with pool.acquire() as conn:
            for meter in METERS.values():
                await store.create(conn, "default", MeterSpec.model_validate({
                    "slug": meter.slug, "aggregation": meter.aggregation, "eventType": meter.event_type,
                    **({"valueProperty": meter.value_property} if meter.value_property else {}),
                    "groupBy": meter.group_by}))
        await pool.close()

    asyncio.run(create_meters())
    batch = events()
    events_sql.insert_committed(url, batch)
    stored = [oracle.Stored(e.seq, e.type, e.subject, e.time, e.data) for e in batch]  # type: ignore[arg-type]
    with AppServer(settings, {"api"}) as server, server.client() as client:
        unmerged = {slug: answers(client, meter) for slug, meter in METERS.items()}
        assert refresh(url) == len(batch) * len(METERS)  # no merge failed on a long key
        merged = {slug: answers(client, meter) for slug, meter in METERS.items()}
        for slug, meter in METERS.items():
            assert merged[slug] == unmerged[slug] == expected(meter, stored), slug
        # Hand-checked figures, independent of the oracle: LONG_B is every 4th event.
        totals = {r[2]: r[0] for r in merged["tokens"][1] if r[1] == "short"}
        assert totals[(("k", LONG_B),)] == sum(i % 7 + 1 for i in range(60) if i % 4 == 1 and i % 3 == 1)

        # Listings return the texts whole.
        subjects = client.get("/api/v1/meters/tokens/subjects").json()
        assert subjects == sorted([LONG_SUBJECT, LONG_SUBJECT + "x", "short"])
        values = client.get("/api/v1/meters/tokens/group-by/k/values",
                            params={"from": (NOW - timedelta(hours=3)).isoformat()}).json()
        assert sorted(values) == sorted(["a", LONG_A, LONG_B])

    # The per-meter view too (the rollup rows, since everything is merged).
    with psycopg.connect(url) as conn:
        rows = conn.execute(sql.SQL("SELECT subject, k, sum(value) FROM {} GROUP BY 1, 2").format(
            sql.Identifier("meters", "tokens"))).fetchall()
    want: dict[tuple[str, str], int] = {}
    for e in batch:
        key = (e.subject, e.data["k"])  # type: ignore[index]
        want[key] = want.get(key, 0) + e.data["n"]  # type: ignore[index]
    assert {(s, k): int(v) for s, k, v in rows} == want
