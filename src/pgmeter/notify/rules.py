"""Notification rules evaluated on every fresh quota value (OpenMeter's semantics).

The quota worker (:mod:`pgmeter.quota.worker`) hands each value it computes, and the
explicit resets behind it, to :func:`evaluate`. It runs in every sink process, with or
without Valkey (without, it computes values only while an active rule exists), so an
api+sink deployment notifies whether or not it keeps quotas in Valkey. Events are written to
``notification_events`` with one ``notification_deliveries`` row per channel (the
outbox :mod:`pgmeter.notify.delivery` sends from), in one transaction.

``entitlements.balance.threshold``: skipped while totalAvailableGrantAmount is 0;
the highest active usage-kind threshold (``usage_value``/``NUMBER``: value < usage;
``usage_percentage``/``PERCENT``: total * value / 100 < usage) and the lowest active
balance-kind one (``balance_value``: value > balance, or balance <= 0 for 0) each
fire when no event of the same rule, kind, entitlement and period exists, or the last
one was for another threshold: once per threshold per period, re-armed by a new period.

``entitlements.reset``: once per explicit reset (POST .../reset), never for the
computed period boundaries (as OpenMeter).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from pgmeter.meters.ulid import new_ulid
from pgmeter.quota.balances import Computed

THRESHOLD = "entitlements.balance.threshold"
RESET = "entitlements.reset"
USAGE_KINDS = {"usage_value", "NUMBER", "usage_percentage", "PERCENT"}
BALANCE_KINDS = {"balance_value"}
THRESHOLD_TYPES = USAGE_KINDS | BALANCE_KINDS

_RULES = """
SELECT id, type, channels, thresholds::text AS thresholds FROM notification_rules
WHERE namespace = $1 AND deleted_at IS NULL AND NOT disabled AND type = ANY($3::text[])
  AND (features = '{}' OR $2 = ANY(features))
"""


def usage_amount(threshold: dict[str, Any], total: Decimal) -> Decimal:
    value = Decimal(str(threshold["value"]))
    return total * value / 100 if threshold["type"] in ("usage_percentage", "PERCENT") else value


def active_thresholds(thresholds: list[dict[str, Any]], usage: Decimal, balance: Decimal,
                      total: Decimal) -> list[tuple[str, dict[str, Any]]]:
    """(kind, threshold) for the highest active usage threshold and the lowest active balance one."""
    if total == 0:
        return []
    found: list[tuple[str, dict[str, Any]]] = []
    usage_active = [t for t in thresholds if t["type"] in USAGE_KINDS and usage_amount(t, total) < usage]
    if usage_active:
        found.append(("usage", max(usage_active, key=lambda t: usage_amount(t, total))))

    def balance_active(t: dict[str, Any]) -> bool:
        value = Decimal(str(t["value"]))
        return balance <= 0 if value == 0 else value > balance

    balance_hits = [t for t in thresholds if t["type"] in BALANCE_KINDS and balance_active(t)]
    if balance_hits:
        found.append(("balance", min(balance_hits, key=lambda t: Decimal(str(t["value"])))))
    return found


def payload_of(event_id: str, kind: str, computed: Computed, threshold: dict[str, Any] | None) -> dict[str, Any]:
    from pgmeter.entitlements.api.customers import customer_json
    from pgmeter.entitlements.api.entitlements import V1, entitlement_json
    from pgmeter.entitlements.api.features import feature_json
    from pgmeter.entitlements.api.shapes import number

    ctx, value = computed.ctx, computed.value
    assert ctx is not None and value is not None
    customer = ctx.customer
    data: dict[str, Any] = {
        "entitlement": entitlement_json(ctx.entitlement, customer, V1, ctx.resets),
        "feature": feature_json(ctx.feature),
        "subject": {"key": customer.usage_keys[0] if customer.usage_keys else customer.id},
        "customer": customer_json(customer),
        "value": {"hasAccess": value.has_access, "balance": number(value.balance), "usage": number(value.usage),
                  "overage": number(value.overage), "totalAvailableGrantAmount": number(value.total_available)},
    }
    if threshold is not None:
        data["threshold"] = threshold
    return {"id": event_id, "type": kind, "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "data": data}


async def _fire(conn: asyncpg.Connection, computed: Computed, rule: asyncpg.Record, dedupe: str,
                threshold: dict[str, Any] | None) -> str | None:
    """Insert the event and its deliveries unless the same (dedupe, threshold) was the last one."""
    ctx = computed.ctx
    assert ctx is not None
    namespace = ctx.entitlement.namespace
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"pgmeter.notify:{namespace}:{dedupe}")
        last = await conn.fetchrow("SELECT threshold::text AS threshold FROM notification_events "
                                   "WHERE namespace = $1 AND dedupe = $2 ORDER BY created_at DESC LIMIT 1",
                                   namespace, dedupe)
        if last is not None and (threshold is None or json.loads(last["threshold"] or "null") == threshold):
            return None
        event_id = new_ulid()
        payload = payload_of(event_id, rule["type"], computed, threshold)
        await conn.execute(
            "INSERT INTO notification_events (id, namespace, type, rule_id, entitlement_id, subject, feature_id, "
            "dedupe, threshold, payload) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb)",
            event_id, namespace, rule["type"], rule["id"], ctx.entitlement.id, payload["data"]["subject"]["key"],
            ctx.feature.id, dedupe, threshold, payload)
        await conn.execute(
            "INSERT INTO notification_deliveries (event_id, channel_id, next_attempt_at) "
            "SELECT $1, id, now() FROM notification_channels "
            "WHERE namespace = $2 AND id = ANY($3::text[]) AND deleted_at IS NULL AND NOT disabled",
            event_id, namespace, rule["channels"])
    return event_id


async def evaluate(pool: asyncpg.Pool, computed: Computed, resets: list[str]) -> list[str]:
    """Fire what ``computed`` (and the explicit ``resets`` behind it) calls for; the new event ids."""
    ctx, value = computed.ctx, computed.value
    if ctx is None or value is None:
        return []
    ent = ctx.entitlement
    kinds = [THRESHOLD] + ([RESET] if resets else [])
    fired: list[str] = []
    async with pool.acquire() as conn:
        for rule in await conn.fetch(_RULES, ent.namespace, ctx.feature.id, kinds):
            if rule["type"] == RESET:
                for reset_id in resets:
                    found = await _fire(conn, computed, rule, f"reset:{rule['id']}:{reset_id}", None)
                    fired.extend([found] if found else [])
                continue
            thresholds = json.loads(rule["thresholds"] or "[]")
            lo, hi = value.period
            for kind, threshold in active_thresholds(thresholds, value.usage, value.balance, value.total_available):
                dedupe = f"threshold:{rule['id']}:{kind}:{ent.id}:{lo.isoformat()}:{hi.isoformat()}"
                found = await _fire(conn, computed, rule, dedupe, threshold)
                fired.extend([found] if found else [])
    return fired
