"""The rules of customers, features, entitlements and grants, as OpenMeter applies them.

Each write runs in one transaction. Writes that change what a balance depends on
(grants, voids, resets, a customer's subjects) take the entitlement's advisory
lock and drop the snapshots after their effective time in the same transaction,
so a value computed before them can never be saved after them
(:func:`pgmeter.entitlements.balance._write_back` takes the same lock).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from pgmeter.entitlements import store
from pgmeter.entitlements.balance import Timeline, load_context, lock_key, value_of
from pgmeter.entitlements.balance import compute as compute_state
from pgmeter.entitlements.periods import (
    IntervalError,
    Recurrence,
    ceil_minute,
    expiration,
    floor_minute,
    parse_interval,
)
from pgmeter.meters import store as meter_store
from pgmeter.meters.model import Aggregation
from pgmeter.meters.ulid import is_ulid

FEATURE_AGGREGATIONS = {Aggregation.SUM, Aggregation.COUNT, Aggregation.UNIQUE_COUNT, Aggregation.LATEST}
MAX_GRANTS_PER_ENTITLEMENT = 1000


class Refused(Exception):
    """A request OpenMeter refuses: ``status`` 400/403/404/409/412 and its message."""

    def __init__(self, status: int, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.extensions = extensions


async def _lock(conn: asyncpg.Connection, key: str) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", key)


# -- customers -------------------------------------------------------------------

async def ensure_subjects(conn: asyncpg.Connection, namespace: str, keys: list[str]) -> None:
    """Customer writes make sure a Subject exists for each subject key (OpenMeter's hook)."""
    from pgmeter.meters.ulid import new_ulid

    for key in keys:
        await conn.execute("INSERT INTO subjects (id, namespace, key) SELECT $1, $2, $3 WHERE NOT EXISTS "
                           "(SELECT 1 FROM subjects WHERE namespace = $2 AND key = $3 AND deleted_at IS NULL)",
                           new_ulid(), namespace, key)


async def create_customer(conn: asyncpg.Connection, namespace: str, fields: dict[str, Any],
                          subject_keys: list[str]) -> store.Customer:
    async with conn.transaction():
        await _lock(conn, f"pgmeter.customers:{namespace}")
        conflict = await store.customer_conflicts(conn, namespace, fields["key"], subject_keys, None)
        if conflict:
            raise Refused(409, conflict)
        customer = await store.insert_customer(conn, namespace, fields, subject_keys)
        await ensure_subjects(conn, namespace, subject_keys)
    return customer


async def update_customer(conn: asyncpg.Connection, customer: store.Customer, fields: dict[str, Any],
                          subject_keys: list[str]) -> store.Customer:
    async with conn.transaction():
        await _lock(conn, f"pgmeter.customers:{customer.namespace}")
        conflict = await store.customer_conflicts(conn, customer.namespace, fields["key"], subject_keys, customer.id)
        if conflict:
            raise Refused(409, conflict)
        before = customer.usage_keys
        updated = await store.update_customer(conn, customer, fields, subject_keys)
        await ensure_subjects(conn, customer.namespace, subject_keys)
        if updated.usage_keys != before:
            # Usage attribution changed: every balance of the customer is recomputed.
            _, ents = await store.list_entitlements(conn, customer.namespace, customer_ids=[customer.id],
                                                    include_deleted=True)
            for ent in ents:
                await _lock(conn, lock_key(ent.id))
            await store.invalidate_snapshots(conn, [e.id for e in ents], datetime(1, 1, 1, tzinfo=UTC))
    return updated


async def delete_customer(conn: asyncpg.Connection, customer: store.Customer) -> None:
    async with conn.transaction():
        now = datetime.now(UTC)
        _, active = await store.list_entitlements(conn, customer.namespace, customer_ids=[customer.id], active_at=now,
                                                  limit=1)
        if active:
            raise Refused(409, f"customer {customer.id} still has active entitlements, please remove them before "
                               "deleting the customer")
        await store.delete_customer(conn, customer)


# -- features --------------------------------------------------------------------

async def create_feature(conn: asyncpg.Connection, namespace: str, key: str, name: str, meter_slug: str | None,
                         filters: dict[str, str] | None, metadata: dict[str, str] | None) -> store.Feature:
    if is_ulid(key.upper()) and len(key) == 26:
        raise Refused(400, "Feature key cannot be a valid ULID")
    async with conn.transaction():
        await _lock(conn, f"pgmeter.features:{namespace}")
        meter_id = None
        if meter_slug is not None:
            meter = await meter_store.get_by_slug(conn, namespace, meter_slug)
            if meter is None:
                raise Refused(404, f"meter not found: {meter_slug}")
            if meter.aggregation not in FEATURE_AGGREGATIONS:
                raise Refused(400, f"meter {meter_slug}'s aggregation is {meter.aggregation} but features can only be "
                                   "created for SUM, COUNT, UNIQUE_COUNT and LATEST")
            for group_key in filters or {}:
                if group_key not in meter.group_by:
                    raise Refused(400, f"meter {meter_slug} does not have group by key {group_key}",
                                  field="meterGroupByFilters")
            meter_id = meter.id
        elif filters:
            raise Refused(400, "meterGroupByFilters requires meterSlug", field="meterGroupByFilters")
        existing = await conn.fetchval("SELECT id FROM features WHERE namespace = $1 AND key = $2 "
                                       "AND archived_at IS NULL", namespace, key)
        if existing:
            raise Refused(409, f"feature {existing} with key {key} already exists")
        return await store.insert_feature(conn, namespace, key, name, meter_slug, meter_id, filters, metadata)


async def archive_feature(conn: asyncpg.Connection, feature: store.Feature) -> None:
    await store.archive_feature(conn, feature)


async def meter_change_refusal(conn: asyncpg.Connection, meter_id: str,
                               new_group_by: dict[str, str] | None) -> str | None:
    """Why a meter deletion (``new_group_by`` None) or groupBy edit is refused while a
    feature relies on it, or None. A meter guard (``Runtime.meter_guards``): the api
    answers 409 with it."""
    if new_group_by is None:
        keys = await store.features_using_meter(conn, meter_id)
        return f"meter is used by features: {', '.join(keys)}; archive them first" if keys else None
    for group_key, feature_key in (await store.filter_keys_of_meter(conn, meter_id)).items():
        if group_key not in new_group_by:
            return f"group by key {group_key} is used by feature {feature_key}; it cannot be removed"
    return None


# -- entitlements ----------------------------------------------------------------

@dataclass
class EntitlementInput:
    type: str
    feature_id: str | None
    feature_key: str | None
    usage_interval: str | None = None
    usage_anchor: datetime | None = None
    measure_usage_from: datetime | str | None = None  # a time, CURRENT_PERIOD_START or NOW
    is_soft_limit: bool = False
    issue_after_reset: Decimal | None = None
    issue_after_reset_priority: int | None = None
    preserve_overage_at_reset: bool = False
    config: str | None = None
    metadata: dict[str, str] | None = None
    grants: list[GrantInput] | None = None


@dataclass
class GrantInput:
    amount: Decimal
    priority: int
    effective_at: datetime
    expiration_duration: str | None
    expiration_count: int | None
    min_rollover: Decimal
    max_rollover: Decimal
    recurrence_interval: str | None
    recurrence_anchor: datetime | None
    metadata: dict[str, str] | None


async def _feature_for(conn: asyncpg.Connection, namespace: str, data: EntitlementInput) -> store.Feature:
    feature = None
    if data.feature_id is not None:
        feature = await store.feature_by_id(conn, namespace, data.feature_id)
        ref = data.feature_id
    else:
        assert data.feature_key is not None
        feature = await store.live_feature(conn, namespace, data.feature_key)
        ref = data.feature_key
    if feature is None or feature.archived_at is not None:
        raise Refused(404, f"feature not found: {ref}")
    return feature


async def create_entitlement(conn: asyncpg.Connection, namespace: str, customer: store.Customer,
                             data: EntitlementInput, *, override: store.Entitlement | None = None) -> store.Entitlement:
    if customer.deleted_at is not None:
        raise Refused(412, f"customer {customer.id} is deleted")
    async with conn.transaction():
        feature = await _feature_for(conn, namespace, data)
        if override is not None and (feature.key != override.feature_key or customer.id != override.customer_id):
            raise Refused(400, "entitlements must belong to the same feature and customer")
        now = datetime.now(UTC)
        values: dict[str, Any] = {
            "namespace": namespace, "customer_id": customer.id, "feature_id": feature.id, "feature_key": feature.key,
            "type": data.type, "config": data.config, "metadata": data.metadata, "active_from": now,
        }
        if data.usage_interval is not None:
            try:
                interval = parse_interval(data.usage_interval)
            except IntervalError as exc:
                raise Refused(400, str(exc), field="usagePeriod.interval") from None
            if not interval.at_least_an_hour():
                raise Refused(400, "UsagePeriod must be at least 1 hour", field="usagePeriod.interval")
            values["usage_interval"] = data.usage_interval
            values["usage_anchor"] = floor_minute(data.usage_anchor or now)
        if data.type == "metered":
            if data.config is not None:
                raise Refused(400, "invalid entitlement value for type metered: Config is not allowed for metered "
                                   "entitlements")
            if data.usage_interval is None:
                raise Refused(400, "invalid entitlement value for type metered: UsagePeriod is required for metered "
                                   "entitlements")
            if feature.meter_id is None:
                raise Refused(400, f"invalid feature {feature.id}: Feature has no meter")
            if data.issue_after_reset_priority is not None and data.issue_after_reset is None:
                raise Refused(400, "invalid entitlement value for type metered: IssueAfterResetPriority requires "
                                   "IssueAfterReset")
            if data.grants and data.issue_after_reset is not None:
                raise Refused(400, "grants and issueAfterReset (issue) cannot be set at the same time")
            recurrence = Recurrence(values["usage_anchor"], parse_interval(data.usage_interval))
            if data.measure_usage_from in (None, "NOW"):
                measure_from = floor_minute(now)
            elif data.measure_usage_from == "CURRENT_PERIOD_START":
                measure_from = recurrence.prev_at_or_before(now)
            else:
                assert isinstance(data.measure_usage_from, datetime)
                measure_from = floor_minute(data.measure_usage_from)
            values.update(measure_usage_from=measure_from, is_soft_limit=data.is_soft_limit,
                          issue_after_reset=data.issue_after_reset,
                          issue_after_reset_priority=data.issue_after_reset_priority,
                          preserve_overage_at_reset=data.preserve_overage_at_reset)
        elif data.type == "static":
            if data.config is None:
                raise Refused(400, "config is required for static entitlements", field="config")
            try:
                json.loads(data.config)
            except ValueError:
                raise Refused(400, "invalid JSON config", field="config") from None
        await _lock(conn, f"pgmeter.entitlement-unique:{namespace}:{customer.id}:{feature.key}")
        if override is not None:
            await store.end_entitlement(conn, override, column="active_to", at=now)
        conflict = await store.scheduled_conflict(conn, namespace, customer.id, feature.key, now)
        if conflict:
            raise Refused(409, f"entitlement with id {conflict} already exists for feature {feature.id} and customer "
                               f"{customer.id}", conflictingEntityId=conflict)
        ent = await store.insert_entitlement(conn, values)
        if ent.type == "metered":
            if ent.issue_after_reset is not None and ent.issue_after_reset > 0:
                assert ent.measure_usage_from is not None
                amount = ent.issue_after_reset
                await store.insert_grant(conn, namespace, {
                    "entitlement_id": ent.id, "amount": amount, "priority": ent.issue_after_reset_priority or 1,
                    "effective_at": Timeline.of(ent, []).period_at(ent.measure_usage_from)[0],
                    "min_rollover": amount, "max_rollover": amount, "annotations": {"issueAfterReset": True}})
            for grant in data.grants or []:
                await _insert_grant(conn, ent, grant)
    return ent


async def delete_entitlement(conn: asyncpg.Connection, ent: store.Entitlement) -> None:
    await store.end_entitlement(conn, ent, column="deleted_at", at=datetime.now(UTC))


# -- grants, voids and resets ---------------------------------------------------

def _metered(ent: store.Entitlement) -> None:
    if ent.type != "metered":
        raise Refused(400, f"expected entitlement type metered but got {ent.type}")


async def _current_period_start(conn: asyncpg.Connection, ent: store.Entitlement, at: datetime) -> datetime:
    return Timeline.of(ent, await store.resets_of(conn, ent.id)).period_at(at)[0]


async def _insert_grant(conn: asyncpg.Connection, ent: store.Entitlement, g: GrantInput) -> store.GrantRow:
    effective_at = floor_minute(g.effective_at)
    count = await conn.fetchval("SELECT count(*) FROM grants WHERE entitlement_id = $1", ent.id)
    if count >= MAX_GRANTS_PER_ENTITLEMENT:
        raise Refused(400, f"an entitlement holds at most {MAX_GRANTS_PER_ENTITLEMENT} grants")
    period_start = await _current_period_start(conn, ent, datetime.now(UTC))
    if effective_at < period_start:
        raise Refused(400, f"grant effective date {effective_at.isoformat()} is before the current usage period "
                           f"{period_start.isoformat()}", field="effectiveAt")
    values: dict[str, Any] = {
        "entitlement_id": ent.id, "amount": g.amount, "priority": g.priority, "effective_at": effective_at,
        "min_rollover": g.min_rollover, "max_rollover": g.max_rollover, "metadata": g.metadata,
    }
    if g.expiration_duration is not None:
        assert g.expiration_count is not None
        values.update(expiration_duration=g.expiration_duration, expiration_count=g.expiration_count,
                      expires_at=expiration(effective_at, g.expiration_duration, g.expiration_count))
    if g.recurrence_interval is not None:
        values.update(recurrence_interval=g.recurrence_interval,
                      recurrence_anchor=floor_minute(g.recurrence_anchor or effective_at))
    grant = await store.insert_grant(conn, ent.namespace, values)
    await store.invalidate_snapshots(conn, [ent.id], effective_at)
    return grant


async def create_grant(conn: asyncpg.Connection, ent: store.Entitlement, g: GrantInput) -> store.GrantRow:
    _metered(ent)
    async with conn.transaction():
        await _lock(conn, lock_key(ent.id))
        return await _insert_grant(conn, ent, g)


async def void_grant(conn: asyncpg.Connection, grant: store.GrantRow, at: datetime | None) -> None:
    now = datetime.now(UTC)
    at = floor_minute(at or now)
    async with conn.transaction():
        await _lock(conn, lock_key(grant.entitlement_id))
        fresh = await store.grant_by_id(conn, grant.namespace, grant.id)
        assert fresh is not None
        if fresh.voided_at is not None:
            raise Refused(400, "grant already voided")
        if at > now:
            raise Refused(400, f"void time {at.isoformat()} must not be in the future")
        ent = await store.entitlement_by_id(conn, grant.namespace, grant.entitlement_id)
        assert ent is not None
        period_start = await _current_period_start(conn, ent, now)
        if at < period_start:
            raise Refused(400, f"void time {at.isoformat()} is before the current usage period start "
                               f"{period_start.isoformat()}")
        await store.void_grant(conn, fresh, at)
        await store.invalidate_snapshots(conn, [ent.id], at)


async def void_units(conn: asyncpg.Connection, ent: store.Entitlement, which: Callable[[store.GrantRow], bool],
                     units: Decimal) -> tuple[Decimal, list[str]]:
    """Take ``units`` of what is left of the grants ``which`` selects (newest first) away from now on.

    A grant wholly taken is voided; one partly taken is voided and replaced by a grant of
    what it keeps, with the same priority and rollover (no expiry or recurrence: it is meant
    for grants without, as Lago's credits are). The engine counts to the minute: what is left now
    is the balance at the next minute (the value endpoint's), while the void and the
    replacement take effect at this minute's start, so the replacement also holds what the
    grant gave to usage since then (which burns it again). Grants already used up give
    nothing. Returns (units taken, replacement grant ids). Lago's wallet voids use it.
    """
    _metered(ent)
    now = datetime.now(UTC)
    start, end = floor_minute(now), ceil_minute(now)
    taken, replacements = Decimal(0), []
    async with conn.transaction():
        await _lock(conn, lock_key(ent.id))
        ctx = await load_context(conn, ent)
        left_at: dict[datetime, dict[str, Decimal]] = {}
        for at in {start, end}:
            state, _ = await compute_state(conn, ctx, at, now=now, grace=timedelta(0))
            left_at[at] = value_of(ctx, state, at).grant_balances
        chosen = [g for g in ctx.grants if g.deleted_at is None and g.voided_at is None and which(g)]
        for grant in sorted(chosen, key=lambda g: (g.created_at, g.id), reverse=True):
            if units - taken <= 0:
                break
            left = left_at[end].get(grant.id, Decimal(0))
            if left <= 0:
                continue
            take = min(left, units - taken)
            keep = left_at[start].get(grant.id, Decimal(0)) - take
            await store.void_grant(conn, grant, start)
            if keep > 0:
                kept = await _insert_grant(conn, ent, GrantInput(
                    amount=keep, priority=grant.priority, effective_at=start,
                    expiration_duration=None, expiration_count=None,
                    min_rollover=grant.min_rollover, max_rollover=min(grant.max_rollover, keep),
                    recurrence_interval=None, recurrence_anchor=None,
                    metadata={**(grant.metadata or {}), "replaces": grant.id}))
                replacements.append(kept.id)
            taken += take
        await store.invalidate_snapshots(conn, [ent.id], start)
    return taken, replacements


async def reset(conn: asyncpg.Connection, ent: store.Entitlement, at: datetime | None, retain_anchor: bool,
                preserve_overage: bool | None) -> None:
    _metered(ent)
    now = datetime.now(UTC)
    at = floor_minute(at or now)
    async with conn.transaction():
        await _lock(conn, lock_key(ent.id))
        resets = await store.resets_of(conn, ent.id)
        timeline = Timeline.of(ent, resets)
        if at == timeline.last_reset:
            raise Refused(400, f"reset at {at.isoformat()} must be after last reset at {timeline.last_reset.isoformat()}")
        if at > now:
            raise Refused(400, "reset time cannot be in the future")
        if at < timeline.period_at(now)[0]:
            raise Refused(400, "cannot end usage period before current period start time")
        if at < timeline.last_reset:
            raise Refused(400, f"reset at {at.isoformat()} must be after last reset at {timeline.last_reset.isoformat()}")
        _, recurrence, _ = timeline.entries[-1]
        anchor = recurrence.anchor if retain_anchor else at
        interval = ent.usage_interval
        assert interval is not None
        keep = ent.preserve_overage_at_reset if preserve_overage is None else preserve_overage
        await store.insert_reset(conn, ent.id, store.ResetRow(at, anchor, interval, keep))
        await store.invalidate_snapshots(conn, [ent.id], at)


def v1_grant_defaults(amount: Decimal) -> tuple[Decimal, Decimal]:
    """(minRollover, maxRollover) when omitted: v1 keeps nothing at a reset."""
    return Decimal(0), Decimal(0)


def v2_grant_defaults(amount: Decimal) -> tuple[Decimal, Decimal]:
    """v2 rolls the remaining balance over, capped at the amount."""
    return Decimal(0), amount

