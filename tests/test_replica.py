"""Meter queries from a streaming standby (postgres.readUrl): a real replica made by
pg_basebackup from an embedded primary. The api reads events and rollups from the
standby, reports its replay lag (X-Pgmeter-Replica-Lag, and the gauge), and keeps
answering after the standby is promoted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from pgmeter.config import Settings
from pgmeter.db.migrate import migrate
from pgmeter.db.pool import create_pool
from pgmeter.devstack import services
from pgmeter.devstack.process import free_port
from pgmeter.meters import store
from pgmeter.meters.model import MeterSpec
from tests.support import events_sql
from tests.support.app import AppServer
from tests.support.events_sql import Event
from tests.support.meter_env import refresh

T0 = datetime(2024, 6, 1, tzinfo=UTC)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def total(client: httpx.Client) -> tuple[float, float]:
    """(the meter's total, the lag header) from the api."""
    response = client.get("/api/v1/meters/calls/query")
    assert response.status_code == 200, response.text
    return sum(row["value"] for row in response.json()["data"]), float(response.headers["x-pgmeter-replica-lag"])


def test_queries_read_the_standby_and_report_its_lag(settings: Settings, server_dir: Path) -> None:
    primary, primary_url = services.start_postgres(server_dir / "primary", free_port(),
                                                   log_path=server_dir / "primary.log")
    standby = None
    try:
        migrate(primary_url)

        async def create_meter() -> None:
            pool = await create_pool(primary_url, size=1)
            async with pool.acquire() as conn:
                await store.create(conn, "default", MeterSpec.model_validate(
                    {"slug": "calls", "aggregation": "COUNT", "eventType": "call"}))
            await pool.close()

        asyncio.run(create_meter())
        events_sql.insert_committed(primary_url, [Event("s1", T0 + timedelta(minutes=i), {}, type="call")
                                                  for i in range(30)])
        assert refresh(primary_url) == 30
        standby_port = free_port()
        standby, standby_url = services.start_standby(int(primary_url.split(":")[2].split("/")[0]),
                                                      server_dir / "standby", standby_port,
                                                      log_path=server_dir / "standby.log")
        on_standby = settings.model_copy(update={"postgres": settings.postgres.model_copy(
            update={"url": primary_url, "read_url": standby_url})})
        with AppServer(on_standby, {"api"}) as server, server.client() as client:
            assert wait_for(lambda: total(client)[0] == 30, "the standby has the base backup's events")
            # Replay paused: the primary moves on, the answers (from the standby) do not,
            # and the lag shows in the header once the watcher reads it.
            with psycopg.connect(standby_url, autocommit=True) as conn:
                conn.execute("SELECT pg_wal_replay_pause()")
            events_sql.insert_committed(primary_url, [Event("s2", T0 + timedelta(hours=1, minutes=i), {}, type="call")
                                                      for i in range(12)])
            lagging = wait_for(lambda: (lambda t: t if t[1] > 0 else None)(total(client)), "a lag above 0")
            assert lagging[0] == 30  # served by the standby, not the primary (42 there)
            with psycopg.connect(standby_url, autocommit=True) as conn:
                conn.execute("SELECT pg_wal_replay_resume()")
            # Caught up: the unmerged tail counts on the standby too, and the lag is 0.
            assert wait_for(lambda: total(client) == (42, 0.0), "caught up, lag 0")
            # Failover: the standby is promoted; the api's reads go on against it.
            with psycopg.connect(standby_url, autocommit=True) as conn:
                assert conn.execute("SELECT pg_promote()").fetchone() == (True,)
                assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            assert total(client) == (42, 0.0)
            metrics = client.get("/metrics").text
            assert "pgmeter_query_replica_lag_seconds 0.0" in metrics
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()
