"""``python -m bench.failover``: the Postgres primary dies, a standby is promoted, the
sink and the refresher follow it, and nothing acknowledged is lost or counted twice.

One command (about a minute) starts embedded Postgres and NATS, a streaming standby
made by pg_basebackup and made synchronous (``synchronous_standby_names = '*'``: a
commit returns once the standby has flushed it, as the chart's CNPG cluster runs with
``postgres.cluster.syncReplicas: 1``), and the api, a sink and a refresher as
processes whose ``postgres.url`` names both servers with
``target_session_attrs=read-write`` - libpq's and asyncpg's multi-host form, which
connects to whichever host accepts writes (CNPG's ``-rw`` service does the same by
moving its endpoint). A producer sends single events with retries (only a 204
counts); a third of the way in the primary's postmaster is killed with SIGKILL and
the standby promoted. Then:

- every acknowledged event is stored exactly once on the new primary, nothing else;
- the refresher has merged them all: the COUNT meter's rollup equals the events;
- the time from the kill to the first event committed on the new primary.

Nothing here is a test (real processes, a minute); the checks print ``ok``/``FAILED``
and the command exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime

import asyncpg
import psycopg

from bench.cluster import check, produce, stored, wait_stored
from bench.common import Role, embedded_services
from pgmeter.config import Settings
from pgmeter.db.migrate import migrate
from pgmeter.devstack import services
from pgmeter.devstack.process import free_port, wait_until
from pgmeter.meters import store
from pgmeter.meters.model import MeterSpec


def say(text: str) -> None:
    print(text, flush=True)


def port_of(url: str) -> int:
    return int(url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def synchronous(primary_url: str) -> bool:
    with psycopg.connect(primary_url, autocommit=True) as conn:
        row = conn.execute("SELECT sync_state FROM pg_stat_replication").fetchone()
        return row is not None and row[0] == "sync"


async def create_meter(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await store.create(conn, "default", MeterSpec.model_validate(
            {"slug": "calls", "aggregation": "COUNT", "eventType": "call"}))
    finally:
        await conn.close()


async def merged(url: str, prefix: str) -> tuple[int, int, int]:
    """(events of the run, what the COUNT meter's d1 level holds, the meter's distance
    to the head in seqs)."""
    conn = await asyncpg.connect(url)
    try:
        events = await conn.fetchval("SELECT count(*) FROM events WHERE id LIKE $1", prefix + "-%")
        meter_id, version, last_seq = await conn.fetchrow("SELECT meter_id, version, last_seq FROM meter_rollups")
        rolled = await conn.fetchval(f"SELECT coalesce(sum(cnt), 0) FROM rollup.d1_{meter_id.lower()}_v{version}")
        head = await conn.fetchval("SELECT pg_sequence_last_value('events_seq')")
        return int(events), int(rolled), int(head - last_seq)
    finally:
        await conn.close()


async def first_commit(url: str, after: datetime) -> float:
    """Seconds from ``after`` to the first event committed on ``url`` since (stored_at is
    the sink's commit time)."""
    conn = await asyncpg.connect(url)
    try:
        first = await conn.fetchval("SELECT min(stored_at) FROM events WHERE stored_at > $1", after)
        return (first - after).total_seconds() if first is not None else float("nan")
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30, help="duration of the ingest (default 30)")
    parser.add_argument("--connections", type=int, default=8, help="producer connections (default 8)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    ok = True
    with embedded_services(keep=args.keep) as svc:
        primary = svc.processes[0]
        primary_url = svc.postgres_url
        migrate(primary_url)
        asyncio.run(create_meter(primary_url))
        standby, standby_url = services.start_standby(port_of(primary_url), svc.workdir / "standby", free_port(),
                                                      log_path=svc.workdir / "standby.log")
        try:
            with psycopg.connect(primary_url, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                conn.execute("SELECT pg_reload_conf()")
            wait_until(lambda: synchronous(primary_url), timeout=30, what="a synchronous standby")
            both = (f"postgresql://postgres@127.0.0.1:{port_of(primary_url)},127.0.0.1:{port_of(standby_url)}"
                    f"/pgmeter?target_session_attrs=read-write")
            base = Settings(postgres={"url": both, "connectTimeout": "2s"},  # type: ignore[arg-type]
                            nats={"url": svc.nats_url, "ackWait": "5s"}, logLevel="warning")
            roles = []
            for kind in ("api", "sink", "refresher"):
                workdir = svc.workdir / kind
                workdir.mkdir(exist_ok=True)
                roles.append(Role(base.model_copy(update={"address": f"127.0.0.1:{free_port()}"}), kind,
                                  workdir).start())
            api = roles[0]
            say(f"pgmeter failover bench: primary + synchronous standby (pg_basebackup), api, sink, refresher "
                f"on postgres.url {both}; {os.cpu_count()} CPUs")

            statuses: Counter[str] = Counter()
            third = asyncio.Event()
            run = uuid.uuid4().hex[:8]
            killed_at, killed_wall = 0.0, datetime.now(UTC)

            async def scenario() -> set[str]:
                nonlocal killed_at, killed_wall
                producer = asyncio.ensure_future(produce(api.url, run, args.seconds, args.connections, third, statuses))
                await third.wait()
                before = await stored(primary_url, run)
                os.kill(primary.pid or 0, signal.SIGKILL)
                killed_at, killed_wall = time.monotonic(), datetime.now(UTC)
                with psycopg.connect(standby_url, autocommit=True) as conn:
                    conn.execute("SELECT pg_promote(wait => true)")
                say(f"  killed the primary's postmaster with SIGKILL at t={args.seconds / 3:.0f}s "
                    f"({len(before):,} events committed), promoted the standby in "
                    f"{time.monotonic() - killed_at:.1f} s")
                return await producer

            acked = asyncio.run(scenario())
            got, _ = asyncio.run(wait_stored(standby_url, run, len(acked), timeout=120))
            say(f"  producer: answers {dict(statuses)}")
            ok &= check("primary killed and standby promoted", acked, got)

            def caught_up() -> bool:
                events, rolled, behind = asyncio.run(merged(standby_url, run))
                return behind == 0 and events == rolled

            try:
                wait_until(caught_up, timeout=60, what="the refresher on the new primary")
                events, rolled, _ = asyncio.run(merged(standby_url, run))
                say(f"  refresher: {rolled:,} events in the COUNT meter's rollup, {events:,} stored: ok")
            except Exception as exc:  # noqa: BLE001 - reported, not raised: the bench prints its checks
                events, rolled, behind = asyncio.run(merged(standby_url, run))
                say(f"  refresher: {rolled:,} in the rollup, {events:,} stored, {behind} seqs behind: FAILED ({exc})")
                ok = False
            gap = asyncio.run(first_commit(standby_url, killed_wall))
            say(f"  the first event committed on the new primary {gap:.1f} s after the kill")
            for role in reversed(roles):
                role.stop()
        finally:
            standby.stop()
    say("all checks ok" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
