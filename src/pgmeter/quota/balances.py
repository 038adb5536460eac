"""Exact quota values from Postgres, written to Valkey (layout: :mod:`pgmeter.quota.layout`).

Every value written is a full computation by the entitlements engine
(:mod:`pgmeter.entitlements.balance`) in one REPEATABLE READ snapshot, never an
increment of the stored one. That is the decision that makes the Valkey copy exact
under faults: burn-down across prioritised, expiring, rolling-over grants is not a
running sum, a redelivered sink batch or a replayed notice recomputes the same
value, and a lost Valkey is refilled with the same numbers. The engine's balance
snapshots keep each computation to the current period's phases, so it costs a few
small queries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from pgmeter.entitlements import balance, store
from pgmeter.entitlements.periods import ceil_minute, floor_minute
from pgmeter.quota import layout

MINUTE_MS = 60_000


@dataclass
class Computed:
    """One entitlement's value and where it goes."""

    entitlement_id: str
    keys: list[str]
    fields: dict[str, str] | None  # None: the entitlement has no value any more (deleted, not metered)
    as_of: datetime
    valid_until: int  # epoch ms, 0 when deleting
    value: balance.Value | None = None
    ctx: balance.Context | None = None


def next_boundary(ctx: balance.Context, at: datetime, period_end: datetime,
                  future_event: datetime | None = None) -> datetime:
    """The earliest instant after ``at`` at which the value changes without a new event.

    ``future_event``: the earliest committed event of the customer timed at or after ``at``
    (a clock ahead, or a scheduled usage): it is counted from the minute after its own.
    """
    found = [period_end]
    if future_event is not None:
        found.append(floor_minute(future_event) + timedelta(minutes=1))
    for grant in ctx.engine_grants:
        end = grant.end
        for t in (grant.effective_at, end):
            if t is not None and t > at:
                found.append(t)
        if grant.recurrence is not None and (end is None or end > at):
            found.append(grant.recurrence.next_after(max(at, grant.effective_at)))
    ent = ctx.entitlement
    if ent.active_to is not None and ent.active_to > at:
        found.append(ent.active_to)
    return min(found)


def fields_of(ctx: balance.Context, value: balance.Value, as_of: datetime, seq: int,
              future_event: datetime | None = None) -> tuple[dict[str, str], int]:
    period_start, period_end = value.period
    # The value read at instant t is the value at ceil_minute(t): it stays this one while
    # ceil_minute(t) < the next boundary, i.e. up to a minute before it.
    valid_until = layout.millis(next_boundary(ctx, value.at, period_end, future_event)) - MINUTE_MS
    ent = ctx.entitlement
    return {
        "v": layout.VERSION, "entitlementId": ent.id, "hasAccess": "1" if value.has_access else "0",
        "balance": str(value.balance), "usage": str(value.usage), "overage": str(value.overage),
        "totalAvailable": str(value.total_available), "softLimit": "1" if ent.is_soft_limit else "0",
        "grantBalances": json.dumps({k: str(v) for k, v in sorted(value.grant_balances.items())}),
        "periodStart": str(layout.millis(period_start)), "periodEnd": str(layout.millis(period_end)),
        "validUntil": str(valid_until), "asOf": str(layout.micros(as_of)), "seq": str(seq),
        "updatedAt": str(layout.millis(datetime.now(UTC))),
    }, valid_until


def keys_of(prefix: str, customer: store.Customer, feature_key: str) -> list[str]:
    """Every hash of one value. The first (the customer id's, which never changes) is the one
    the write script compares ``asOf`` with."""
    # The customer under its id and, when it has one, its key (a v2 value request names
    # it either way), then under each of its usage keys (the event subjects).
    idents = [customer.id] + ([customer.key] if customer.key and customer.key != customer.id else [])
    keys = [layout.customer_key(prefix, customer.namespace, ident, feature_key) for ident in idents]
    keys.extend(layout.subject_key(prefix, customer.namespace, subject, feature_key) for subject in customer.usage_keys)
    return keys


async def compute(pool: asyncpg.Pool, prefix: str, namespace: str, entitlement_id: str, *, seq: int,
                  grace: timedelta) -> Computed | None:
    """The entitlement's value now, or a deletion of its keys; ``None`` if it never existed."""
    async with pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read"):
            await conn.execute("SET LOCAL jit = off")
            now: datetime = await conn.fetchval("SELECT now()")
            ent = await store.entitlement_by_id(conn, namespace, entitlement_id)
            if ent is None:
                return None
            customer = await store.customer_by_id(conn, namespace, ent.customer_id)
            assert customer is not None
            keys = keys_of(prefix, customer, ent.feature_key)
            at = ceil_minute(now)
            if ent.type != "metered" or not ent.active_at(now) or customer.deleted_at is not None:
                return Computed(ent.id, keys, None, now, 0)
            # The context statement carries the fingerprint, the snapshots at ``at`` and the
            # meter's source too: this transaction is one REPEATABLE READ snapshot.
            ctx = await balance.load_context(conn, ent, at=at)
            state, pending = await balance.compute(conn, ctx, at, now=now, grace=grace)
            future_event = await conn.fetchval(
                "SELECT min(time) FROM events WHERE namespace = $1 AND type = $2 AND time >= $3 "
                "AND subject = ANY($4::text[])", namespace, ctx.meter.event_type, at, ctx.customer.usage_keys)
    # The snapshot bookkeeping of a value read (the engine's own, same lock and checks).
    await balance._write_back(pool, ent, pending, ctx.fingerprint)
    value = balance.value_of(ctx, state, at)
    fields, valid_until = fields_of(ctx, value, now, seq, future_event)
    return Computed(ent.id, keys, fields, now, valid_until, value, ctx)


async def write(valkey: Any, prefix: str, computed: Computed, release: Iterable[str] = ()) -> bool:
    """Store ``computed`` in each of its hashes unless that hash holds a newer value (the
    check is in the script), and drop the reservations of ``release``: ids of events the
    snapshot of ``computed`` counts. Returns whether the first hash took it.

    One script per key, pipelined: no command touches two keys, so this works on a
    Valkey cluster as on one server. The alias set and the due set are bookkeeping for
    the worker, written after the hashes.
    """
    entitlement_id = computed.entitlement_id
    aliases = layout.aliases_key(prefix, entitlement_id)
    before = {k.decode() if isinstance(k, bytes) else k for k in await valkey.smembers(aliases)}
    stale = sorted(before - set(computed.keys))
    as_of = str(layout.micros(computed.as_of))
    ids = sorted(release)
    fields: list[str] = []
    for name, value in (computed.fields or {}).items():
        fields.extend((name, value))
    async with valkey.pipeline(transaction=False) as pipe:
        for key in computed.keys:
            pipe.eval(layout.WRITE_SCRIPT, 1, key, as_of, str(len(ids)), *ids, *fields)
        for key in stale:
            pipe.eval(layout.WRITE_SCRIPT, 1, key, as_of, "0")
        if computed.fields is not None:
            pipe.sadd(aliases, *computed.keys)
            if stale:
                pipe.srem(aliases, *stale)
            pipe.zadd(layout.due_key(prefix), {entitlement_id: computed.valid_until})
        else:
            pipe.delete(aliases)
            pipe.zrem(layout.due_key(prefix), entitlement_id)
        results = await pipe.execute()
    return bool(results[0])
