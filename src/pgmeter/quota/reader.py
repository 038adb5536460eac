"""The value endpoints' fast path: Valkey first, the exact computation on a miss.

Only a value *now* (no ``time`` parameter) is served from Valkey; a value at a given
time is always computed. A stored value is used when it is of this entitlement and
still valid (``validUntil`` not reached: no period end, grant start, expiry or
recurrence since it was computed). Anything else (a miss, another layout version, an
unreachable Valkey) computes exactly, and writes the result back so the next read
hits: this is how keys come back on demand after Valkey lost its data.

The answer says how fresh it is, in headers (the body keeps OpenMeter's shape):
``X-Pgmeter-Value-Source`` (``valkey`` or ``computed``), ``X-Pgmeter-Value-As-Of``
(the Postgres snapshot time the value reflects: every event committed before it is
counted) and ``X-Pgmeter-Value-Seq`` (see :mod:`pgmeter.quota.layout`).

The entitlement routes reach this module as ``runtime.quota_values`` (it answers the
core's ``QuotaValues`` protocol), set by :mod:`pgmeter.roles`: this room imports the
entitlements room, which therefore does not import it back.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pgmeter.dependencies import describe
from pgmeter.quota import balances, layout
from pgmeter.runtime import Runtime

log = logging.getLogger(__name__)

# A heartbeat seen this recently is not read again (it expires after 5 s, beats every second).
HEARTBEAT_CACHE = 1.0


def _body(has_access: bool, balance: Decimal, usage: Decimal, overage: Decimal, total: Decimal,
          grant_balances: dict[str, Decimal], v2: bool) -> dict[str, Any]:
    from pgmeter.entitlements.api.shapes import number

    body: dict[str, Any] = {"hasAccess": has_access, "balance": number(balance), "usage": number(usage),
                            "overage": number(overage), "totalAvailableGrantAmount": number(total)}
    if v2:
        body["grantBalances"] = {k: number(v) for k, v in sorted(grant_balances.items())}
    return body


def _headers(source: str, as_of_micros: int, seq: int) -> dict[str, str]:
    as_of = datetime.fromtimestamp(as_of_micros / 1_000_000, UTC)
    return {"X-Pgmeter-Value-Source": source, "X-Pgmeter-Value-As-Of": as_of.isoformat().replace("+00:00", "Z"),
            "X-Pgmeter-Value-Seq": str(seq)}


def enabled(runtime: Runtime) -> bool:
    return runtime.valkey is not None and runtime.settings.quota.enabled


async def cached(runtime: Runtime, key: str, *, v2: bool, entitlement_id: str | None = None,
                 ) -> tuple[tuple[dict[str, Any], dict[str, str]] | None, bool]:
    """(the value stored under ``key`` if it is valid now, whether a quota worker is running).

    Without a worker's heartbeat nothing keeps the hashes current, so none is used (and
    none is written back): the caller computes as if there were no Valkey.
    """
    prefix = runtime.settings.valkey.key_prefix
    seen = runtime.quota_heartbeat_seen
    valkey = runtime.valkey
    assert valkey is not None  # enabled(runtime)
    try:
        # HMGET of the value's fields, not HGETALL: the hash also holds gateways' reservations.
        if time.monotonic() - seen < HEARTBEAT_CACHE:
            values, alive = await valkey.hmget(key, *layout.FIELDS), True
        else:
            async with valkey.pipeline(transaction=False) as pipe:
                pipe.hmget(key, *layout.FIELDS)
                pipe.exists(layout.worker_key(prefix))
                values, alive = await pipe.execute()
            if alive:
                runtime.quota_heartbeat_seen = time.monotonic()
    except Exception as exc:  # Valkey away or slow: the exact computation answers
        log.debug("quota read failed", extra={"error": describe(exc)})
        return None, False
    raw = {name: value for name, value in zip(layout.FIELDS, values, strict=True) if value is not None}
    found = layout.Quota.parse(raw) if alive else None
    if found is None or not found.fresh_at(datetime.now(UTC)):
        return None, bool(alive)
    if entitlement_id is not None and found.entitlement_id != entitlement_id:
        return None, True
    return (_body(found.has_access, found.balance, found.usage, found.overage, found.total_available,
                  found.grant_balances, v2), _headers("valkey", found.as_of, found.seq)), True


async def worker_running(runtime: Runtime) -> bool:
    if time.monotonic() - runtime.quota_heartbeat_seen < HEARTBEAT_CACHE:
        return True
    if runtime.valkey is None:
        return False
    try:
        alive = bool(await runtime.valkey.exists(layout.worker_key(runtime.settings.valkey.key_prefix)))
    except Exception:
        return False
    if alive:
        runtime.quota_heartbeat_seen = time.monotonic()
    return alive


def key_for(runtime: Runtime, namespace: str, *, subject: str | None = None, customer: str | None = None,
            feature_key: str) -> str:
    prefix = runtime.settings.valkey.key_prefix
    if subject is not None:
        return layout.subject_key(prefix, namespace, subject, feature_key)
    assert customer is not None
    return layout.customer_key(prefix, namespace, customer, feature_key)


async def computed(runtime: Runtime, namespace: str, entitlement_id: str, *, v2: bool,
                   ) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The exact value now, written back to Valkey; ``None`` if the entitlement has none now."""
    prefix = runtime.settings.valkey.key_prefix
    worker = runtime.quota
    seq = worker.seq if worker is not None else 0
    result = await balances.compute(runtime.api_pool, prefix, namespace, entitlement_id, seq=seq,
                                    grace=runtime.settings.valkey.settle_after)
    if result is None or result.value is None:
        return None
    try:
        await balances.write(runtime.valkey, prefix, result)
    except Exception as exc:
        log.debug("quota write-back failed", extra={"error": describe(exc)})
    value = result.value
    return (_body(value.has_access, value.balance, value.usage, value.overage, value.total_available,
                  value.grant_balances, v2), _headers("computed", layout.micros(result.as_of), seq))
