"""``pgmeter lago-sync --once | --dry-run | --status``: the sync by hand."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from pgmeter.config import Settings
from pgmeter.db.pool import create_pool
from pgmeter.lago import outbox
from pgmeter.lago.client import LagoClient, LagoUnavailable
from pgmeter.lago.subscriptions import Book
from pgmeter.lago.sync import run_sync

# Lago's billing job runs hourly at :10 and, with an invoice grace period of 0,
# finalizes at once: after a period ends at a whole hour, usage has 10 minutes to
# arrive (customers in :30 and :45 zones have more).
LAGO_CLOCK_SLACK = timedelta(minutes=10)


def run_once(settings: Settings, *, dry_run: bool = False) -> int:
    return asyncio.run(_run_once(settings, dry_run))


async def _run_once(settings: Settings, dry_run: bool) -> int:
    if not settings.lago.mappings:
        print("lago-sync: no mappings configured (lago.mappings)")
        return 2
    if not settings.lago.api_key:
        # Even a dry run reads Lago: the metrics and subscriptions decide the plan.
        print("lago-sync: lago.apiKey (PGMETER_LAGO_API_KEY) is not set")
        return 2
    pool = await create_pool(settings.postgres.url, size=3)
    client = LagoClient(settings.lago.url, settings.lago.api_key)
    try:
        report = await run_sync(pool, settings, client, dry_run=dry_run)
    finally:
        await client.aclose()
        await pool.close()
    if report.skipped:
        print("lago-sync: another sync is running; nothing done")
        return 1
    if dry_run:
        for item in report.to_send:
            print(json.dumps(item.lago_event()))
        for item in report.refused_items:
            print(f"# refused {item.subject} window={item.window_start.isoformat()} value={item.value}: {item.reason}")
        print(f"# dry run: {len(report.to_send)} event(s) would be sent, {len(report.refused_items)} refused; "
              f"nothing was written or sent")
    else:
        print(f"lago-sync: planned {len(report.to_send)}, delivered {report.delivered}, already in Lago "
              f"{report.duplicates}, rejected {report.failed}, refused {len(report.refused_items)}, "
              f"still pending {report.pending}")
    for line in report.refused:
        print(f"lago-sync: mapping refused: {line}")
    for error in report.errors:
        print(f"lago-sync: {error}")
    return 1 if report.errors or report.refused else 0


def show_status(settings: Settings) -> int:
    return asyncio.run(_show_status(settings))


async def _show_status(settings: Settings) -> int:
    pool = await create_pool(settings.postgres.url, size=1)
    try:
        async with pool.acquire() as conn:
            counts = await outbox.status_counts(conn)
            failed = await outbox.problem_items(conn, "failed")
            refused = await outbox.problem_items(conn, "refused")
            mappings = await outbox.refused_mappings(conn)
            recent = await outbox.recent_subscriptions(conn, datetime.now(UTC) - timedelta(days=40))
    finally:
        await pool.close()
    print("lago outbox: " + ", ".join(f"{status} {counts.get(status, 0)}"
                                      for status in ("pending", "sent", "failed", "refused")))
    for row in mappings:
        print(f"refused mapping {row['meter_key']} -> {row['code']} (checked {row['checked_at'].isoformat()}): "
              f"{row['refused']}")
    for status, rows in (("failed", failed), ("refused", refused)):
        for row in rows:
            print(f"{status} {row['transaction_id']} code={row['code']} subject={row['subject']} "
                  f"subscription={row['external_subscription_id']} window={row['window_start'].isoformat()} "
                  f"value={row['value']} attempts={row['attempts']}: {row['last_error']}")
    if settings.lago.api_key:
        await _check_delay(settings, sorted(set(recent) | set(settings.lago.subjects.values())))
    return 0


async def _check_delay(settings: Settings, subscriptions: list[str]) -> None:
    """Warn where usage can reach Lago after Lago has finalized the invoice it belongs to."""
    config = settings.lago
    delay = config.interval + config.grace
    print(f"lago delivery delay: interval {config.interval} + grace {config.grace} = {delay}")
    client = LagoClient(config.url, config.api_key or "")
    book = Book(client)
    try:
        for external_id in subscriptions:
            try:
                owner = await book.owner(external_id)
            except LagoUnavailable as exc:
                print(f"warning: cannot read subscription {external_id} from Lago: {exc}")
                continue
            if owner.problem:
                print(f"warning: {owner.problem}")
                continue
            slack = LAGO_CLOCK_SLACK + timedelta(days=owner.grace_days)
            if delay > slack:
                print(f"warning: subscription {external_id} (customer {owner.customer}, invoice grace period "
                      f"{owner.grace_days} day(s)): Lago invoices within {slack} of a period's end, but pgmeter "
                      f"may deliver usage {delay} late; the last {delay - slack} of each period would miss its "
                      f"invoice. Lower lago.interval/lago.grace or give the customer a grace period.")
            if owner.grace_days == 0:
                print(f"note: subscription {external_id} has no invoice grace period: Lago invoices a "
                      f"termination or plan change at once, so up to {delay} of usage before one is not on it")
    finally:
        await client.aclose()
