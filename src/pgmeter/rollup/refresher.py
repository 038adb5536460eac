"""``pgmeter refresher``: keep every meter's rollup up to date, exactly once.

A cycle (every ``refresher.interval``, apscheduler) first establishes the
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
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from prometheus_client import Counter, Gauge

from pgmeter.metric_labels import tenant
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

PROGRESS_EVERY = 5.0  # seconds between backfill progress lines per meter
MERGE_WORK_MEM = "64MB"


@dataclass
class Batch:
    meter_id: str
    slug: str
    lo: int
    hi: int
    events: int


@dataclass
class CycleReport:
    watermark: int
    batches: list[Batch] = field(default_factory=list)

    @property
    def events(self) -> int:
        return sum(batch.events for batch in self.batches)


# The least recently merged meter behind the watermark that no one else is merging.
_CLAIM = """
    SELECT r.meter_id, r.version, r.namespace, r.event_type, r.aggregation, r.event_from,
           r.value_path, r.group_keys, r.group_paths::text AS group_paths, r.view_name,
           r.last_seq, m.slug
      FROM meter_rollups r
      JOIN meters m ON m.id = r.meter_id
     WHERE r.last_seq < $1
     ORDER BY r.merged_at NULLS FIRST, r.meter_id
     LIMIT 1
       FOR UPDATE OF r SKIP LOCKED
"""


class Refresher:
    """Merges new events into every meter's rollup. Safe to run in several processes."""

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int, lock_timeout_ms: int = LOCK_TIMEOUT_MS,
                 writer_wait_s: float = WRITER_WAIT_S) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self.lock_timeout_ms = lock_timeout_ms
        self.writer_wait_s = writer_wait_s
        self.watermark = 0  # every seq <= watermark is committed; only ever grows
        self._progress_logged: dict[str, float] = {}

    async def advance_watermark(self) -> int:
        async with self.pool.acquire() as conn:
            try:
                self.watermark = max(self.watermark, await wait_out_writers(
                    conn, lock_timeout_ms=self.lock_timeout_ms, writer_wait_s=self.writer_wait_s))
            except WritersBusy as exc:
                # The old watermark stays true; the next cycle tries again.
                log.info("refresher waits for a long writer", extra={"reason": str(exc)})
        return self.watermark

    async def merge_batch(self) -> Batch | None:
        """Claim one meter behind the watermark and merge one batch; None if none is."""
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
                rollup = Rollup.from_row(row)
                lo = rollup.last_seq
                hi = min(self.watermark, lo + self.max_batch)
                events = await merge_range(conn, rollup, lo, hi)
                await conn.execute("UPDATE meter_rollups SET last_seq = $2, merged_at = now() "
                                   "WHERE meter_id = $1", rollup.meter_id, hi)
        batch = Batch(rollup.meter_id, row["slug"], lo, hi, events)
        EVENTS_MERGED.labels(tenant(batch.slug)).inc(events)
        self._log_progress(batch)
        return batch

    def _log_progress(self, batch: Batch) -> None:
        if batch.hi >= self.watermark:
            if self._progress_logged.pop(batch.meter_id, None) is not None:
                log.info("meter caught up", extra={"meter": batch.slug, "seq": batch.hi})
            return
        now = time.monotonic()
        if now - self._progress_logged.get(batch.meter_id, 0.0) >= PROGRESS_EVERY:
            self._progress_logged[batch.meter_id] = now
            log.info("backfilling meter", extra={
                "meter": batch.slug, "seq": batch.hi, "target_seq": self.watermark,
                "percent": round(100 * batch.hi / max(self.watermark, 1), 1)})

    async def run_cycle(self) -> CycleReport:
        """Merge every meter up to a fresh watermark."""
        report = CycleReport(await self.advance_watermark())
        while (batch := await self.merge_batch()) is not None:
            report.batches.append(batch)
        await self.update_lag()
        return report

    async def update_lag(self) -> None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT (SELECT min(last_seq) FROM meter_rollups) AS behind, "
                "pg_sequence_last_value('events_seq') AS head")
            behind, head = row["behind"], row["head"] or 0
            if behind is None or head <= behind:
                LAG_EVENTS.set(0)
                LAG_SECONDS.set(0)
                return
            LAG_EVENTS.set(head - behind)
            oldest = await conn.fetchval(
                "SELECT stored_at FROM events WHERE seq > $1 ORDER BY seq LIMIT 1", behind)
            LAG_SECONDS.set(max(0.0, (datetime.now(UTC) - oldest).total_seconds()) if oldest else 0)


async def start(runtime: Runtime) -> None:
    """Schedule refresh cycles for the life of the runtime."""
    settings = runtime.settings.refresher
    refresher = Refresher(runtime.pool, max_batch=settings.max_batch)
    runtime.extras["refresher"] = refresher
    scheduler = AsyncIOScheduler(timezone=UTC)
    scheduler.add_job(
        _cycle, "interval", args=[refresher], seconds=settings.interval.total_seconds(),
        next_run_time=datetime.now(UTC), max_instances=1, coalesce=True, id="refresh",
        misfire_grace_time=None,
    )
    scheduler.start()
    runtime.spawn("refresher", _hold(scheduler))


async def _cycle(refresher: Refresher) -> None:
    try:
        await refresher.run_cycle()
    except Exception:  # a failed cycle is retried by the next one; keep the scheduler alive
        log.exception("refresh cycle failed")


async def _hold(scheduler: AsyncIOScheduler) -> None:
    """Keep the scheduler for the runtime's lifetime; stop it (and its job) on cancel."""
    try:
        await asyncio.Event().wait()
    finally:
        scheduler.shutdown(wait=False)  # cancels a running cycle; its transaction rolls back
        await asyncio.sleep(0)
