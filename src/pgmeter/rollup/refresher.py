"""``pgmeter refresher``: keep every meter's rollup up to date, exactly once.

A cycle (when the sink's commits notify ``pgmeter_events``, at most every
DEBOUNCE_S, and at least every ``refresher.interval``) first establishes the
watermark W (:mod:`pgmeter.rollup.watermark`): every event with ``seq <= W`` is
committed. Then, one transaction per batch, it claims the least recently merged
meter that is behind W (``FOR UPDATE SKIP LOCKED``: replicas share the meters and
never merge the same one twice), merges the events ``last_seq < seq <=
min(W, last_seq + maxBatch)`` and moves ``last_seq`` in the same transaction.
A crash anywhere rolls back both, so no event is skipped or merged twice, and
late events are just new seqs that land in their old buckets.

A new meter starts at ``last_seq = 0`` and is backfilled batch by batch, taking
turns with the other meters; progress is logged. Queries stay exact meanwhile
because they add every event not merged yet.

Cost follows the events, not the meters: before claiming, one statement reads the
(namespace, type) pairs of the new events (at most ``maxBatch`` of them) and moves
every meter with nothing of its pair in its range straight to W, without running
its merge. A namespace with hundreds of meters and one new event costs one merge.

Isolation: a merge that fails for a reason of its own (its data, its tables, a
lock on them: anything but the connection or the server) is rolled back to a
savepoint, and the meter is set aside with exponential backoff (5 s doubling to
10 min), its reason, first failure and next attempt recorded in its progress row
(shown by the meters API as ``pgmeterState``, counted by
``pgmeter_refresher_meters_failing``). Every other meter keeps merging in the same
cycle; the failing one resumes from its own ``last_seq``, so once the cause is gone
it catches up exactly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from prometheus_client import Counter, Gauge

from pgmeter.metric_labels import tenant
from pgmeter.rollup import floor
from pgmeter.rollup.day_zones import known_zones
from pgmeter.rollup.day_zones import sync as sync_zones
from pgmeter.rollup.merge import merge_range
from pgmeter.rollup.objects import Rollup
from pgmeter.rollup.watermark import LOCK_TIMEOUT_MS, WRITER_WAIT_S, WritersBusy, wait_out_writers
from pgmeter.runtime import Runtime

log = logging.getLogger(__name__)

LAG_EVENTS = Gauge("pgmeter_refresher_lag_events",
                   "Events written but not merged yet by the meter furthest behind "
                   "(seq distance, an upper bound)")
LAG_SECONDS = Gauge("pgmeter_refresher_lag_seconds",
                    "Age of the oldest event not merged yet by the meter furthest behind")
EVENTS_MERGED = Counter("pgmeter_meter_events_merged_total", "Events merged into a meter's rollup",
                        ["meter"])
METERS_FAILING = Gauge("pgmeter_refresher_meters_failing",
                       "Meters whose last merge failed, set aside with backoff (reason in the meters API)")
MERGE_FAILURES = Counter("pgmeter_refresher_merge_failures_total", "Meter merges that failed and were rolled back")
BACKFILL_REMAINING = Gauge("pgmeter_refresher_backfill_remaining_events",
                           "Seqs left to scan by the meters this refresher is backfilling (new meters, groupBy "
                           "changes)")
BACKFILL_ETA = Gauge("pgmeter_refresher_backfill_eta_seconds",
                     "Estimated seconds until the slowest meter this refresher is backfilling catches up")
IDLE_ADVANCES = Counter("pgmeter_refresher_idle_advances_total",
                        "Meters moved to the watermark without a merge (no new event of their type)")

PROGRESS_EVERY = 5.0  # seconds between backfill progress lines per meter
# The sink's commits wake the refresher (a statement trigger on events notifies this
# channel); cycles start at most this often, however many commits arrive.
NOTIFY_CHANNEL = "pgmeter_events"
DEBOUNCE_S = 0.1
COMPACT_EVERY = 30.0  # seconds between compactions of event_floor (pgmeter.rollup.floor)
LISTEN_PROBE_S = 5.0  # how often the listening connection is checked
LISTEN_RETRY_S = 1.0  # before listening again after a lost connection
MERGE_WORK_MEM = "64MB"
# A merge waits at most this long for a lock on its tables (someone holding one by
# hand, a long DDL): then it fails, and only its meter waits, not the cycle.
MERGE_LOCK_TIMEOUT_MS = 5000
# A failing meter is retried after 5 s, then 10 s, 20 s ... at most 10 minutes.
BACKOFF_MIN_S = 5.0
BACKOFF_MAX_S = 600.0
REASON_CHARS = 1000  # of the error text kept as the meter's failure reason

# SQLSTATEs that are the connection's or the server's fault, never one meter's:
# 08 connection, 53100 disk full, 53300 too many connections, 53400 configuration
# limit, 57P operator intervention (shutdown; 57014 query_canceled is a statement
# timeout and stays the meter's), 58 system error. These abort the cycle, which the
# next one retries. Out of memory (53200) stays the meter's: one meter's huge
# values can cause it, and setting every meter aside for a while is better than
# one meter stopping all of them.
_NOT_THE_METERS = ("08", "53100", "53300", "53400", "57P", "58")


@dataclass
class Batch:
    meter_id: str
    slug: str
    lo: int
    hi: int
    events: int
    failure: str | None = None  # the error, when the merge failed and the meter was set aside


@dataclass
class CycleReport:
    watermark: int
    batches: list[Batch] = field(default_factory=list)
    advanced: int = 0  # meters moved to the watermark without a merge (nothing of their type)

    @property
    def failures(self) -> list[Batch]:
        return [batch for batch in self.batches if batch.failure is not None]

    @property
    def events(self) -> int:
        return sum(batch.events for batch in self.batches)


# The least recently merged meter behind the watermark that no one else is merging
# and that is not set aside after a failure.
_CLAIM = """
    SELECT r.meter_id, r.version, r.namespace, r.event_type, r.aggregation, r.event_from,
           r.value_path, r.group_keys, r.group_paths::text AS group_paths, r.view_name,
           r.last_seq, r.hourly, r.day_zones, r.failures, m.slug
      FROM meter_rollups r
      JOIN meters m ON m.id = r.meter_id
     WHERE r.last_seq < $1
       AND (r.next_attempt IS NULL OR r.next_attempt <= now())
     ORDER BY r.merged_at NULLS FIRST, r.meter_id
     LIMIT 1
       FOR UPDATE OF r SKIP LOCKED
"""

# Meters with nothing to merge, moved to the watermark $1 in one statement. The
# candidates are the meters behind $1 by at most $2 (maxBatch) events that are not
# failing (only a merge clears a failure); "seen" is the last seq per (namespace,
# type) among the events in (lo, $1], lo the lowest candidate last_seq, so this
# reads no more than one merge batch would, and in the steady state only the new
# events. A candidate with no event of its pair after its last_seq has nothing to
# merge. Rows another refresher is merging are skipped, and a row that changed
# meanwhile is re-checked under the lock.
_ADVANCE_IDLE = """
WITH span AS (
    SELECT min(last_seq) AS lo
      FROM meter_rollups
     WHERE last_seq < $1::bigint AND last_seq >= $1::bigint - $2::bigint AND failures = 0
),
seen AS (
    SELECT namespace, type, max(seq) AS last
      FROM events
     WHERE seq > (SELECT lo FROM span) AND seq <= $1
       -- The least time of those events (pgmeter.rollup.floor): prunes partitions.
       AND time >= (SELECT min(min_time) FROM event_floor WHERE hi_seq > (SELECT lo FROM span))
     GROUP BY namespace, type
),
idle AS (
    SELECT r.meter_id
      FROM meter_rollups r
     WHERE r.last_seq < $1 AND r.last_seq >= (SELECT lo FROM span) AND r.failures = 0
       -- A scalar subquery, not NOT EXISTS: as an expression on r it is evaluated
       -- again on the newest row version when the lock finds one (a concurrent
       -- merge, or a rebuild that reset last_seq), which an anti-join may not be.
       AND coalesce((SELECT s.last FROM seen s WHERE s.namespace = r.namespace AND s.type = r.event_type),
                    0) <= r.last_seq
       FOR UPDATE OF r SKIP LOCKED
)
UPDATE meter_rollups r
   SET last_seq = $1, merged_at = now()
  FROM idle
 WHERE r.meter_id = idle.meter_id
"""

# A failed merge: set the meter aside with backoff ($3, $4: min and max seconds).
_SET_ASIDE = """
UPDATE meter_rollups
   SET failures = failures + 1,
       failure_reason = $2,
       failing_since = coalesce(failing_since, now()),
       next_attempt = now() + make_interval(secs => least($4::float8, $3::float8 * power(2, failures))),
       merged_at = now()
 WHERE meter_id = $1
RETURNING failures, next_attempt
"""


def blames_meter(exc: BaseException) -> bool:
    """Whether a failed merge is its meter's problem (set it aside) rather than the
    connection's or the server's (abort the cycle and retry)."""
    if not isinstance(exc, asyncpg.PostgresError):
        return False
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return not sqlstate.startswith(_NOT_THE_METERS)


class Refresher:
    """Merges new events into every meter's rollup. Safe to run in several processes."""

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int, lock_timeout_ms: int = LOCK_TIMEOUT_MS,
                 writer_wait_s: float = WRITER_WAIT_S, merge_lock_timeout_ms: int = MERGE_LOCK_TIMEOUT_MS,
                 backoff_min_s: float = BACKOFF_MIN_S, backoff_max_s: float = BACKOFF_MAX_S,
                 day_zones: Sequence[str] = ()) -> None:
        self.pool = pool
        # The zones whose local days every meter keeps a level of (refresher.dayZones).
        self.day_zones = tuple(sorted(set(day_zones)))
        self.max_batch = max_batch
        self.lock_timeout_ms = lock_timeout_ms
        self.writer_wait_s = writer_wait_s
        self.merge_lock_timeout_ms = merge_lock_timeout_ms
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.watermark = 0  # every seq <= watermark is committed; only ever grows
        self._progress_logged: dict[str, float] = {}
        self._compacted_at = float("-inf")  # event_floor compaction, every COMPACT_EVERY
        # Meters being backfilled by this process: (started, first seq, last seq),
        # and their (remaining seqs, ETA seconds).
        self._backfills: dict[str, tuple[float, int, int]] = {}
        self._eta: dict[str, tuple[int, float | None]] = {}

    async def advance_watermark(self) -> int:
        async with self.pool.acquire() as conn:
            try:
                self.watermark = max(self.watermark, await wait_out_writers(
                    conn, lock_timeout_ms=self.lock_timeout_ms, writer_wait_s=self.writer_wait_s))
            except WritersBusy as exc:
                # The old watermark stays true; the next cycle tries again.
                log.info("refresher waits for a long writer", extra={"reason": str(exc)})
        return self.watermark

    async def advance_idle(self) -> int:
        """Move every meter with no new event of its (namespace, type) to the
        watermark without merging; returns how many moved."""
        async with self.pool.acquire() as conn:
            status = await conn.execute(_ADVANCE_IDLE, self.watermark, self.max_batch)
        advanced = int(status.split()[-1])
        IDLE_ADVANCES.inc(advanced)
        return advanced

    async def merge_batch(self) -> Batch | None:
        """Claim one meter behind the watermark and merge one batch; None if none is.

        A merge that fails for a reason of its meter's is rolled back to a savepoint
        and the meter set aside (the returned batch carries the failure); the claim
        and the failure record commit, the cycle goes on with the other meters.
        """
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                row = await conn.fetchrow(_CLAIM, self.watermark)
                if row is None:
                    return None
                # A batch of up to maxBatch events is sorted and grouped several times;
                # with the default 4MB work_mem those sorts spill to disk. JIT would
                # compile the merge anew for every batch: more cost than it saves.
                await conn.execute(f"SET LOCAL work_mem = '{MERGE_WORK_MEM}'")
                await conn.execute("SET LOCAL jit = off")
                await conn.execute(f"SET LOCAL lock_timeout = {int(self.merge_lock_timeout_ms)}")
                rollup = Rollup.from_row(row)
                lo = rollup.last_seq
                hi = min(self.watermark, lo + self.max_batch)
                try:
                    async with conn.transaction():  # a savepoint: a failure undoes the merge only
                        rollup = await sync_zones(conn, rollup, self.day_zones)
                        events = await merge_range(conn, rollup, lo, hi)
                except asyncpg.PostgresError as exc:
                    if not blames_meter(exc):
                        raise
                    return await self._set_aside(conn, rollup, row["slug"], lo, hi, exc)
                await conn.execute(
                    "UPDATE meter_rollups SET last_seq = $2, merged_at = now(), failures = 0, "
                    "failure_reason = NULL, failing_since = NULL, next_attempt = NULL "
                    "WHERE meter_id = $1", rollup.meter_id, hi)
        batch = Batch(rollup.meter_id, row["slug"], lo, hi, events)
        EVENTS_MERGED.labels(tenant(batch.slug)).inc(events)
        if row["failures"]:
            log.info("meter merges again", extra={"meter": batch.slug, "namespace": rollup.namespace,
                                                  "failures": row["failures"]})
        self._log_progress(batch)
        return batch

    async def _set_aside(self, conn: asyncpg.Connection, rollup: Rollup, slug: str, lo: int, hi: int,
                         exc: asyncpg.PostgresError) -> Batch:
        reason = f"{type(exc).__name__} ({exc.sqlstate}): {exc}"[:REASON_CHARS]
        failed = await conn.fetchrow(_SET_ASIDE, rollup.meter_id, reason, self.backoff_min_s, self.backoff_max_s)
        MERGE_FAILURES.inc()
        # The meter is named in the log, not in a metric label (label sets stay bounded).
        log.warning("meter merge failed; meter set aside", extra={
            "meter": slug, "namespace": rollup.namespace, "meter_id": rollup.meter_id, "seq": lo,
            "reason": reason, "failures": failed["failures"], "next_attempt": failed["next_attempt"].isoformat()})
        return Batch(rollup.meter_id, slug, lo, hi, 0, failure=reason)

    def _log_progress(self, batch: Batch) -> None:
        """Backfill progress (a new meter, a groupBy change): a log line every
        PROGRESS_EVERY seconds per meter with its rate and ETA, and the gauges.

        The rate is in seqs per second (events of every type scanned), measured since
        this process started the meter's backfill; the ETA is the distance to the
        watermark at that rate. Queries stay exact meanwhile (they add the tail)."""
        now = time.monotonic()
        if batch.hi >= self.watermark:
            started = self._backfills.pop(batch.meter_id, None)
            self._progress_logged.pop(batch.meter_id, None)
            if started is not None:
                elapsed = now - started[0]
                log.info("meter caught up", extra={
                    "meter": batch.slug, "seq": batch.hi, "seconds": round(elapsed, 1),
                    "rate": round((batch.hi - started[1]) / elapsed) if elapsed > 0 else None})
            self._set_backfill_gauges()
            return
        started = self._backfills.setdefault(batch.meter_id, (now, batch.lo, batch.hi))
        elapsed = now - started[0]
        done = batch.hi - started[1]
        rate = done / elapsed if elapsed > 0 else None
        remaining = self.watermark - batch.hi
        eta = remaining / rate if rate else None
        self._backfills[batch.meter_id] = (started[0], started[1], batch.hi)
        self._eta[batch.meter_id] = (remaining, eta)
        self._set_backfill_gauges()
        if now - self._progress_logged.get(batch.meter_id, 0.0) >= PROGRESS_EVERY:
            self._progress_logged[batch.meter_id] = now
            log.info("backfilling meter", extra={
                "meter": batch.slug, "seq": batch.hi, "target_seq": self.watermark,
                "percent": round(100 * batch.hi / max(self.watermark, 1), 1),
                "remaining": remaining, "rate": round(rate) if rate is not None else None,
                "eta_seconds": round(eta) if eta is not None else None})

    def _set_backfill_gauges(self) -> None:
        self._eta = {meter: value for meter, value in self._eta.items() if meter in self._backfills}
        BACKFILL_REMAINING.set(sum(remaining for remaining, _ in self._eta.values()))
        BACKFILL_ETA.set(max((eta for _, eta in self._eta.values() if eta is not None), default=0))

    async def run_cycle(self) -> CycleReport:
        """Merge every meter up to a fresh watermark (failing meters are set aside)."""
        report = CycleReport(await self.advance_watermark())
        report.advanced = await self.advance_idle()
        failed: set[str] = set()
        while (batch := await self.merge_batch()) is not None:
            report.batches.append(batch)
            if batch.failure is not None:
                if batch.meter_id in failed:
                    break  # due again already (a backoff of ~0): leave it to the next cycle
                failed.add(batch.meter_id)
        await self.update_lag()
        if time.monotonic() - self._compacted_at >= COMPACT_EVERY:
            # Folds every pair's rows, so not on every wake-up: rows accumulate one
            # per sink batch and pair meanwhile, which the floor's index reads cheaply.
            async with self.pool.acquire() as conn:
                await floor.compact(conn, self.watermark)
            self._compacted_at = time.monotonic()
        return report

    async def update_lag(self) -> None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT (SELECT min(last_seq) FROM meter_rollups) AS behind, "
                "(SELECT count(*) FROM meter_rollups WHERE failures > 0) AS failing, "
                "pg_sequence_last_value('events_seq') AS head")
            METERS_FAILING.set(row["failing"])
            behind, head = row["behind"], row["head"] or 0
            if behind is None or head <= behind:
                LAG_EVENTS.set(0)
                LAG_SECONDS.set(0)
                return
            LAG_EVENTS.set(head - behind)
            time_floor = await floor.any_floor(conn, behind)
            oldest = None if time_floor is None else await conn.fetchval(
                "SELECT stored_at FROM events WHERE seq > $1 AND time >= $2 ORDER BY seq LIMIT 1", behind, time_floor)
            LAG_SECONDS.set(max(0.0, (datetime.now(UTC) - oldest).total_seconds()) if oldest else 0)


async def start(runtime: Runtime) -> None:
    """Run refresh cycles for the life of the runtime: on every wake-up from the sink
    (NOTIFY, see sql/011_event_floor.sql) and at least every ``refresher.interval``."""
    settings = runtime.settings.refresher
    async with runtime.pool.acquire() as conn:
        zones = await known_zones(conn, settings.day_zones)
    refresher = Refresher(runtime.pool, max_batch=settings.max_batch, day_zones=zones)
    runtime.refresher = refresher
    wake = asyncio.Event()
    runtime.spawn("refresher", _cycles(refresher, wake, settings.interval.total_seconds()))
    runtime.spawn("refresher-listen", _listen(runtime.settings.postgres.url, wake,
                                              runtime.settings.postgres.connect_timeout.total_seconds()))


async def _cycles(refresher: Refresher, wake: asyncio.Event, interval: float) -> None:
    """A cycle when woken or when ``interval`` passes, whichever is first, and never
    two closer than DEBOUNCE_S: under a steady stream of commits the cycles run back
    to back, each merging everything committed before it began."""
    while True:
        try:
            await asyncio.wait_for(wake.wait(), interval)
        except TimeoutError:
            pass
        wake.clear()
        started = time.monotonic()
        await _cycle(refresher)
        await asyncio.sleep(max(0.0, DEBOUNCE_S - (time.monotonic() - started)))


async def _listen(url: str, wake: asyncio.Event, connect_timeout: float) -> None:
    """LISTEN on a connection of its own (a pooled one may sit behind a transaction
    pooler, and LISTEN needs a session); reconnect after a loss. While it is down the
    timer alone drives the cycles, so a lost notification costs at most one interval."""
    while True:
        try:
            await _listen_once(url, wake, connect_timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.info("refresher wake-ups unavailable; the timer drives cycles",
                     extra={"reason": f"{type(exc).__name__}: {exc}"})
        await asyncio.sleep(LISTEN_RETRY_S)


async def _listen_once(url: str, wake: asyncio.Event, connect_timeout: float) -> None:
    """Set ``wake`` on every notification until the connection is lost."""
    conn = await asyncpg.connect(url, timeout=connect_timeout,
                                 server_settings={"application_name": "pgmeter-refresher-listen"})
    try:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_args: wake.set())
        wake.set()  # commits made while not listening
        while not lost.is_set():
            try:
                await asyncio.wait_for(lost.wait(), LISTEN_PROBE_S)
            except TimeoutError:
                await conn.fetchval("SELECT 1", timeout=LISTEN_PROBE_S)  # a dead link shows here
    finally:
        if not conn.is_closed():
            conn.terminate()


async def _cycle(refresher: Refresher) -> None:
    try:
        await refresher.run_cycle()
    except Exception:  # a failed cycle is retried by the next one; keep the loop alive
        log.exception("refresh cycle failed")
