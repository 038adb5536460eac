"""A burn-down oracle written the slow, obvious way: one step per minute.

Independent of pgmeter.entitlements.engine (no phases, no snapshots, its own
calendar arithmetic). It walks every minute from measureUsageFrom to the query
instant and applies, in OpenMeter's order: a reset (rollover, then the preserved
overage burned), recurrences (balance back to the amount), activity (inactive
grants hold 0, a grant becoming effective holds its amount), then the minute's
usage plus the carried overage burned in burn order. At the query instant itself
only resets and recurrences apply, as in OpenMeter (its last phase ends there).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

MINUTE = timedelta(minutes=1)


def plus_months(t: datetime, months: int) -> datetime:
    y, m = t.year, t.month + months
    while m > 12:
        y, m = y + 1, m - 12
    while m < 1:
        y, m = y - 1, m + 12
    last = calendar.monthrange(y, m)[1]
    return t.replace(year=y, month=m, day=min(t.day, last))


@dataclass(frozen=True)
class Every:
    """A recurrence: ``months`` calendar months (clamped) or a fixed ``step``."""

    anchor: datetime
    months: int = 0
    step: timedelta = timedelta(0)

    def nth(self, n: int) -> datetime:
        return plus_months(self.anchor, self.months * n) if self.months else self.anchor + self.step * n

    def hits(self, t: datetime) -> bool:
        # Walk from the anchor: slow and plain on purpose.
        n = 0
        if t >= self.anchor:
            while self.nth(n) < t:
                n += 1
        else:
            while self.nth(n) > t:
                n -= 1
        return self.nth(n) == t


@dataclass(frozen=True)
class OGrant:
    id: str
    amount: Decimal
    priority: int
    effective_at: datetime
    created_at: datetime
    expires_at: datetime | None = None
    voided_at: datetime | None = None
    min_rollover: Decimal = Decimal(0)
    max_rollover: Decimal = Decimal(0)
    recurrence: Every | None = None

    def active(self, t: datetime) -> bool:
        ends = [x for x in (self.expires_at, self.voided_at) if x is not None]
        return self.effective_at <= t and all(t < x for x in ends)

    def order(self) -> tuple:  # type: ignore[type-arg]
        return (self.priority, self.expires_at is None, self.expires_at or self.created_at, self.created_at, self.id)


@dataclass
class OValue:
    balance: Decimal
    usage: Decimal
    overage: Decimal
    total: Decimal
    grants: dict[str, Decimal]


def value(grants: list[OGrant], usage: dict[datetime, Decimal], start: datetime, period: Every | None,
          resets: list[tuple[datetime, Every, bool]], preserve_default: bool, at: datetime) -> OValue:
    """``usage``: minute -> usage in that minute. ``resets``: explicit (time, new period, preserve)."""
    bal = {g.id: (g.amount if g.active(start) else Decimal(0)) for g in grants}
    ordered = sorted(grants, key=OGrant.order)
    overage = used = paid = Decimal(0)
    current = period
    explicit = {t: (p, keep) for t, p, keep in resets}

    def burn(demand: Decimal) -> Decimal:
        nonlocal paid
        for g in ordered:
            b = bal[g.id]
            if b == 0:
                continue
            take = min(b, demand)
            bal[g.id] = b - take
            demand -= take
            paid += take
        return demand

    t = start
    while t <= at:
        reset_keep = None
        if t in explicit:
            current, reset_keep = explicit[t][0], explicit[t][1]
        elif t > start and current is not None and current.hits(t):
            reset_keep = preserve_default
        if reset_keep is not None and t > start:
            for g in grants:
                if g.active(t):
                    bal[g.id] = min(g.max_rollover, max(g.min_rollover, bal[g.id]))
            carried = overage if reset_keep else Decimal(0)
            used = paid = Decimal(0)
            overage = burn(carried) if carried else Decimal(0)
        recurred = False
        for g in grants:
            if g.recurrence is not None and g.active(t) and g.recurrence.hits(t):
                bal[g.id] = g.amount
                recurred = True
        if t < at or recurred or reset_keep is not None:
            for g in grants:
                if not g.active(t):
                    bal[g.id] = Decimal(0)
                elif g.effective_at == t:
                    bal[g.id] = g.amount
        if t < at:
            u = usage.get(t, Decimal(0))
            used += u
            overage = burn(u + overage)
        t += MINUTE
    visible = {g.id: bal[g.id] for g in grants if g.active(at)}
    balance = sum(visible.values(), Decimal(0))
    return OValue(balance=balance, usage=used, overage=overage, total=paid + balance, grants=visible)
