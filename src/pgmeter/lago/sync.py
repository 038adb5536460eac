"""Push closed usage windows to Lago, idempotently, with corrections.

One run, for each configured mapping (meter slug -> Lago billable metric code):

1. Plan, in one transaction: the windows that closed since the last run (end at or
   before now - grace) and the closed windows that late events touched since the
   last run (found by event seq, so a late event costs only its own window). Their
   usage is read through the query engine the API uses; each window that Lago does
   not yet reflect gets an outbox row with a deterministic ``transaction_id``
   (:mod:`pgmeter.lago.plan`). The sync state advances in the same transaction.
2. Deliver every pending outbox row in batches of at most 100. Lago answering
   ``value_already_exist`` means it already has the event (we crashed after sending
   it last time): the row is delivered. Other 422s fail that row with Lago's
   message and the rest of the batch is sent again. 429 and 5xx stop delivery
   until later; the rows stay pending.

Only one run at a time, across every replica: a session advisory lock is tried and
a run that cannot take it does nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from prometheus_client import Counter, Gauge

from pgmeter.config import LagoConfig, LagoMapping, Settings
from pgmeter.lago import outbox
from pgmeter.lago.client import BATCH_LIMIT, LagoClient
from pgmeter.lago.plan import Item, UnsupportedMeter, check_syncable, next_item
from pgmeter.lago.usage import read_usage
from pgmeter.meters import store
from pgmeter.meters.store import Meter
from pgmeter.rollup.watermark import wait_out_writers
from pgmeter.runtime import Runtime

log = logging.getLogger(__name__)

LAGO_LOCK_KEY = 7_283_110_006
# How much history one planning step covers, so a first run over months of events
# proceeds in bounded transactions.
PLAN_STEP = timedelta(days=7)
MAX_DELIVERY_TRIES = 3

LAGO_EVENTS = Counter("pgmeter_lago_events_total", "Lago events by outcome", ["outcome"])
LAGO_OUTBOX = Gauge("pgmeter_lago_outbox_items", "Lago outbox rows by status", ["status"])
LAGO_RUNS = Counter("pgmeter_lago_sync_runs_total", "Lago sync runs by outcome", ["outcome"])


@dataclass
class RunReport:
    planned: list[Item] = field(default_factory=list)
    delivered: int = 0
    duplicates: int = 0
    failed: int = 0
    pending: int = 0
    skipped: bool = False
    errors: list[str] = field(default_factory=list)


def mapping_key(meter: Meter) -> str:
    """What Lago's records are kept under: the meter's namespace and slug, not its id.

    A meter deleted and created again (or a config meter recreated at start) gets a
    new id; keyed by id, its whole history would be sent to Lago a second time.
    """
    return f"{meter.namespace}/{meter.slug}"


def window_length(config: LagoConfig) -> timedelta:
    return timedelta(hours=1) if config.window == "HOUR" else timedelta(days=1)


def floor_window(instant: datetime, config: LagoConfig) -> datetime:
    instant = instant.astimezone(UTC)
    if config.window == "HOUR":
        return instant.replace(minute=0, second=0, microsecond=0)
    return instant.replace(hour=0, minute=0, second=0, microsecond=0)


async def run_sync(pool: asyncpg.Pool, settings: Settings, client: LagoClient | None, *,
                   now: datetime | None = None, dry_run: bool = False) -> RunReport:
    """One sync run. With ``dry_run`` nothing is written or sent: the plan is returned."""
    now = now or datetime.now(UTC)
    report = RunReport()
    async with pool.acquire() as lock_conn:
        if not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", LAGO_LOCK_KEY):
            report.skipped = True
            LAGO_RUNS.labels("skipped").inc()
            return report
        try:
            for mapping in settings.lago.mappings:
                try:
                    await _plan_mapping(pool, settings, mapping, now, report, dry_run)
                except UnsupportedMeter as exc:
                    report.errors.append(str(exc))
                    log.error("lago mapping skipped", extra={"meter": mapping.meter, "reason": str(exc)})
            if not dry_run and client is not None:
                await _deliver(pool, client, report)
            await _refresh_gauges(pool)
        finally:
            await lock_conn.execute("SELECT pg_advisory_unlock($1)", LAGO_LOCK_KEY)
    LAGO_RUNS.labels("error" if report.errors else "ok").inc()
    return report


async def _plan_mapping(pool: asyncpg.Pool, settings: Settings, mapping: LagoMapping, now: datetime,
                        report: RunReport, dry_run: bool) -> None:
    config = settings.lago
    async with pool.acquire() as conn:
        meter = await store.get_by_slug(conn, settings.namespace, mapping.meter)
        if meter is None:
            raise UnsupportedMeter(f"meter {mapping.meter} does not exist in namespace {settings.namespace}")
        check_syncable(meter.slug, meter.aggregation)
        cutoff = floor_window(now - config.grace, config)
        while True:
            tx = conn.transaction()
            await tx.start()
            try:
                done = await _plan_step(pool, conn, settings, mapping, meter, cutoff, report)
            except BaseException:
                await tx.rollback()
                raise
            if dry_run:
                await tx.rollback()
                return
            await tx.commit()
            if done:
                return


async def _plan_step(pool: asyncpg.Pool, conn: asyncpg.Connection, settings: Settings, mapping: LagoMapping,
                     meter: Meter, cutoff: datetime, report: RunReport) -> bool:
    """Plan one bounded step; return True when the mapping is caught up to ``cutoff``."""
    config = settings.lago
    meter_key = mapping_key(meter)
    state = await outbox.lock_state(conn, meter_key, mapping.code)
    watermark = await wait_out_writers(conn)
    if state is None:
        first = await outbox.first_event_time(conn, meter)
        closed_to = floor_window(first, config) if first else cutoff
        seen_seq = 0
    else:
        closed_to, seen_seq = state
    step_end = min(cutoff, closed_to + PLAN_STEP) if closed_to < cutoff else closed_to

    usage: dict[tuple[str, datetime], Decimal] = {}
    if closed_to < step_end:
        usage.update(await read_usage(pool, meter, closed_to, step_end, config.window, None))
    # Closed windows that late events reached since the last run.
    touched = await outbox.touched_windows(conn, meter, seen_seq, watermark, closed_to, config.window)
    if touched:
        subjects = sorted({subject for subject, _ in touched})
        start = min(window for _, window in touched)
        end = max(window for _, window in touched) + window_length(config)
        late_usage = await read_usage(pool, meter, start, end, config.window, subjects)
        for key in touched:
            if key in late_usage:
                usage[key] = late_usage[key]

    histories = await outbox.histories(conn, meter_key, mapping.code, list(usage))
    length = window_length(config)
    items = []
    for (subject, window_start), value in sorted(usage.items()):
        item = next_item(
            aggregation=meter.aggregation, meter_key=meter_key, code=mapping.code, property=mapping.property,
            subject=subject, external_subscription_id=config.subjects.get(subject, subject),
            window_start=window_start, window_end=window_start + length, usage=value,
            history=histories.get((subject, window_start), []),
        )
        if item is not None:
            items.append(item)
    await outbox.add(conn, items)
    report.planned.extend(items)
    caught_up = step_end >= cutoff
    # Late events are all accounted for once; newly closed windows advance step by step.
    await outbox.save_state(conn, meter_key, mapping.code, step_end, watermark)
    return caught_up


async def _deliver(pool: asyncpg.Pool, client: LagoClient, report: RunReport) -> None:
    async with pool.acquire() as conn:
        pending = await outbox.pending(conn)
        tries = 0
        while pending:
            batch, pending = pending[:BATCH_LIMIT], pending[BATCH_LIMIT:]
            outcome = await client.send_batch([item.lago_event() for item in batch])
            if outcome.delivered:
                await outbox.mark_sent(conn, [i.transaction_id for i in batch])
                report.delivered += len(batch)
                LAGO_EVENTS.labels("delivered").inc(len(batch))
                continue
            if outcome.retry_after is not None:
                await outbox.mark_attempt(conn, [i.transaction_id for i in batch], outcome.error or "retry")
                tries += 1
                if tries >= MAX_DELIVERY_TRIES:
                    report.pending = len(batch) + len(pending)
                    report.errors.append(f"Lago unavailable: {outcome.error}")
                    LAGO_EVENTS.labels("deferred").inc(report.pending)
                    return
                # Exponential backoff within the run, or Lago's own reset time.
                await asyncio.sleep(max(outcome.retry_after, 0.2 * 2 ** tries))
                pending = batch + pending
                continue
            duplicates = [batch[i].transaction_id for i in sorted(outcome.duplicates)]
            rejected = {batch[i].transaction_id: message for i, message in outcome.rejected.items()}
            await outbox.mark_sent(conn, duplicates)
            await outbox.mark_failed(conn, rejected)
            report.duplicates += len(duplicates)
            report.failed += len(rejected)
            LAGO_EVENTS.labels("already_delivered").inc(len(duplicates))
            LAGO_EVENTS.labels("rejected").inc(len(rejected))
            for transaction_id, message in rejected.items():
                log.error("lago rejected an event", extra={"transaction_id": transaction_id, "lago_error": message})
            # The batch was rolled back by Lago: send what it did not object to again.
            settled = set(duplicates) | set(rejected)
            pending = [i for i in batch if i.transaction_id not in settled] + pending


async def _refresh_gauges(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        counts = await outbox.status_counts(conn)
    for status in ("pending", "sent", "failed"):
        LAGO_OUTBOX.labels(status).set(counts.get(status, 0))


async def start(runtime: Runtime) -> None:
    """The lago-sync role: a run every ``lago.interval``, the first right away."""
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    settings = runtime.settings
    if not settings.lago.api_key:
        raise UnsupportedMeter("lago.apiKey (PGMETER_LAGO_API_KEY) is required when lago.enabled is true")
    client = LagoClient(settings.lago.url, settings.lago.api_key)
    scheduler = AsyncIOScheduler(timezone="UTC")

    async def job() -> None:
        try:
            report = await run_sync(runtime.pool, settings, client)
            log.info("lago sync run", extra={"planned": len(report.planned), "delivered": report.delivered,
                                             "failed": report.failed, "pending": report.pending,
                                             "skipped": report.skipped})
        except Exception:
            LAGO_RUNS.labels("crashed").inc()
            log.exception("lago sync run failed")

    scheduler.add_job(job, "interval", seconds=settings.lago.interval.total_seconds(),
                      next_run_time=datetime.now(UTC), max_instances=1, coalesce=True)
    scheduler.start()

    async def stop_when_cancelled() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            scheduler.shutdown(wait=False)
            await client.aclose()

    runtime.spawn("lago-sync", stop_when_cancelled())
