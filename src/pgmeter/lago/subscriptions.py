"""Lago subscriptions as the sync needs them: active ranges, time zone, grace period.

Lago bills an event to the subscription record of its ``external_subscription_id``
whose ``started_at <= timestamp <= terminated_at`` (ties to the newer record), and
invoices periods cut at midnight in the customer's time zone. So the sync:

- splits each window where a record starts or ends. Ranges are cut at whole seconds
  (the query engine's resolution; ``terminated_at`` is only published to the
  second) and used half-open, so every event belongs to exactly one piece;
- windows are HOUR or DAY in the customer's ``applicable_timezone``, so no window
  spans a period boundary (a +05:30 customer's hours start at :30 UTC);
- timestamps each piece at ``max(window start, started_at)`` (to the millisecond),
  inside that record's charge window and the period holding the window, and past
  the end of any record it overlaps (:func:`piece_timestamp`).
"""

from __future__ import annotations

import asyncio
import zoneinfo
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pgmeter.lago.client import LagoClient

FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Record:
    """One Lago subscription record (an upgrade keeps the external id, new record)."""

    lago_id: str
    started_at: datetime  # exact, to the millisecond
    terminated_at: datetime | None

    @property
    def range(self) -> tuple[datetime, datetime]:
        """Where this record owns usage: [started_at, terminated_at) cut to seconds."""
        end = FAR_FUTURE if self.terminated_at is None else self.terminated_at.replace(microsecond=0)
        return self.started_at.replace(microsecond=0), end


@dataclass
class Owner:
    """What Lago knows about one external_subscription_id."""

    external_id: str
    records: list[Record] = field(default_factory=list)
    timezone: str = "UTC"
    grace_days: int = 0
    customer: str | None = None
    problem: str | None = None  # set when usage cannot be sent to it at all

    def segments(self, lo: datetime, hi: datetime) -> list[tuple[Record | None, datetime, datetime]]:
        """[lo, hi) cut into the parts each record owns, and the parts none owns."""
        cuts = []
        for record in self.records:
            start, end = record.range
            start, end = max(start, lo), min(end, hi)
            if start < end:
                cuts.append((record, start, end))
        cuts.sort(key=lambda cut: cut[1])
        out: list[tuple[Record | None, datetime, datetime]] = []
        at = lo
        for record, start, end in cuts:
            start = max(start, at)  # overlapping records: the earlier one keeps the overlap
            if start >= end:
                continue
            if at < start:
                out.append((None, at, start))
            out.append((record, start, end))
            at = end
        if at < hi:
            out.append((None, at, hi))
        return out

    def not_active(self, start: datetime, end: datetime) -> str:
        if self.problem:
            return self.problem
        return (f"subscription {self.external_id} is not active in Lago between {start.isoformat()} "
                f"and {end.isoformat()}")


def lago_time(text: Any) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def piece_timestamp(window_start: datetime, record: Record, others: list[Record]) -> Decimal:
    """Where a piece's Lago event goes: ``max(window start, started_at)``, past any
    other record of the same external id that ends in that second.

    Lago's invoices count events by external id and timestamp inside the charges
    window (``started_at``..``terminated_at``, both inclusive), not by record. On an
    upgrade the old record is terminated a few milliseconds *after* the new one
    starts, and ``terminated_at`` is published to the second only: an event at the
    new record's ``started_at`` would be on both invoices. The next whole second
    after the old record's published ``terminated_at`` is on the new one's only.
    """
    moment = max(window_start, record.started_at)
    for other in others:
        if other is record or other.terminated_at is None or other.started_at > moment:
            continue
        ended = other.terminated_at.replace(microsecond=0)
        if ended >= moment.replace(microsecond=0):
            moment = max(moment, ended + timedelta(seconds=1))
    # Exact decimal seconds (milliseconds at most), never a binary float.
    whole = int(moment.replace(microsecond=0).timestamp())
    return Decimal(whole) + Decimal(moment.microsecond // 1000) / 1000


def window_floor(instant: datetime, window: str, tz: str) -> datetime:
    """Start (UTC) of the HOUR or DAY window in ``tz`` that holds ``instant``."""
    local = instant.astimezone(zoneinfo.ZoneInfo(tz))
    if window == "HOUR":
        local = local.replace(minute=0, second=0, microsecond=0)
        # Zones with :30 or :45 offsets: the local hour start, back in UTC.
        return local.astimezone(UTC)
    midnight = datetime(local.year, local.month, local.day, tzinfo=zoneinfo.ZoneInfo(tz))
    return midnight.astimezone(UTC)


def window_span(window: str) -> timedelta:
    """The longest a window can be (a DAY has 25 hours on a DST change)."""
    return timedelta(hours=1) if window == "HOUR" else timedelta(hours=25)


class Customers:
    """Customers and billing entities (time zone, grace period), kept for a few minutes
    across runs: they change rarely, and a run a minute would otherwise read every
    customer with usage every minute."""

    TTL = timedelta(minutes=5)

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str], tuple[datetime, dict[str, Any] | None]] = {}

    async def get(self, kind: str, key: str, read: Any) -> dict[str, Any] | None:
        now = datetime.now(UTC)
        kept = self._kept.get((kind, key))
        if kept is None or kept[0] <= now:
            kept = (now + self.TTL, await read(key))
            self._kept[(kind, key)] = kept
        return kept[1]


class Book:
    """What Lago knows about subscriptions, read once per run: subscriptions afresh
    every run (an upgrade must be seen by the next run), customers through
    :class:`Customers`."""

    def __init__(self, client: LagoClient, customers: Customers | None = None) -> None:
        self.client = client
        self.customers = customers or Customers()
        self._owners: dict[str, Owner] = {}

    async def prefetch(self, external_ids: set[str], concurrency: int = 8) -> None:
        """Read many owners with a few requests in flight (a run reads every
        subscription with recent usage)."""
        gate = asyncio.Semaphore(concurrency)

        async def one(external_id: str) -> None:
            async with gate:
                await self.owner(external_id)

        await asyncio.gather(*(one(e) for e in sorted(external_ids) if e not in self._owners))

    async def owner(self, external_id: str) -> Owner:
        if external_id not in self._owners:
            self._owners[external_id] = await self._read(external_id)
        return self._owners[external_id]

    async def _read(self, external_id: str) -> Owner:
        owner = Owner(external_id)
        if not external_id:
            owner.problem = "the subject maps to an empty external_subscription_id"
            return owner
        found = await self.client.subscriptions(external_id)
        for item in found:
            started = lago_time(item.get("started_at"))
            if started is None or item.get("status") not in ("active", "terminated"):
                continue
            owner.records.append(Record(str(item.get("lago_id")), started, lago_time(item.get("terminated_at"))))
        if not owner.records:
            owner.problem = f"subscription {external_id} does not exist in Lago (or never started)"
            return owner
        owner.customer = str(found[0].get("external_customer_id") or "") or None
        customer = (await self.customers.get("customer", owner.customer, self.client.customer)
                    if owner.customer else None)
        if customer is not None:
            billing = customer.get("billing_configuration") or {}
            entity = await self._entity(customer.get("billing_entity_code"))
            owner.timezone = (customer.get("applicable_timezone") or customer.get("timezone")
                              or (entity or {}).get("timezone") or "UTC")
            grace = billing.get("invoice_grace_period")
            if grace is None:
                grace = (entity or {}).get("invoice_grace_period")
            owner.grace_days = int(grace or 0)
        try:
            zoneinfo.ZoneInfo(owner.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            owner.problem = f"customer {owner.customer} has time zone {owner.timezone!r}, unknown here"
        return owner

    async def _entity(self, code: Any) -> dict[str, Any] | None:
        if not code:
            return None
        return await self.customers.get("billing_entity", str(code), self.client.billing_entity)
