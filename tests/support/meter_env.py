"""A module-scoped pgmeter for suites that ingest once and query many times.

The session's servers are shared; the module gets its own database (cloned from
the migrated template), its own NATS stream and key prefix, and an api server.
Also: running refresh cycles from a test, and turning oracle queries into HTTP
query strings.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgmeter.config import Settings
from pgmeter.db.pool import create_pool
from pgmeter.devstack.process import free_port
from pgmeter.rollup.refresher import Refresher
from tests.support import oracle
from tests.support.app import AppServer
from tests.support.services import PostgresServer, ProcessServer

TEMPLATE_DB = "pgmeter_test_template"  # tests/conftest.py migrates it once per session


@contextmanager
def database(pg_server: PostgresServer) -> Iterator[str]:
    name = f"pgmeter_mod_{uuid.uuid4().hex[:12]}"
    admin = pg_server.url(pg_server.maintenance_db)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(TEMPLATE_DB)))
    try:
        yield pg_server.url(name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def settings_for(database_url: str, nats: ProcessServer, valkey: ProcessServer, **overrides: Any) -> Settings:
    tag = uuid.uuid4().hex[:10]
    return Settings(
        address=f"127.0.0.1:{free_port()}",
        postgres={"url": database_url},
        nats={"url": nats.url, "stream": f"T_{tag}", "subject_prefix": f"t{tag}.events", "consumer": f"sink_{tag}"},
        valkey={"url": valkey.url, "key_prefix": f"t{tag}:"},
        **overrides,
    )


@contextmanager
def api_server(settings: Settings, roles: frozenset[str] = frozenset({"api"})) -> Iterator[AppServer]:
    with AppServer(settings, roles) as server:
        yield server


def refresh(url: str, *, max_batch: int = 1_000_000, replicas: int = 1, batches: int | None = None) -> int:
    """Run refresh cycles in this thread; returns the events merged.

    ``replicas`` refreshers run at once (as separate processes would, each with its
    own connections); ``batches`` stops after that many batches (a partial refresh).
    """
    async def run() -> int:
        pool = await create_pool(url, size=2 * replicas + 1)
        try:
            refreshers = [Refresher(pool, max_batch=max_batch) for _ in range(replicas)]
            if batches is not None:
                await refreshers[0].advance_watermark()
                merged = 0
                for _ in range(batches):
                    batch = await refreshers[0].merge_batch()
                    merged += batch.events if batch else 0
                return merged
            reports = await asyncio.gather(*(r.run_cycle() for r in refreshers))
            return sum(report.events for report in reports)
        finally:
            await pool.close()
    return asyncio.run(run())


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def query_string(query: oracle.Query) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    if query.from_ is not None:
        params.append(("from", iso(query.from_)))
    if query.to is not None:
        params.append(("to", iso(query.to)))
    if query.window_size:
        params.append(("windowSize", query.window_size))
    params.append(("windowTimeZone", query.zone))
    params += [("subject", s) for s in query.subjects]
    params += [("groupBy", g) for g in query.group_by]
    for key, values in query.filter_group_by.items():
        params += [(f"filterGroupBy[{key}]", v) for v in values]
    if query.advanced:
        params.append(("advancedMeterGroupByFilters", json.dumps(query.advanced)))
    params += [("filterCustomerId", c) for c in query.customers]
    return params


def query_body(query: oracle.Query) -> dict[str, Any]:
    body: dict[str, Any] = {"windowTimeZone": query.zone}
    if query.from_ is not None:
        body["from"] = iso(query.from_)
    if query.to is not None:
        body["to"] = iso(query.to)
    if query.window_size:
        body["windowSize"] = query.window_size
    if query.subjects:
        body["subject"] = list(query.subjects)
    if query.group_by:
        body["groupBy"] = list(query.group_by)
    if query.filter_group_by:
        body["filterGroupBy"] = {k: list(v) for k, v in query.filter_group_by.items()}
    if query.advanced:
        body["advancedMeterGroupByFilters"] = query.advanced
    if query.customers:
        body["filterCustomerId"] = list(query.customers)
    return body
