"""``pgmeter sink``: JetStream -> Postgres, exactly once.

Two loops share a bounded in-memory queue, so reading and parsing the next
messages overlaps with the current Postgres transaction:

- the *fetcher* pulls from the durable consumer, decodes each message into event
  records and dead letters (:mod:`pgmeter.ingest.wire`) and queues it;
- a *writer* takes everything queued, up to ``sink.maxEventsPerTx`` events, makes
  sure the partitions exist, writes it in one transaction (:mod:`.store`) and then
  acks each message explicitly. Never AckAll: with several sinks on one durable
  consumer it would ack messages another sink has not committed.

Two writers, each with its own connection, take turns: while Postgres works on one
batch, the other is encoded and sent, so the sink's Python and Postgres run on
different cores instead of waiting for each other. A batch that shares an event key
with an earlier batch still being written waits for it, so within a sink the first
copy by stream order always wins, as with a single writer.

Failures: Postgres unavailable -> the same batch is retried with capped backoff
(connection and server errors only); a batch Postgres rejects for its content
(SQLSTATE classes 22, 23, 54, or an encoding error) -> split in halves until the
offending events are alone, and those are dead-lettered with the reason while the
rest commits, so nothing blocks the stream; NATS restarting -> nats-py reconnects,
the fetcher rebinds and, if the broker lost the stream or consumer, recreates them.

Every message the sink holds (queued or being written) is kept alive with an
in-progress ack every third of ``nats.ackWait``, so a short ackWait (5 s by default)
redelivers only the messages of a sink that died: failover takes seconds, never
the time a slow transaction takes.

What the sink stores is judged again here, whoever published it: the subject must
name a valid namespace, the message's ``at`` must be close to when the broker stored
it, and every event must meet :mod:`pgmeter.ingest.limits` (field byte lengths, time
window around ``at``); anything else is dead-lettered with the reason the api would
have given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from pgmeter.config import Settings
from pgmeter.ingest import metrics, stream, wire
from pgmeter.ingest.cloudevents import EventTuple
from pgmeter.ingest.limits import EventLimits
from pgmeter.metric_labels import tenant
from pgmeter.runtime import Committed, Runtime
from pgmeter.sink import partitions, store
from pgmeter.sink.store import DeadLetter, Outcome

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 2.0
# How long the writer lets a transaction gather messages before committing it: a
# few milliseconds of latency that save a transaction (and a WAL flush) per message
# when events trickle in. A batch that is already old enough, or full, goes at once.
GATHER_SECONDS = 0.02
FETCH_PAUSE = GATHER_SECONDS / 2
MAINTENANCE_INTERVAL = 600.0
GAUGE_INTERVAL = 5.0
MAX_BACKOFF = 5.0
CONNECT_TIMEOUT = 5.0
# No statement of the sink should take this long; one that does is treated like a
# lost connection (dropped, retried), so a black-holed Postgres cannot hang the sink.
COMMAND_TIMEOUT = 120.0
WRITERS = 2
# How far a message's "at" (the api's clock when it accepted the events) may be from
# the moment the broker stored the message (the broker's clock): clock skew between
# hosts plus the publish itself. A message further off did not come from our api, and
# its events' times could not be judged against it.
MAX_AT_SKEW_MICROS = 3_600_000_000


@dataclass
class Pending:
    """One fetched message, decoded, waiting to be written and acked."""

    msg: Msg
    seq: int
    subject: str
    stored_at: float  # when JetStream stored (and so acked) it, epoch seconds
    keys: list[str] = field(default_factory=list)
    records: list[store.EventRecord] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)  # position of each record's event in the message
    dead: list[DeadLetter] = field(default_factory=list)
    days: set[int] = field(default_factory=set)
    received: float = field(default_factory=time.monotonic)

    @property
    def weight(self) -> int:
        return max(1, len(self.records) + len(self.dead))


def parse(msg: Msg, settings: Settings, limits: EventLimits) -> Pending:
    """Decode a message into records to store and dead letters, never raising."""
    meta = msg.metadata
    seq = meta.sequence.stream
    subject = msg.subject
    pending = Pending(msg, seq, subject, meta.timestamp.timestamp())
    dead = pending.dead
    namespace = stream.namespace_of_subject(settings.nats, subject)
    if namespace is None:
        dead.append(DeadLetter(seq, -1, subject, f"subject {subject!r} does not name a valid namespace", msg.data))
        return pending
    try:
        ingested_at, events = wire.decode_envelope(msg.data)
    except wire.BadMessage as exc:
        dead.append(DeadLetter(seq, -1, subject, str(exc), msg.data))
        return pending
    if abs(ingested_at - int(pending.stored_at * 1_000_000)) > MAX_AT_SKEW_MICROS:
        dead.append(DeadLetter(seq, -1, subject, 'message time "at" is more than an hour away from when the '
                                                 "broker stored the message", msg.data))
        return pending
    keys, records, indexes, days = pending.keys, pending.records, pending.indexes, pending.days
    quick_check = wire.quick_check
    day_micros = partitions.DAY_MICROS
    for index, event in enumerate(events):
        reason = quick_check(event)
        if reason is None:
            event_id, source, event_type, event_subject, micros, data = event
            reason = _beyond_limits(limits, event, ingested_at)
            if reason is None:
                try:
                    key = store.dedup_key(namespace, source, event_id)
                except UnicodeEncodeError:
                    reason = "id or source contains an unpaired UTF-16 surrogate"
                else:
                    keys.append(key)
                    records.append((namespace, event_id, source, event_type, event_subject, micros, data,
                                    ingested_at, seq))
                    indexes.append(index)
                    days.add(micros // day_micros)
                    continue
        dead.append(DeadLetter(seq, index, subject, reason, wire.item_payload(event)))
    return pending


def _beyond_limits(limits: EventLimits, event: list[Any], accepted_at: int) -> str | None:
    """The limit a structurally sound event breaks, worded as the api words it, or ``None``."""
    for name, value in zip(("id", "source", "type", "subject"), event, strict=False):
        problem = limits.check_text(name, value)
        if problem is not None:
            return f"{name} {problem}"
    problem = limits.check_time(event[4], accepted_at)
    return None if problem is None else f"time {problem}"


@dataclass(eq=False)
class _Slot:
    """One writer's connection (created on first use, dropped on error)."""

    conn: asyncpg.Connection | None = None


@dataclass(eq=False)
class _InFlight:
    """A batch a writer is working on, for the stream-order check of the other writer."""

    batch: list[Pending]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _keys: set[str] | None = None

    @property
    def keys(self) -> set[str]:
        if self._keys is None:  # built only when another batch needs the comparison
            self._keys = {key for pending in self.batch for key in pending.keys}
        return self._keys


class Sink:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.max_events = self.settings.sink.max_events_per_tx
        self.queue: deque[Pending] = deque()
        self.buffered = 0
        self._has_data = asyncio.Event()
        self._has_space = asyncio.Event()
        self._has_space.set()
        self.slots = [_Slot() for _ in range(WRITERS)]
        self._writing: list[_InFlight] = []
        self.partitions = partitions.PartitionMap()
        self._events_per_message = 100.0  # running average, sizes the next fetch
        self._subscription: Any = None
        self.limits = EventLimits.of(self.settings)
        # Events older than this at commit bump the query cache's epoch (query/cache.py).
        self.late_margin = self.settings.valkey.late_margin

    # -- fetching -------------------------------------------------------------------

    def _fetch_size(self) -> int:
        room = max(1, self.max_events - self.buffered)
        return max(1, min(self.settings.sink.fetch_batch, int(room / max(1.0, self._events_per_message)) + 1))

    async def fetch_loop(self) -> None:
        try:
            await self._fetch_forever()
        finally:
            # Unsubscribe before the runtime drains the connection: a pull subscription
            # with undelivered messages would otherwise hold the drain until it times out.
            # Those messages are unacked, so JetStream redelivers them later.
            await self._drop_subscription(self._subscription)
            self._subscription = None

    async def _fetch_forever(self) -> None:
        js, nats_cfg = self.runtime.js, self.settings.nats
        delay = 0.1
        while True:
            await self._has_space.wait()
            try:
                if self._subscription is None:
                    self._subscription = await js.pull_subscribe_bind(durable=nats_cfg.consumer,
                                                                      stream=nats_cfg.stream)
                wanted = self._fetch_size()
                messages = await self._subscription.fetch(wanted, timeout=FETCH_TIMEOUT)
                delay = 0.1
            except TimeoutError:
                # Nothing to do (or the broker is reconnecting): waiting, not failing, so
                # no warning and no backoff. nats-py raises its own TimeoutError (an
                # asyncio.TimeoutError) or, when the server's 408 lands just before the
                # client's deadline, a bare asyncio.TimeoutError; both are TimeoutError.
                continue
            except asyncio.CancelledError:
                raise
            except (nats.js.errors.APIError, nats.errors.NoRespondersError) as exc:
                # The consumer (or the stream) is gone: a broker that lost its store.
                log.warning("sink consumer unavailable; recreating", extra={"error": repr(exc)})
                await self._drop_subscription(self._subscription)
                self._subscription = None
                try:
                    await stream.ensure_stream(self.runtime)
                except Exception as again:
                    log.warning("could not recreate the stream", extra={"error": repr(again)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            except Exception as exc:
                log.warning("sink fetch failed; retrying", extra={"error": repr(exc)})
                if isinstance(exc, nats.errors.ConnectionClosedError):
                    self._subscription = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            for message in messages:
                pending = parse(message, self.settings, self.limits)
                self.queue.append(pending)
                self.buffered += pending.weight
                self._events_per_message = 0.9 * self._events_per_message + 0.1 * pending.weight
            if messages:
                self._has_data.set()
            if self.buffered >= self.max_events:
                self._has_space.clear()
            elif len(messages) < wanted:
                # The stream is drained: let more gather before asking again. The writer
                # waits this long for company anyway, and each pull is broker work.
                await asyncio.sleep(FETCH_PAUSE)

    @staticmethod
    async def _drop_subscription(subscription: object) -> None:
        if subscription is not None:
            try:
                await subscription.unsubscribe()  # type: ignore[attr-defined]
            except Exception:
                pass
        return None

    async def _take(self) -> list[Pending]:
        while not self.queue:
            self._has_data.clear()
            await self._has_data.wait()
        wait = self.queue[0].received + GATHER_SECONDS - time.monotonic()
        if wait > 0 and self.buffered < self.max_events:
            await asyncio.sleep(wait)
        batch: list[Pending] = []
        events = 0
        while self.queue and (not batch or events + self.queue[0].weight <= self.max_events):
            pending = self.queue.popleft()
            batch.append(pending)
            events += pending.weight
        self.buffered -= events
        if self.buffered < self.max_events:
            self._has_space.set()
        return batch

    # -- writing --------------------------------------------------------------------

    async def _connection(self, slot: _Slot) -> asyncpg.Connection:
        if slot.conn is None or slot.conn.is_closed():
            slot.conn = await asyncpg.connect(
                self.settings.postgres.url, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT,
                server_settings={"application_name": "pgmeter-sink"})
            await store.prepare(slot.conn)
            await self.partitions.refresh(slot.conn)
        return slot.conn

    @staticmethod
    async def _drop_connection(slot: _Slot) -> None:
        if slot.conn is not None:
            conn, slot.conn = slot.conn, None
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:
                conn.terminate()

    async def write_loop(self, slot: _Slot) -> None:
        while True:
            batch = await self._take()
            # Registered before any await: the order of _writing is the stream order.
            mine = _InFlight(batch)
            earlier = list(self._writing)
            self._writing.append(mine)
            try:
                for other in earlier:
                    if not other.done.is_set() and not mine.keys.isdisjoint(other.keys):
                        await other.done.wait()  # the earlier copy of an event must win
                outcome = await self._commit(slot, batch)
            finally:
                mine.done.set()
                self._writing.remove(mine)
            committed = time.time()
            if self.runtime.post_commit:
                self._tell(batch)
            for pending in batch:
                metrics.ACK_TO_COMMIT.observe(max(0.0, committed - pending.stored_at))
                try:
                    await pending.msg.ack()
                except Exception as exc:  # the broker will redeliver; dedup makes that harmless
                    log.debug("ack failed", extra={"error": repr(exc)})
            for namespace, count in outcome.stored.items():
                metrics.EVENTS_PROCESSED.labels(tenant(namespace)).inc(count)
            for namespace, count in outcome.duplicates.items():
                metrics.EVENTS_DUPLICATE.labels(tenant(namespace)).inc(count)
            if outcome.dead_letters:
                metrics.DEAD_LETTERS.inc(outcome.dead_letters)
                log.warning("dead-lettered events", extra={"count": outcome.dead_letters})
            metrics.SINK_BATCH_EVENTS.observe(sum(len(p.records) for p in batch))

    def _tell(self, batch: list[Pending]) -> None:
        """Report the commit to the runtime's post-commit listeners; never fails the batch."""
        ids: dict[tuple[str, str, str], list[str]] = {}
        for pending in batch:
            for r in pending.records:
                ids.setdefault((r[0], r[3], r[4]), []).append(r[1])
        if not ids:
            return
        info = Committed(max(pending.seq for pending in batch), frozenset(ids), ids)
        for listener in self.runtime.post_commit:
            try:
                listener(info)
            except Exception:
                log.exception("a post-commit listener failed")

    async def _commit(self, slot: _Slot, batch: list[Pending]) -> Outcome:
        """Write ``batch`` until it is committed; only cancellation stops the retries."""
        delay = 0.2
        if len(batch) == 1:
            keys, records, dead, days = batch[0].keys, batch[0].records, batch[0].dead, batch[0].days
        else:
            keys = [key for pending in batch for key in pending.keys]
            records = [record for pending in batch for record in pending.records]
            dead = [letter for pending in batch for letter in pending.dead]
            days = set().union(*(pending.days for pending in batch))
        refreshed = False
        while True:
            try:
                conn = await self._connection(slot)
                await self.partitions.ensure(conn, days)
                try:
                    return await self._write(conn, keys, records, dead)
                except Exception as exc:
                    if store.is_missing_partition(exc) and not refreshed:
                        # The cached map was wrong (a partition dropped behind our back):
                        # re-read it and retry at once; a second miss backs off like any error.
                        await self.partitions.refresh(conn)
                        refreshed = True
                        continue
                    if not store.is_poison(exc):
                        raise
                    log.warning("Postgres rejected a batch; isolating the bad events", extra={"error": str(exc)})
                return await self._isolate(conn, batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sink write failed; will retry", extra={"error": f"{type(exc).__name__}: {exc}",
                                                                     "retry_in": delay})
                await self._drop_connection(slot)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    async def _write(self, conn: asyncpg.Connection, keys: list[str], records: list[store.EventRecord],
                     dead: list[DeadLetter]) -> Outcome:
        return await store.write(conn, keys, records, dead, late_margin=self.late_margin)

    async def _isolate(self, conn: asyncpg.Connection, batch: list[Pending]) -> Outcome:
        """Write what Postgres accepts and dead-letter the events it refuses for their content.

        Message by message; a message that fails is checked event by event the slow way
        (:func:`wire.strict_check`), then halved until each refused event is alone. A
        message with k bad events of n costs about k * log2(n) small transactions, so
        one bad event never holds its neighbours (or other tenants) back for long.
        Stream order is kept: the left half always commits before the right.
        """
        total = Outcome()
        for pending in batch:
            try:
                total.add(await self._write(conn, pending.keys, pending.records, pending.dead))
                continue
            except Exception as exc:
                if not store.is_poison(exc):
                    raise
            dead = list(pending.dead)
            good: list[tuple[str, store.EventRecord, int]] = []
            for key, record, index in zip(pending.keys, pending.records, pending.indexes, strict=True):
                event = _event_of(record)
                reason = wire.strict_check(event)
                if reason is None:
                    good.append((key, record, index))
                else:
                    dead.append(DeadLetter(pending.seq, index, pending.subject, reason,
                                           wire.item_payload(list(event))))
            if len(good) == len(pending.records) and len(good) > 1:
                # Nothing found the slow way: the whole message just failed, go straight to halves.
                middle = len(good) // 2
                await self._bisect(conn, pending, good[:middle], dead, total)
                await self._bisect(conn, pending, good[middle:], dead, total)
            else:
                await self._bisect(conn, pending, good, dead, total)
            total.add(await self._write(conn, [], [], dead))
        return total

    async def _bisect(self, conn: asyncpg.Connection, pending: Pending,
                      items: list[tuple[str, store.EventRecord, int]], dead: list[DeadLetter],
                      total: Outcome) -> None:
        if not items:
            return
        try:
            total.add(await self._write(conn, [item[0] for item in items], [item[1] for item in items], []))
            return
        except Exception as exc:
            if not store.is_poison(exc):
                raise
            if len(items) == 1:
                _, record, index = items[0]
                log.warning("dead-lettering an event PostgreSQL refused",
                            extra={"stream_seq": pending.seq, "item": index, "error": str(exc)})
                dead.append(DeadLetter(pending.seq, index, pending.subject, f"PostgreSQL rejected the event: {exc}",
                                       wire.item_payload(list(_event_of(record)))))
                return
        middle = len(items) // 2
        await self._bisect(conn, pending, items[:middle], dead, total)
        await self._bisect(conn, pending, items[middle:], dead, total)

    async def keepalive_loop(self) -> None:
        """Every third of ``nats.ackWait``, tell JetStream that each held message is being worked on.

        Held: queued or in a writer's transaction, including one retried while Postgres
        is away. A live sink thus never has its messages redelivered, however slow its
        transactions, while a dead one's come back after at most ``ackWait``.
        """
        interval = self.settings.nats.ack_wait.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            held = [pending for flight in self._writing for pending in flight.batch]
            held.extend(self.queue)
            for pending in held:
                try:
                    await pending.msg.in_progress()
                except Exception:
                    pass  # acked meanwhile, or NATS is away (a redelivery is deduplicated)

    # -- housekeeping ---------------------------------------------------------------

    async def maintenance_loop(self) -> None:
        sink = self.settings.sink
        while True:
            try:
                async with self.runtime.pool.acquire() as conn:
                    dropped = await partitions.maintain(
                        conn, days_ahead=sink.partition_days_ahead, retention_days=sink.retention_days,
                        partitions=self.partitions)
                if dropped:
                    log.info("retention dropped partitions", extra={"partitions": dropped})
                await asyncio.sleep(MAINTENANCE_INTERVAL)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("partition maintenance failed; will retry", extra={"error": repr(exc)})
                await asyncio.sleep(10)

    async def gauge_loop(self) -> None:
        nats_cfg = self.settings.nats
        while True:
            try:
                info = await self.runtime.js.consumer_info(nats_cfg.stream, nats_cfg.consumer)
                metrics.SINK_PENDING.set(info.num_pending or 0)
                metrics.SINK_ACK_PENDING.set(info.num_ack_pending or 0)
            except asyncio.CancelledError:
                raise
            except Exception:
                pass  # the gauge keeps its last value while the broker is away
            await asyncio.sleep(GAUGE_INTERVAL)



def _event_of(record: store.EventRecord) -> EventTuple:
    return (record[1], record[2], record[3], record[4], record[5], record[6])


async def _run_writer(sink: Sink, slot: _Slot) -> None:
    try:
        await sink.write_loop(slot)
    finally:
        await sink._drop_connection(slot)


async def start(runtime: Runtime) -> None:
    sink = Sink(runtime)
    runtime.sink = sink
    for number, slot in enumerate(sink.slots):
        runtime.spawn(f"sink-writer-{number}", _run_writer(sink, slot))
    runtime.spawn("sink-fetcher", sink.fetch_loop())
    runtime.spawn("sink-maintenance", sink.maintenance_loop())
    runtime.spawn("sink-gauge", sink.gauge_loop())
    runtime.spawn("sink-keepalive", sink.keepalive_loop())
