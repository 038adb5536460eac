"""Meters from the config file: created at start, once, and never silently diverging."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from pgmeter.config import Settings
from pgmeter.db.pool import create_pool
from pgmeter.meters import store
from pgmeter.meters.model import MeterSpec
from pgmeter.meters.service import MeterConfigError, sync_config_meters
from tests.support.app import AppServer

CONFIG_METERS = [
    {"slug": "api_calls", "eventType": "api.call", "aggregation": "COUNT", "groupBy": {"endpoint": "$.endpoint"},
     "windowSize": "MINUTE"},
    {"slug": "api_latency", "name": "Latency", "eventType": "api.call", "aggregation": "SUM",
     "valueProperty": "$.ms"},
]


def specs() -> list[MeterSpec]:
    return [MeterSpec.model_validate(m) for m in CONFIG_METERS]


async def _meters(url: str) -> list[store.Meter]:
    pool = await create_pool(url, size=1)
    try:
        async with pool.acquire() as conn:
            return await store.list_meters(conn, "default", include_deleted=True)
    finally:
        await pool.close()


def test_config_meters_are_created_at_start_once(settings: Settings) -> None:
    configured = settings.model_copy(update={"meters": specs()})
    for _ in range(2):
        with AppServer(configured, {"api"}) as server, server.client() as client:
            listed = client.get("/api/v1/meters").json()
            assert [m["slug"] for m in listed] == ["api_calls", "api_latency"]
            assert listed[1]["name"] == "Latency" and listed[0]["groupBy"] == {"endpoint": "$.endpoint"}
    assert len(asyncio.run(_meters(settings.postgres.url))) == 2


def test_concurrent_starts_create_each_meter_once(settings: Settings) -> None:
    async def run() -> list[list[str]]:
        conns = [await asyncpg.connect(settings.postgres.url) for _ in range(4)]
        try:
            return await asyncio.gather(*(sync_config_meters(c, "default", specs()) for c in conns))
        finally:
            for conn in conns:
                await conn.close()

    created = asyncio.run(run())
    assert sorted(slug for batch in created for slug in batch) == ["api_calls", "api_latency"]
    assert len(asyncio.run(_meters(settings.postgres.url))) == 2


# uvicorn ends the server thread with SystemExit when startup fails; that is the point.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_differing_database_meter_stops_start_with_one_line(settings: Settings,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(settings.postgres.url)
        try:
            await sync_config_meters(conn, "default", specs())
            changed = MeterSpec.model_validate({**CONFIG_METERS[1], "aggregation": "MAX"})
            with pytest.raises(MeterConfigError) as raised:
                await sync_config_meters(conn, "default", [changed])
            message = str(raised.value)
            assert "\n" not in message
            assert "'api_latency'" in message and "aggregation 'SUM' in the database, 'MAX' in the config" in message
        finally:
            await conn.close()

    asyncio.run(run())
    conflicting = settings.model_copy(update={"meters": [{**CONFIG_METERS[0], "groupBy": {"endpoint": "$.path"}}]})
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError):
        AppServer(conflicting, {"api"}).start()
    assert any("config meter 'api_calls' differs" in r.getMessage() for r in caplog.records)
