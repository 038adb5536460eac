"""The Valkey layout of quota balances (version 1): what a gateway reads.

One hash per (namespace, subject, feature) and one per (namespace, customer, feature)
for every active metered entitlement::

    <prefix>quota:v1:subject:<namespace>:<subjectKey>:<featureKey>
    <prefix>quota:v1:customer:<namespace>:<customerId>:<featureKey>
    <prefix>quota:v1:customer:<namespace>:<customerKey>:<featureKey>   (when it has a key)

``<prefix>`` is ``valkey.keyPrefix`` (``pgmeter:``). Namespaces and feature keys hold
no ``:``, so a subject key may (it sits between them). The subject keys are the
customer's usage keys (its key and its usageAttribution.subjectKeys), so a gateway
that knows the event subject of a caller reads its quota with one ``HMGET``.

Fields (all strings):

==============  ================================================================
v               layout version, ``1``
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
==============  ================================================================

Writes go through :data:`WRITE_SCRIPT`, which writes only if the stored ``asOf`` is
not newer, so a slow computation can never overwrite a newer one. Every value is an
exact computation of the entitlements engine (never an increment), which makes a
redelivered or replayed commit harmless by construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

VERSION = "1"
FIELDS = ("v", "entitlementId", "hasAccess", "balance", "usage", "overage", "totalAvailable", "softLimit", "grantBalances",
          "periodStart", "periodEnd", "validUntil", "asOf", "seq", "updatedAt")

# KEYS: the n live keys of one entitlement's value, then keys it had before and no
# longer has (a subject removed from the customer), then its alias set, then the due
# set. ARGV[1] = asOf (micros), ARGV[2] = entitlement id, ARGV[3] = validUntil (ms) or
# "" when deleting, ARGV[4] = n, ARGV[5..] = field, value pairs (none: delete).
WRITE_SCRIPT = """
local n = tonumber(ARGV[4])
local aliases, due = KEYS[#KEYS - 1], KEYS[#KEYS]
local stored = redis.call('HGET', KEYS[1], 'asOf')
if stored and tonumber(stored) > tonumber(ARGV[1]) then
  return 0
end
for i = 1, #KEYS - 2 do
  redis.call('DEL', KEYS[i])
end
redis.call('DEL', aliases)
if #ARGV > 4 then
  for i = 1, n do
    redis.call('HSET', KEYS[i], unpack(ARGV, 5))
    redis.call('SADD', aliases, KEYS[i])
  end
  redis.call('ZADD', due, tonumber(ARGV[3]), ARGV[2])
else
  redis.call('ZREM', due, ARGV[2])
end
return 1
"""




def subject_key(prefix: str, namespace: str, subject: str, feature: str) -> str:
    return f"{prefix}quota:v1:subject:{namespace}:{subject}:{feature}"


def customer_key(prefix: str, namespace: str, customer: str, feature: str) -> str:
    return f"{prefix}quota:v1:customer:{namespace}:{customer}:{feature}"


def due_key(prefix: str) -> str:
    """Sorted set: entitlement id scored by validUntil (ms), for the background recompute."""
    return f"{prefix}quota:v1:due"


def aliases_key(prefix: str, entitlement_id: str) -> str:
    """Set of the hashes an entitlement's value is written to (so removed subjects lose theirs)."""
    return f"{prefix}quota:v1:aliases:{entitlement_id}"


def worker_key(prefix: str) -> str:
    """Heartbeat of a running quota worker (expires HEARTBEAT_MS after its last beat). Without
    it nobody applies commits, grants or resets to the hashes, so pgmeter's own value endpoint
    does not trust them; a gateway may read it along with its hash (MGET/pipeline) to be as strict."""
    return f"{prefix}quota:v1:worker"


HEARTBEAT_MS = 5000


def alive_key(prefix: str) -> str:
    """Set by the quota worker once it has rebuilt every key: missing means Valkey lost its data."""
    return f"{prefix}quota:v1:built"


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
