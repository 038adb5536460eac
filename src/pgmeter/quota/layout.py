"""The Valkey layout of quota balances (version 2): what a gateway reads and reserves from.

One hash per (namespace, subject, feature) and one per (namespace, customer, feature)
for every active metered entitlement::

    <prefix>quota:v2:subject:<namespace>:<subjectKey>:<featureKey>
    <prefix>quota:v2:customer:<namespace>:<customerId>:<featureKey>
    <prefix>quota:v2:customer:<namespace>:<customerKey>:<featureKey>   (when it has a key)

``<prefix>`` is ``valkey.keyPrefix`` (``pgmeter:``). Namespaces and feature keys hold
no ``:``, so a subject key may (it sits between them). The subject keys are the
customer's usage keys (its key and its usageAttribution.subjectKeys), so a gateway
that knows the event subject of a caller reads its quota with one ``HMGET``.

Fields (all strings):

==============  ================================================================
v               layout version, ``2``
entitlementId   the entitlement the value is of
hasAccess       ``1`` or ``0`` (soft limits always ``1``)
balance         remaining balance, decimal
usage           usage in the current period, decimal
overage         usage past the balance, decimal
totalAvailable  OpenMeter's totalAvailableGrantAmount, decimal
softLimit       ``1`` or ``0``
grantBalances   JSON object ``{grantId: balance}`` (decimal strings)
periodStart     current usage period, epoch milliseconds
periodEnd       (the next reset)
validUntil      epoch ms: the value may change without any new event at this
                instant (period end, a grant starting, expiring or recurring);
                a reader at or past it must ask pgmeter (``/value``) instead
asOf            epoch microseconds of the Postgres snapshot it was computed in:
                every event committed before it is counted
seq             the highest JetStream sequence whose commit was reported to the
                quota worker before the computation (informational)
updatedAt       epoch ms when written
r:<eventId>     a gateway's reservation (:data:`RESERVE_SCRIPT`): ``<amount> <expiresAtMs>``
==============  ================================================================

Version 2 (from 1): reservations, and every script touches exactly one key, so the
layout works unchanged on a Valkey cluster (no two keys ever need the same slot, hence
no hash tags). Each key of a value is written on its own by :data:`WRITE_SCRIPT`, which
writes only if the stored ``asOf`` is not newer, so a slow computation can never
overwrite a newer one. Every value is an exact computation of the entitlements engine
(never an increment), which makes a redelivered or replayed commit harmless by
construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

VERSION = "2"
FIELDS = ("v", "entitlementId", "hasAccess", "balance", "usage", "overage", "totalAvailable", "softLimit", "grantBalances",
          "periodStart", "periodEnd", "validUntil", "asOf", "seq", "updatedAt")
RESERVATION = "r:"  # field name prefix of a reservation

# KEYS[1]: one hash of a value. ARGV[1] = asOf (micros), ARGV[2] = n, ARGV[3 .. 2+n] =
# ids of events now counted in the value (their reservations go, whatever the asOf
# check says: a newer stored value counts them too), then field, value pairs (none:
# delete the hash). The fields are the same set on every write, so HSET replaces them
# all and leaves the reservations standing.
WRITE_SCRIPT = """
local n = tonumber(ARGV[2])
for i = 3, 2 + n do
  redis.call('HDEL', KEYS[1], 'r:' .. ARGV[i])
end
local stored = redis.call('HGET', KEYS[1], 'asOf')
if stored and tonumber(stored) > tonumber(ARGV[1]) then
  return 0
end
if #ARGV == 2 + n then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], unpack(ARGV, 3 + n))
end
return 1
"""

# Check-and-reserve, for a gateway, in one round trip: KEYS[1] = the caller's hash,
# ARGV[1] = reservation id (the id of the usage event the call will send), ARGV[2] =
# amount (> 0), ARGV[3] = time to live, ms. Returns {status, available}:
#   1  reserved (or a soft limit: never refused, nothing held); available after it
#   0  refused: balance minus live reservations is below the amount
#  -1  no usable value (missing, another layout version, at or past validUntil): ask
#      pgmeter's /value (which writes the hash back) and try again
# Reservations are fields of the same hash, so the check and the hold are atomic on
# one key. Expired ones are dropped here; the quota worker drops one when the value it
# writes counts the event of that id; a gateway whose call was not served does HDEL.
# Reserving an id again replaces its reservation (a retry holds once). Amounts and the
# balance are compared as Lua numbers (doubles: exact for integers up to 2^53).
RESERVE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HMGET', KEYS[1], 'v', 'hasAccess', 'balance', 'validUntil', 'softLimit')
if f[1] ~= '2' or not f[4] or now >= tonumber(f[4]) then
  return {-1, ''}
end
local balance = tonumber(f[3])
if f[5] == '1' then
  return {1, string.format('%.15g', balance)}
end
local amount, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
if not amount or amount <= 0 or not ttl or ttl <= 0 then
  return redis.error_reply('amount and ttl must be positive numbers')
end
local mine = 'r:' .. ARGV[1]
local held = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local name = all[i]
  if string.sub(name, 1, 2) == 'r:' and name ~= mine then
    local amount, expires = string.match(all[i + 1], '^(%S+) (%S+)$')
    if not expires or tonumber(expires) <= now then
      redis.call('HDEL', KEYS[1], name)
    else
      held = held + tonumber(amount)
    end
  end
end
local available = balance - held
if f[2] ~= '1' or available < amount then
  return {0, string.format('%.15g', available)}
end
redis.call('HSET', KEYS[1], mine, ARGV[2] .. ' ' .. string.format('%d', now + ttl))
return {1, string.format('%.15g', available - amount)}
"""


def subject_key(prefix: str, namespace: str, subject: str, feature: str) -> str:
    return f"{prefix}quota:v2:subject:{namespace}:{subject}:{feature}"


def customer_key(prefix: str, namespace: str, customer: str, feature: str) -> str:
    return f"{prefix}quota:v2:customer:{namespace}:{customer}:{feature}"


def due_key(prefix: str) -> str:
    """Sorted set: entitlement id scored by validUntil (ms), for the background recompute."""
    return f"{prefix}quota:v2:due"


def aliases_key(prefix: str, entitlement_id: str) -> str:
    """Set of the hashes an entitlement's value is written to (so removed subjects lose theirs)."""
    return f"{prefix}quota:v2:aliases:{entitlement_id}"


def worker_key(prefix: str) -> str:
    """Heartbeat of a running quota worker (expires HEARTBEAT_MS after its last beat). Without
    it nobody applies commits, grants or resets to the hashes, so pgmeter's own value endpoint
    does not trust them; a gateway may read it along with its hash (MGET/pipeline) to be as strict."""
    return f"{prefix}quota:v2:worker"


HEARTBEAT_MS = 5000


def alive_key(prefix: str) -> str:
    """Set by the quota worker once it has rebuilt every key: missing means Valkey lost its data."""
    return f"{prefix}quota:v2:built"


def millis(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def micros(t: datetime) -> int:
    return int(t.timestamp()) * 1_000_000 + t.microsecond


def from_millis(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


@dataclass
class Quota:
    """A parsed hash."""

    entitlement_id: str
    has_access: bool
    balance: Decimal
    usage: Decimal
    overage: Decimal
    total_available: Decimal
    soft_limit: bool
    grant_balances: dict[str, Decimal]
    period_start: int
    period_end: int
    valid_until: int
    as_of: int
    seq: int
    updated_at: int

    @classmethod
    def parse(cls, raw: dict[bytes, bytes] | dict[str, str]) -> Quota | None:
        """``None`` for a missing key or another layout version."""
        if not raw:
            return None
        fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                  for k, v in raw.items()}
        if fields.get("v") != VERSION:
            return None
        try:
            return cls(fields["entitlementId"], fields["hasAccess"] == "1", Decimal(fields["balance"]),
                       Decimal(fields["usage"]), Decimal(fields["overage"]), Decimal(fields["totalAvailable"]),
                       fields["softLimit"] == "1",
                       {k: Decimal(v) for k, v in json.loads(fields.get("grantBalances", "{}")).items()},
                       int(fields["periodStart"]), int(fields["periodEnd"]),
                       int(fields["validUntil"]), int(fields["asOf"]), int(fields["seq"]), int(fields["updatedAt"]))
        except (KeyError, ValueError, ArithmeticError, AttributeError):
            return None

    def fresh_at(self, now: datetime) -> bool:
        return millis(now) < self.valid_until
