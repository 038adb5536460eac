"""``pgmeter lago-sync --once | --dry-run | --status``: the sync by hand."""

from __future__ import annotations

import asyncio
import json

from pgmeter.config import Settings
from pgmeter.db.pool import create_pool
from pgmeter.lago import outbox
from pgmeter.lago.client import LagoClient
from pgmeter.lago.sync import run_sync


def run_once(settings: Settings, *, dry_run: bool = False) -> int:
    return asyncio.run(_run_once(settings, dry_run))


async def _run_once(settings: Settings, dry_run: bool) -> int:
    if not settings.lago.mappings:
        print("lago-sync: no mappings configured (lago.mappings)")
        return 2
    if not dry_run and not settings.lago.api_key:
        print("lago-sync: lago.apiKey (PGMETER_LAGO_API_KEY) is not set")
        return 2
    pool = await create_pool(settings.postgres.url, size=3)
    client = None if dry_run else LagoClient(settings.lago.url, settings.lago.api_key or "")
    try:
        report = await run_sync(pool, settings, client, dry_run=dry_run)
    finally:
        if client is not None:
            await client.aclose()
        await pool.close()
    if report.skipped:
        print("lago-sync: another sync is running; nothing done")
        return 1
    if dry_run:
        for item in report.planned:
            print(json.dumps(item.lago_event()))
        print(f"# dry run: {len(report.planned)} event(s) would be planned; nothing was written or sent")
    else:
        print(f"lago-sync: planned {len(report.planned)}, delivered {report.delivered}, already in Lago "
              f"{report.duplicates}, rejected {report.failed}, still pending {report.pending}")
    for error in report.errors:
        print(f"lago-sync: {error}")
    return 1 if report.errors else 0


def show_status(settings: Settings) -> int:
    return asyncio.run(_show_status(settings))


async def _show_status(settings: Settings) -> int:
    pool = await create_pool(settings.postgres.url, size=1)
    try:
        async with pool.acquire() as conn:
            counts = await outbox.status_counts(conn)
            failed = await outbox.failed_items(conn)
    finally:
        await pool.close()
    print("lago outbox: " + ", ".join(f"{status} {counts.get(status, 0)}" for status in ("pending", "sent", "failed")))
    for row in failed:
        print(f"failed {row['transaction_id']} code={row['code']} subject={row['subject']} "
              f"window={row['window_start'].isoformat()} value={row['value']} attempts={row['attempts']}: "
              f"{row['last_error']}")
    return 0
