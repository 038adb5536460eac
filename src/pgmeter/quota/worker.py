"""The quota worker: keeps every metered entitlement's value in Valkey, and tells listeners.

It runs beside the sink. With ``valkey.url`` set and ``quota.enabled`` it *stores*: each
value goes to Valkey. Either way it hands each fresh value to its listeners (the notify
room's rules), so an api+sink deployment without Valkey, or with the quota store off,
still sends threshold and reset notifications; without a store it only works while a
listener wants values (``interested``: the notify room has an active rule). What makes
an entitlement *dirty* (to be recomputed, :mod:`pgmeter.quota.balances`):

- a sink commit with events of its meter's type for one of its customer's subjects
  (the runtime's post-commit listener list; late events too, whatever their time);
- a notice from Postgres (``pgmeter_quota`` channel, sql triggers): a grant created or
  voided, a reset, an entitlement created or deleted, a customer's subjects changed;
- its ``validUntil`` passing (period end, grant start/expiry/recurrence): the due set
  (in Valkey when storing, in memory otherwise);
- Valkey losing its data (the ``built`` marker gone), a listener becoming interested,
  and every ``quota.rebuildInterval``: everything.

Dirty entitlements are recomputed in rounds; an entitlement is never computed twice
at once in a process, and the write script keeps the newest snapshot's value when
processes race. A failed round puts its entitlements back and backs off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Any

import asyncpg

from pgmeter.dependencies import describe
from pgmeter.quota import balances, layout
from pgmeter.runtime import Committed, Runtime

log = logging.getLogger(__name__)

CHANNEL = "pgmeter_quota"
DUE_INTERVAL = 1.0
MAX_BACKOFF = 5.0

_MATCHING = """
SELECT e.id, m.event_type, c.key,
       array(SELECT s.subject_key FROM customer_subjects s
             WHERE s.customer_id = c.id AND s.deleted_at IS NULL) AS subjects
FROM entitlements e
JOIN features f ON f.id = e.feature_id
JOIN meters m ON m.id = f.meter_id
JOIN customers c ON c.id = e.customer_id
WHERE e.namespace = $1 AND e.type = 'metered' AND e.deleted_at IS NULL
  AND (e.active_to IS NULL OR e.active_to > now()) AND m.event_type = ANY($2::text[])
  AND (c.key = ANY($3::text[]) OR EXISTS (
      SELECT 1 FROM customer_subjects s
      WHERE s.customer_id = c.id AND s.deleted_at IS NULL AND s.subject_key = ANY($3::text[])))
"""

_ALL = """
SELECT id FROM entitlements
WHERE type = 'metered' AND deleted_at IS NULL AND (active_to IS NULL OR active_to > now())
"""


class QuotaWorker:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.pool: asyncpg.Pool = runtime.pool
        self.valkey: Any = runtime.valkey
        # Values go to Valkey; otherwise they are only computed for the listeners.
        self.store = runtime.valkey is not None and runtime.settings.quota.enabled
        self.due: dict[str, int] = {}  # entitlement id -> validUntil (ms), when not storing
        self.prefix = runtime.settings.valkey.key_prefix
        self.grace: timedelta = runtime.settings.valkey.settle_after
        self.concurrency = runtime.settings.quota.concurrency
        self.rebuild_interval = runtime.settings.quota.rebuild_interval.total_seconds()
        self.commits: list[Committed] = []
        self.dirty: set[str] = set()
        self.customers: set[str] = set()
        self.seq = 0  # the highest sink sequence reported so far
        self.rounds = 0  # completed rounds, for tests and the bench
        self.namespaces: dict[str, str] = {}
        self.any_metered = True  # until the first rebuild says otherwise
        self.resets: dict[str, list[str]] = {}  # entitlement id -> ids of explicit resets not yet reported
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        # Called with each fresh value and the explicit resets behind it (the notify room's
        # rules); a failing listener is logged and does not stop the round.
        self.listeners: list[Callable[[balances.Computed, list[str]], Awaitable[None]]] = []
        # Whether a listener wants values now (cheap, no I/O); only asked when not storing.
        self.interested: list[Callable[[], bool]] = []

    def wanted(self) -> bool:
        return self.store or any(ask() for ask in self.interested)

    # -- what makes entitlements dirty ------------------------------------------------

    def on_commit(self, committed: Committed) -> None:
        self.commits.append(committed)
        self.seq = max(self.seq, committed.seq)
        self.wake.set()

    def on_notice(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        kind, _, ident = payload.partition(":")
        self.any_metered = True
        if kind == "reset":
            ident, _, reset_id = ident.partition(":")
            self.resets.setdefault(ident, []).append(reset_id)
        (self.customers if kind == "customer" else self.dirty).add(ident)
        self.wake.set()

    def mark(self, ids: list[str]) -> None:
        self.dirty.update(ids)
        self.idle.clear()
        self.wake.set()

    async def everything(self) -> None:
        async with self.pool.acquire() as conn:
            ids = [row["id"] for row in await conn.fetch(_ALL)]
        # No metered entitlement at all (a deployment that only meters): commits need no lookup.
        self.any_metered = bool(ids) or bool(self.dirty)
        self.mark(ids)

    # -- rounds ---------------------------------------------------------------------

    async def _resolve(self, conn: asyncpg.Connection, commits: list[Committed], customers: set[str],
                       release: dict[str, set[str]]) -> set[str]:
        """The entitlements ``commits`` and ``customers`` concern; adds to ``release`` the
        committed event ids each of them counts (to drop gateways' reservations of them)."""
        ids: set[str] = set()
        by_namespace: dict[str, tuple[set[str], set[str]]] = {}
        events: dict[tuple[str, str, str], list[str]] = {}
        for committed in commits:
            for touched in committed.touched:
                namespace, event_type, subject = touched
                types, subjects = by_namespace.setdefault(namespace, (set(), set()))
                types.add(event_type)
                subjects.add(subject)
                events.setdefault(touched, []).extend(committed.ids.get(touched, ()))
        for namespace, (types, subjects) in by_namespace.items():
            rows = await conn.fetch(_MATCHING, namespace, sorted(types), sorted(subjects))
            for row in rows:
                ids.add(row["id"])
                for subject in {row["key"], *row["subjects"]} - {None}:
                    counted = events.get((namespace, row["event_type"], subject))
                    if counted:
                        release.setdefault(row["id"], set()).update(counted)
        if customers:
            rows = await conn.fetch("SELECT id FROM entitlements WHERE customer_id = ANY($1::text[])", sorted(customers))
            ids.update(row["id"] for row in rows)
        return ids

    async def round(self) -> int:
        """Recompute everything dirty now; returns how many values were written."""
        commits, self.commits = self.commits, []
        customers, self.customers = self.customers, set()
        dirty, self.dirty = self.dirty, set()
        resets, self.resets = self.resets, {}
        seq = self.seq
        release: dict[str, set[str]] = {}
        try:
            if not self.any_metered or not self.wanted():
                commits, customers, dirty = [], set(), set()
            if commits or customers:
                async with self.pool.acquire() as conn:
                    dirty |= await self._resolve(conn, commits, customers, release)
            written = 0
            semaphore = asyncio.Semaphore(self.concurrency)

            async def one(entitlement_id: str) -> None:
                nonlocal written
                async with semaphore:
                    written += await self.refresh(entitlement_id, seq, resets.get(entitlement_id, []),
                                                  release.get(entitlement_id, ()))

            await asyncio.gather(*(one(i) for i in sorted(dirty)))
        except BaseException:
            # Nothing is lost: what this round held is dirty again.
            self.commits[:0] = commits
            self.customers |= customers
            self.dirty |= dirty
            for entitlement_id, ids in resets.items():
                self.resets.setdefault(entitlement_id, [])[:0] = ids
            raise
        self.rounds += 1
        return written

    async def refresh(self, entitlement_id: str, seq: int | None = None, resets: list[str] | None = None,
                      release: Iterable[str] = ()) -> int:
        """Recompute one value and write it; ``release``: ids of events committed before this
        computation started (so it counts them), whose reservations it drops."""
        namespace = await self._namespace(entitlement_id)
        if namespace is None:
            return 0
        computed = await balances.compute(self.pool, self.prefix, namespace, entitlement_id,
                                          seq=self.seq if seq is None else seq, grace=self.grace)
        if computed is None:
            return 0
        if self.store:
            written = int(await balances.write(self.valkey, self.prefix, computed, release))
        else:
            written = 0
            if computed.fields is None:
                self.due.pop(entitlement_id, None)
            else:
                self.due[entitlement_id] = computed.valid_until
        for listener in self.listeners:
            try:
                await listener(computed, resets or [])
            except Exception:
                log.exception("a quota listener failed", extra={"entitlement": entitlement_id})
        return written

    async def _namespace(self, entitlement_id: str) -> str | None:
        """An entitlement's namespace never changes: looked up once per process."""
        found = self.namespaces.get(entitlement_id)
        if found is None:
            async with self.pool.acquire() as conn:
                found = await conn.fetchval("SELECT namespace FROM entitlements WHERE id = $1", entitlement_id)
            if found is not None and len(self.namespaces) < 1_000_000:
                self.namespaces[entitlement_id] = found
        return found

    async def run(self) -> None:
        delay = 0.2
        while True:
            if not (self.commits or self.dirty or self.customers):
                self.idle.set()
                self.wake.clear()
                await self.wake.wait()
            self.idle.clear()
            try:
                await self.round()
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("quota round failed; will retry", extra={"error": describe(exc), "retry_in": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    # -- background -------------------------------------------------------------------

    async def listen(self) -> None:
        """LISTEN for the triggers' notices; after every (re)connect, rebuild everything,
        since notices sent while not listening are gone."""
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.runtime.settings.postgres.url, timeout=5)
                await conn.add_listener(CHANNEL, self.on_notice)
                await self.everything()
                while not conn.is_closed():
                    await asyncio.sleep(1.0)
                    await conn.fetchval("SELECT 1", timeout=5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("quota: listening for changes failed; reconnecting", extra={"error": describe(exc)})
            finally:
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(1.0)

    async def background(self) -> None:
        """Due values, a lost Valkey and the periodic rebuild."""
        if not self.store:
            await self._background_unstored()
            return
        # The heartbeat (which makes the api trust the hashes) starts once every value has been
        # rebuilt: hashes left from before this process may predate grants or resets.
        while True:
            try:
                await self.everything()
                break
            except Exception as exc:
                log.warning("quota: initial rebuild failed; retrying", extra={"error": describe(exc)})
                await asyncio.sleep(DUE_INTERVAL)
        await self.idle.wait()
        last_rebuild = time.monotonic()
        while True:
            try:
                now_ms = int(time.time() * 1000)
                await self.valkey.set(layout.worker_key(self.prefix), str(now_ms), px=layout.HEARTBEAT_MS)
                if not self.any_metered:
                    async with self.pool.acquire() as conn:
                        self.any_metered = bool(await conn.fetchval(
                            "SELECT EXISTS (SELECT 1 FROM entitlements WHERE type = 'metered' AND deleted_at IS NULL)"))
                due = await self.valkey.zrangebyscore(layout.due_key(self.prefix), "-inf", now_ms)
                if due:
                    self.mark([d.decode() if isinstance(d, bytes) else d for d in due])
                if not await self.valkey.exists(layout.alive_key(self.prefix)) or \
                        time.monotonic() - last_rebuild >= self.rebuild_interval:
                    last_rebuild = time.monotonic()
                    await self.everything()
                    await self.valkey.set(layout.alive_key(self.prefix), str(now_ms))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("quota background check failed", extra={"error": describe(exc)})
            await asyncio.sleep(DUE_INTERVAL)


    async def _background_unstored(self) -> None:
        """Without Valkey: due values from memory; everything when a listener becomes
        interested (values it missed meanwhile) and every rebuild interval."""
        was_wanted, last_rebuild = False, time.monotonic()
        while True:
            try:
                wanted = self.wanted()
                if wanted and (not was_wanted or time.monotonic() - last_rebuild >= self.rebuild_interval):
                    last_rebuild = time.monotonic()
                    await self.everything()
                was_wanted = wanted
                now_ms = int(time.time() * 1000)
                due = [i for i, valid_until in self.due.items() if valid_until <= now_ms]
                if due and wanted:
                    for entitlement_id in due:
                        del self.due[entitlement_id]
                    self.mark(due)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("quota background check failed", extra={"error": describe(exc)})
            await asyncio.sleep(DUE_INTERVAL)


async def start(runtime: Runtime) -> QuotaWorker:
    """Started by the sink role: it stores values in Valkey when configured, and feeds the
    listeners (notifications) in any case."""
    worker = QuotaWorker(runtime)
    runtime.quota = worker
    runtime.post_commit.append(worker.on_commit)
    runtime.spawn("quota-worker", worker.run())
    runtime.spawn("quota-listen", worker.listen())
    runtime.spawn("quota-background", worker.background())
    return worker
