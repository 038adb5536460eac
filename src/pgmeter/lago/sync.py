"""Push usage to Lago as it is acknowledged, split by subscription, idempotently.

Lago invoices a subscription at hh:10 after its billing period ends (customer time
zone), and with its default invoice grace period of 0 that invoice is final at once
and counts only events already stored. So the sync does not wait for windows to
close: every ``lago.interval`` (1 minute by default) it sends the running total of
every window touched since the last run, as deltas against what Lago already holds.

One run, for each configured mapping (meter slug -> Lago billable metric code):

1. Validate the mapping against Lago (:func:`pgmeter.lago.plan.metric_problem`):
   the billable metric must exist, aggregate the right way and read the mapped
   property. Lago would accept anything with 200, so a bad mapping is refused here:
   nothing is sent, the reason is kept (``lago-sync --status``, metric
   ``pgmeter_lago_mappings_refused``), and its usage waits until it is fixed.
2. Plan, in one transaction per bounded step: usage up to ``now - lago.grace`` of
   every window that overlaps the time since the last run, plus the windows late
   events reached (found by event seq). Windows are in each customer's time zone
   and split where a subscription record starts or ends
   (:mod:`pgmeter.lago.subscriptions`); usage is read through the query engine the
   API uses (minute rollups plus the unmerged tail, exact at any second). Each piece
   that Lago does not yet reflect gets outbox rows with deterministic
   ``transaction_id`` s (:mod:`pgmeter.lago.plan`); usage no active subscription
   owns is recorded as 'refused' with its reason instead of being sent. A window
   already sent keeps going to the external subscription it was sent to, even
   after ``lago.subjects`` changes. The sync state advances in the same transaction.
3. Deliver every pending outbox row in batches of ``lago.batchSize``. Lago answering
   ``value_already_exist`` (Postgres store) means it already has the event (we
   crashed after sending it last time): the row is delivered; Lago's ClickHouse
   store answers 200 and deduplicates. Other 422s fail that row with Lago's message
   and the rest of the batch is sent again. 429 (waited out, at most a minute at a
   time) and 5xx stop delivery until later; the rows stay pending.

Only one run at a time, across every replica: a session advisory lock is tried and
a run that cannot take it does nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from prometheus_client import Counter, Gauge

from pgmeter.config import LagoConfig, LagoMapping, Settings
from pgmeter.lago import outbox
from pgmeter.lago.client import LagoClient, LagoUnavailable
from pgmeter.lago.plan import Item, Piece, Sent, UnsupportedMeter, check_syncable, metric_problem, next_items
from pgmeter.lago.subscriptions import Book, Customers, Owner, piece_timestamp, window_floor, window_span
from pgmeter.meters import store
from pgmeter.meters.store import Meter
from pgmeter.query.engine import distinct_values, run_query
from pgmeter.query.params import QueryParams, WindowSize
from pgmeter.rollup.watermark import wait_out_writers
from pgmeter.runtime import Runtime

log = logging.getLogger(__name__)

LAGO_LOCK_KEY = 7_283_110_006
# How much history one planning step covers, so a first run over months of events
# proceeds in bounded transactions.
PLAN_STEP = timedelta(days=7)
# How far back refused usage is read again when a subscription may now own it.
REFUSAL_RETRY = timedelta(days=62)
MAX_DELIVERY_TRIES = 3

LAGO_EVENTS = Counter("pgmeter_lago_events_total", "Lago events by outcome", ["outcome"])
LAGO_OUTBOX = Gauge("pgmeter_lago_outbox_items", "Lago outbox rows by status", ["status"])
LAGO_RUNS = Counter("pgmeter_lago_sync_runs_total", "Lago sync runs by outcome", ["outcome"])
LAGO_REFUSED = Counter("pgmeter_lago_refused_total",
                       "Usage pgmeter refused to send to Lago, by reason (metric, subscription, value)", ["reason"])
LAGO_MAPPINGS_REFUSED = Gauge("pgmeter_lago_mappings_refused",
                              "Mappings whose Lago billable metric cannot bill them (nothing is sent)")


@dataclass
class RunReport:
    planned: list[Item] = field(default_factory=list)
    delivered: int = 0
    duplicates: int = 0
    failed: int = 0
    pending: int = 0
    skipped: bool = False
    errors: list[str] = field(default_factory=list)
    # Mappings refused as a whole: "<namespace>/<slug> -> <code>: <reason>".
    refused: list[str] = field(default_factory=list)

    @property
    def to_send(self) -> list[Item]:
        return [item for item in self.planned if item.status == "pending"]

    @property
    def refused_items(self) -> list[Item]:
        return [item for item in self.planned if item.status == "refused"]


def mapping_key(meter: Meter) -> str:
    """What Lago's records are kept under: the meter's namespace and slug, not its id.

    A meter deleted and created again (or a config meter recreated at start) gets a
    new id; keyed by id, its whole history would be sent to Lago a second time.
    """
    return f"{meter.namespace}/{meter.slug}"


async def run_sync(pool: asyncpg.Pool, settings: Settings, client: LagoClient, *,
                   now: datetime | None = None, dry_run: bool = False,
                   customers: Customers | None = None) -> RunReport:
    """One sync run. With ``dry_run`` nothing is written or sent (Lago is only read):
    the plan is returned. ``customers`` keeps customer reads across runs."""
    now = now or datetime.now(UTC)
    report = RunReport()
    async with pool.acquire() as lock_conn:
        if not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", LAGO_LOCK_KEY):
            report.skipped = True
            LAGO_RUNS.labels("skipped").inc()
            return report
        try:
            book = Book(client, customers)  # subscriptions afresh each run: an upgrade is seen next run
            if not dry_run:
                await outbox.forget_other_mappings(lock_conn, [(f"{settings.namespace}/{m.meter}", m.code)
                                                               for m in settings.lago.mappings])
            for mapping in settings.lago.mappings:
                try:
                    await _sync_mapping(pool, settings, mapping, book, now, report, dry_run)
                except UnsupportedMeter as exc:
                    report.errors.append(str(exc))
                    log.error("lago mapping skipped", extra={"meter": mapping.meter, "reason": str(exc)})
                except LagoUnavailable as exc:
                    report.errors.append(f"Lago unavailable: {exc}")
                    log.warning("lago unavailable; mapping retried next run",
                                extra={"meter": mapping.meter, "reason": str(exc)})
            if not dry_run:
                await _deliver(pool, client, settings.lago.batch_size, report)
            await _refresh_gauges(pool)
        finally:
            await lock_conn.execute("SELECT pg_advisory_unlock($1)", LAGO_LOCK_KEY)
    LAGO_RUNS.labels("error" if report.errors or report.refused else "ok").inc()
    return report


async def _sync_mapping(pool: asyncpg.Pool, settings: Settings, mapping: LagoMapping, book: Book,
                        now: datetime, report: RunReport, dry_run: bool) -> None:
    config = settings.lago
    async with pool.acquire() as conn:
        meter = await store.get_by_slug(conn, settings.namespace, mapping.meter)
        if meter is None:
            raise UnsupportedMeter(f"meter {mapping.meter} does not exist in namespace {settings.namespace}")
        check_syncable(meter.slug, meter.aggregation)
        metric = await book.client.billable_metric(mapping.code)
        problem = metric_problem(meter.aggregation, mapping.property, metric, mapping.code)
        if not dry_run:
            await outbox.save_mapping_status(conn, mapping_key(meter), mapping.code, problem)
        if problem is not None:
            # Nothing is sent and the state does not advance: once the metric is fixed
            # in Lago, the next run sends everything that waited.
            report.refused.append(f"{mapping_key(meter)} -> {mapping.code}: {problem}")
            LAGO_REFUSED.labels("metric").inc()
            log.error("lago mapping refused", extra={"meter": mapping.meter, "code": mapping.code,
                                                     "reason": problem})
            return
        cutoff = (now - config.grace).astimezone(UTC).replace(microsecond=0)
        while True:
            tx = conn.transaction()
            await tx.start()
            try:
                done = await _plan_step(pool, conn, config, mapping, meter, book, cutoff, report)
            except BaseException:
                await tx.rollback()
                raise
            if dry_run:
                await tx.rollback()
                return
            await tx.commit()
            if done:
                return


@dataclass(frozen=True)
class _Read:
    """Read ``subject``'s usage in [lo, hi) for ``external_id``; ``only``: keep just
    these windows (late events)."""

    subject: str
    external_id: str
    lo: datetime
    hi: datetime
    only: frozenset[datetime] | None = None


async def _plan_step(pool: asyncpg.Pool, conn: asyncpg.Connection, config: LagoConfig, mapping: LagoMapping,
                     meter: Meter, book: Book, cutoff: datetime, report: RunReport) -> bool:
    """Plan one bounded step; return True when the mapping is caught up to ``cutoff``."""
    meter_key = mapping_key(meter)
    state = await outbox.lock_state(conn, meter_key, mapping.code)
    watermark = await wait_out_writers(conn)
    if state is None:
        first = await outbox.first_event_time(conn, meter)
        read_to = first.astimezone(UTC).replace(microsecond=0) if first else cutoff
        seen_seq = 0
    else:
        read_to, seen_seq = state
    step_end = min(cutoff, read_to + PLAN_STEP) if read_to < cutoff else read_to

    def external_id(subject: str) -> str:
        return config.subjects.get(subject, subject)

    reads: list[_Read] = []
    if read_to < step_end:
        # Every window that overlaps [read_to, step_end), from its start (in the
        # subject's customer time zone, applied in _read_pieces).
        subjects = await distinct_values(pool, meter, None, read_to - window_span(config.window), step_end)
        reads.extend(_Read(subject, external_id(subject), read_to, step_end) for subject in subjects)
    # Windows that late events reached since the last run.
    late: dict[str, set[datetime]] = defaultdict(set)
    for subject, hour in await outbox.touched_hours(conn, meter, seen_seq, watermark, read_to):
        late[subject].add(hour)
    recent = {read.subject for read in reads}
    await book.prefetch({external_id(subject) for subject in late})
    for subject, hours in late.items():
        owner = await book.owner(external_id(subject))
        read_from = window_floor(read_to, config.window, owner.timezone)
        windows = set()
        for hour in hours:  # a UTC hour lies in at most two windows of any zone
            windows.add(window_floor(hour, config.window, owner.timezone))
            windows.add(window_floor(hour + timedelta(minutes=59, seconds=59), config.window, owner.timezone))
        for window in windows:
            if subject in recent and window >= read_from:
                continue  # read whole by the recent read already
            reads.append(_Read(subject, external_id(subject), window, min(window + window_span(config.window),
                                                                               step_end), frozenset({window})))

    reads.extend(await _refusals_to_retry(conn, config, meter_key, mapping.code, book, step_end))
    await book.prefetch({read.external_id for read in reads})
    pieces = await _read_pieces(pool, meter, config, book, reads)
    read_windows = sorted({(p.subject, p.window_start) for p in pieces.values()})
    history = await outbox.histories(conn, meter_key, mapping.code, read_windows)
    # A window already sent keeps its external subscription, whatever lago.subjects says now.
    moved: dict[tuple[str, datetime], str] = {}
    for (subject, window_start, _), rows in history.items():
        billed = [row for row in rows if row.billed]  # refused or rejected rows own nothing
        owner_then = max(billed, key=lambda r: r.revision).external_subscription_id if billed else ""
        if owner_then and owner_then != external_id(subject):
            moved[(subject, window_start)] = owner_then
    if moved:
        for key in [k for k in pieces if (k[0], k[1]) in moved]:
            del pieces[key]
        again = [_Read(subject, owner_then, window_start, window_start + window_span(config.window),
                       frozenset({window_start})) for (subject, window_start), owner_then in moved.items()]
        pieces.update(await _read_pieces(pool, meter, config, book, again, cap=step_end))
    _adopt_legacy_rows(pieces, history)
    if meter.aggregation in ("SUM", "COUNT"):
        # A piece sent before and now empty (a subscription's range changed): zero it.
        for key, rows in history.items():
            if key not in pieces and rows:
                last = max(rows, key=lambda r: r.revision)
                end = last.window_end or key[1]
                pieces[key] = Piece(key[0], key[1], end, last.external_subscription_id, key[2], key[1], end,
                                    last.timestamp, Decimal(0), None if key[2] else "no longer owned")

    items: list[Item] = []
    for key in sorted(pieces):
        items.extend(next_items(aggregation=meter.aggregation, meter_key=meter_key, code=mapping.code,
                                property=mapping.property, piece=pieces[key], history=history.get(key, [])))
    await outbox.add(conn, items)
    report.planned.extend(items)
    for item in items:
        if item.status == "refused":
            LAGO_REFUSED.labels("value" if item.lago_subscription_id else "subscription").inc()
    await outbox.save_state(conn, meter_key, mapping.code, step_end, watermark)
    return step_end >= cutoff


async def _refusals_to_retry(conn: asyncpg.Connection, config: LagoConfig, meter_key: str, code: str, book: Book,
                             step_end: datetime) -> list[_Read]:
    """Windows refused for want of a subscription, read again once one may own them:
    the subject now maps to another subscription, or Lago now has a record of its
    subscription overlapping the window (created later, perhaps backdated). Limited
    to the last REFUSAL_RETRY, a billing period and its grace: older usage cannot be
    invoiced anyway. A read that finds the same refusal changes nothing."""
    rows = await outbox.refused_windows(conn, meter_key, code, step_end - REFUSAL_RETRY)
    if not rows:
        return []
    span = window_span(config.window)
    await book.prefetch({config.subjects.get(row["subject"], row["subject"]) for row in rows})
    retry = []
    for row in rows:
        subject, window = row["subject"], row["window_start"]
        external_id = config.subjects.get(subject, subject)
        if external_id == row["external_subscription_id"]:
            owner = await book.owner(external_id)
            if owner.problem or not any(record.range[0] < window + span and record.range[1] > window
                                        for record in owner.records):
                continue  # nothing changed that could own it
        retry.append(_Read(subject, external_id, window, min(window + span, step_end), frozenset({window})))
    return retry


def _adopt_legacy_rows(pieces: dict[tuple[str, datetime, str], Piece],
                       history: dict[tuple[str, datetime, str], list[Sent]]) -> None:
    """Rows sent before windows were split by subscription (migration 007) have no
    Lago record; what they billed counts for the window's first owned piece, so an
    upgraded pgmeter sends only the difference, never the window again."""
    for (subject, window_start, record), rows in list(history.items()):
        billed = [row for row in rows if row.billed]
        if record or not billed:
            continue
        owned = [p for p in pieces.values()
                 if p.subject == subject and p.window_start == window_start and p.lago_subscription_id]
        if not owned:
            continue
        target = min(owned, key=lambda p: p.start).key
        history[target] = history.get(target, []) + billed
        history[(subject, window_start, record)] = [row for row in rows if not row.billed]


async def _read_pieces(pool: asyncpg.Pool, meter: Meter, config: LagoConfig, book: Book, reads: list[_Read],
                       *, cap: datetime | None = None) -> dict[tuple[str, datetime, str], Piece]:
    """Usage of each read, per window and subscription record, through the query engine.

    Subjects whose reads cut into the same segments in the same zone share one query
    (usually all of them: one segment, the whole range).
    """
    groups: dict[tuple[str, tuple[tuple[datetime, datetime], ...]], list[tuple[_Read, Owner, list]]] = \
        defaultdict(list)
    for read in reads:
        owner = await book.owner(read.external_id)
        lo = window_floor(read.lo, config.window, owner.timezone)
        hi = min(read.hi, cap) if cap is not None else read.hi
        if lo >= hi:
            continue
        segments = [(None, lo, hi)] if owner.problem else owner.segments(lo, hi)
        groups[(owner.timezone, tuple((s, e) for _, s, e in segments))].append((read, owner, segments))
    pieces: dict[tuple[str, datetime, str], Piece] = {}
    made_by: dict[tuple[str, datetime, str], tuple[int, int]] = {}
    for group, ((tz, bounds), members) in enumerate(groups.items()):
        subjects = tuple(sorted({read.subject for read, _, _ in members}))
        by_subject = {read.subject: (read, owner, segments) for read, owner, segments in members}
        for index, (start, end) in enumerate(bounds):
            params = QueryParams(from_=start, to=end, window_size=WindowSize(config.window), window_time_zone=tz,
                                 subjects=subjects, group_by=("subject",))
            for row in (await run_query(pool, meter, params)).rows:
                read, owner, segments = by_subject[row.subject or ""]
                window_start, window_end = row.window_start.astimezone(UTC), row.window_end.astimezone(UTC)
                if read.only is not None and window_start not in read.only:
                    continue
                record = segments[index][0]
                piece_start, piece_end = max(window_start, start), min(window_end, end)
                if record is None:
                    piece = Piece(read.subject, window_start, window_end, owner.external_id, "", piece_start,
                                  piece_end, Decimal(int(piece_start.timestamp())), row.value,
                                  owner.not_active(piece_start, piece_end))
                else:
                    piece = Piece(read.subject, window_start, window_end, owner.external_id, record.lago_id,
                                  piece_start, piece_end, piece_timestamp(window_start, record, owner.records),
                                  row.value)
                earlier = made_by.get(piece.key)
                if piece.refused is not None and earlier is not None and earlier[0] == group \
                        and earlier[1] != index:
                    # Two gaps of one window (before a start and after an end): one refusal.
                    old = pieces[piece.key]
                    piece = Piece(piece.subject, window_start, window_end, owner.external_id, "", old.start,
                                  piece_end, old.timestamp, old.usage + row.value if meter.aggregation in
                                  ("SUM", "COUNT") else max(old.usage, row.value), old.refused)
                pieces[piece.key] = piece
                made_by[piece.key] = (group, index)
    return pieces


async def _deliver(pool: asyncpg.Pool, client: LagoClient, batch_size: int, report: RunReport) -> None:
    async with pool.acquire() as conn:
        pending = await outbox.pending(conn)
        tries = 0
        while pending:
            batch, pending = pending[:batch_size], pending[batch_size:]
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
                # Exponential backoff within the run, or Lago's own reset time (capped
                # by the client, so an epoch-form reset header cannot park the sync).
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
        refused_mappings = await outbox.refused_mappings(conn)
    for status in ("pending", "sent", "failed", "refused"):
        LAGO_OUTBOX.labels(status).set(counts.get(status, 0))
    LAGO_MAPPINGS_REFUSED.set(len(refused_mappings))


async def start(runtime: Runtime) -> None:
    """The lago-sync role: a run every ``lago.interval``, the first right away."""
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    settings = runtime.settings
    if not settings.lago.api_key:
        raise UnsupportedMeter("lago.apiKey (PGMETER_LAGO_API_KEY) is required when lago.enabled is true")
    client = LagoClient(settings.lago.url, settings.lago.api_key)
    customers = Customers()
    scheduler = AsyncIOScheduler(timezone="UTC")

    async def job() -> None:
        try:
            report = await run_sync(runtime.pool, settings, client, customers=customers)
            log.info("lago sync run", extra={"planned": len(report.to_send), "delivered": report.delivered,
                                             "refused": len(report.refused_items), "failed": report.failed,
                                             "pending": report.pending, "skipped": report.skipped})
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
