"""OpenMeter's grant burn-down engine at minute resolution, without I/O.

One run goes from a starting state (a stored snapshot, or nothing at
``measureUsageFrom``) to an instant ``until``. It is split into usage periods at
every reset (a usage-period boundary or an explicit reset) and each period into
*phases* at every grant activity change (effective, expiry, void; floored to the
minute) and every occurrence of a recurring grant. In each phase the usage of the
phase, plus the overage carried so far, is burned through the active grants in
burn order (:func:`burn_order`); what no grant pays is overage, a debt paid first
by any grant that becomes active or recurs later in the same period. At a reset
every grant active then is clamped to ``[minRollover, maxRollover]``, overage is
kept (and burned from the rolled-over balances) only when the reset preserves it,
and the period's usage starts again from zero.

Usage comes from a callback so this module stays pure: the service answers it
from the meter query engine, the tests from plain lists. Amounts are Decimals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from functools import cached_property

from pgmeter.entitlements.periods import Recurrence, floor_minute

ZERO = Decimal(0)


@dataclass(frozen=True)
class Grant:
    id: str
    amount: Decimal
    priority: int
    effective_at: datetime
    created_at: datetime
    expires_at: datetime | None = None
    voided_at: datetime | None = None
    deleted_at: datetime | None = None
    min_rollover: Decimal = ZERO
    max_rollover: Decimal = ZERO
    recurrence: Recurrence | None = None

    @cached_property  # asked for hundreds of times per value read (every phase, every grant)
    def end(self) -> datetime | None:
        """Where the grant stops being active: expiry, void or delete, whichever is first."""
        ends = [t for t in (self.expires_at, self.voided_at, self.deleted_at) if t is not None]
        return min(ends) if ends else None

    def active_at(self, t: datetime) -> bool:
        end = self.end
        return self.effective_at <= t and (end is None or t < end)

    def overlaps(self, lo: datetime, hi: datetime) -> bool:
        end = self.end
        return self.effective_at <= hi and (end is None or end >= lo)

    def rollover(self, balance: Decimal) -> Decimal:
        return min(self.max_rollover, max(self.min_rollover, balance))


def burn_order(grant: Grant) -> tuple[int, int, datetime, datetime, str]:
    """Priority, then expiry (a grant that expires burns before one that does not,
    earlier before later), then creation time, then id."""
    expiry = grant.expires_at
    return (grant.priority, 0 if expiry is not None else 1, expiry or grant.created_at, grant.created_at, grant.id)


@dataclass
class State:
    """The engine's state at ``at``: every grant's balance, the unpaid overage, the
    period's usage and what grants paid in the period. ``checksum`` is the usage
    since measureUsageFrom (all periods), which validates stored snapshots."""

    at: datetime
    balances: dict[str, Decimal]
    overage: Decimal = ZERO
    usage: Decimal = ZERO
    total_grant_usage: Decimal = ZERO
    checksum: Decimal = ZERO

    def copy(self) -> State:
        return replace(self, balances=dict(self.balances))


@dataclass
class Segment:
    """One phase (or a zero-length rollover at a reset), for the burn-down history."""

    start: datetime
    end: datetime
    usage: Decimal
    overage_at_start: Decimal
    overage: Decimal
    balances_at_start: dict[str, Decimal]
    balances_at_end: dict[str, Decimal]
    grant_usages: dict[str, Decimal] = field(default_factory=dict)
    rollover: bool = False


@dataclass(frozen=True)
class Reset:
    at: datetime
    preserve_overage: bool


# (period start, phase start, phase end) -> usage in the phase
UsageFn = Callable[[datetime, datetime, datetime], Awaitable[Decimal]]


def burn(balances: dict[str, Decimal], ordered: list[Grant], demand: Decimal) -> tuple[Decimal, dict[str, Decimal]]:
    """Burn ``demand`` through ``ordered``; returns what is left (overage) and the burns."""
    burns: dict[str, Decimal] = {}
    for grant in ordered:
        balance = balances.get(grant.id, ZERO)
        if balance == 0:
            continue
        if balance <= demand:
            balances[grant.id] = ZERO
            demand -= balance
            burns[grant.id] = balance
        else:
            balances[grant.id] = balance - demand
            burns[grant.id] = demand
            demand = ZERO
    return demand, burns


def starting_state(grants: list[Grant], at: datetime) -> State:
    """The state at measureUsageFrom: active grants hold their amount."""
    return State(at=at, balances={g.id: (g.amount if g.active_at(at) else ZERO) for g in grants})


def _phases(grants: list[Grant], lo: datetime, hi: datetime, last: bool, observe: list[datetime],
            ) -> tuple[list[str], list[tuple[datetime, datetime, bool, list[str]]]]:
    """(grants recurring at ``lo``, phases ``(from, to, activity change at end, grants recurring at end)``).

    ``observe`` adds cuts that change nothing but let the history read the state there
    (burning ``a`` then ``b`` through the same grants is burning ``a + b``).
    """
    changes = set()
    for g in grants:
        for t in (g.effective_at, g.expires_at, g.deleted_at, g.voided_at):
            if t is not None and lo <= t < hi:
                changes.add(floor_minute(t))
    recurring: dict[datetime, list[str]] = {}
    for g in grants:
        if g.recurrence is None:
            continue
        start = max(g.effective_at, lo)
        for t in g.recurrence.between(start, hi, include_lo=True, include_hi=last or lo == hi):
            if g.active_at(t):
                recurring.setdefault(t, []).append(g.id)
    at_start = recurring.pop(lo, [])
    cuts = sorted(changes | set(recurring) | {t for t in observe if lo < t < hi})
    phases = []
    begin = lo
    for t in cuts:
        if t > begin:
            phases.append((begin, t, t in changes, recurring.get(t, [])))
            begin = t
    if begin < hi:
        phases.append((begin, hi, False, []))
    if phases and phases[-1][1] == hi and phases[-1][3]:
        phases.append((hi, hi, False, []))  # the occurrence at the very end applies too
    if not phases:
        phases.append((lo, hi, False, []))
    return at_start, phases


async def _run_period(state: State, grants: list[Grant], period_start: datetime, until: datetime, last: bool,
                      usage_of: UsageFn, latest: bool, history: list[Segment] | None, observe: list[datetime]) -> State:
    by_id = {g.id: g for g in grants}
    balances = dict(state.balances)
    for g in grants:
        balances.setdefault(g.id, g.amount if g.active_at(state.at) else ZERO)
    at_start, phases = _phases(grants, state.at, until, last, observe)
    for grant_id in at_start:
        balances[grant_id] = by_id[grant_id].amount
    ordered = sorted(grants, key=burn_order)
    overage, usage_total, paid = state.overage, ZERO, ZERO
    recurred: list[str] = []
    for lo, hi, _change, recurs_at_end in phases:
        for grant_id in recurred:
            balances[grant_id] = by_id[grant_id].amount
        active = [g for g in ordered if g.active_at(lo)]
        for g in ordered:
            if not g.active_at(lo):
                balances[g.id] = ZERO
            elif g.effective_at == lo or latest:
                balances[g.id] = g.amount
        start_balances, start_overage = dict(balances), overage
        used = await usage_of(period_start, lo, hi) if hi > lo else ZERO
        overage, burns = burn(balances, active, used + overage)
        usage_total += used
        paid += sum(burns.values(), ZERO)
        if history is not None:
            history.append(Segment(lo, hi, used, start_overage, overage, start_balances, dict(balances), burns))
        recurred = recurs_at_end
    return State(at=until, balances=balances, overage=overage, usage=state.usage + usage_total,
                 total_grant_usage=state.total_grant_usage + paid, checksum=state.checksum + usage_total)


def reset(state: State, grants: list[Grant], preserve_overage: bool, history: list[Segment] | None = None) -> State:
    """A reset at ``state.at``: rollover, then the preserved overage (if any) burned."""
    balances = dict(state.balances)
    for g in grants:
        if g.id in balances and g.active_at(state.at):
            balances[g.id] = g.rollover(balances[g.id])
    rolled = dict(balances)
    overage = state.overage if preserve_overage else ZERO
    burns: dict[str, Decimal] = {}
    if overage != 0:
        overage, burns = burn(balances, sorted(grants, key=burn_order), overage)
    if history is not None:
        history.append(Segment(state.at, state.at, ZERO, state.overage if preserve_overage else ZERO, overage,
                               rolled, dict(balances), burns, rollover=True))
    return State(at=state.at, balances=balances, overage=overage, usage=ZERO,
                 total_grant_usage=sum(burns.values(), ZERO), checksum=state.checksum)


async def run(start: State, period_start: datetime, grants: list[Grant], resets: list[Reset], until: datetime,
              usage_of: UsageFn, *, latest: bool = False, history: list[Segment] | None = None,
              on_reset: Callable[[State], None] | None = None, observe: list[datetime] | None = None) -> State:
    """The state at ``until`` from ``start``; ``resets`` lie in ``(start.at, until]``, sorted.

    ``period_start`` is the start of the usage period ``start`` lies in (UNIQUE_COUNT
    usage is counted from there). ``on_reset`` sees the state right after each reset.
    """
    relevant = [g for g in grants if g.amount >= 0 and g.overlaps(start.at, until)]
    relevant += [g for g in grants if g not in relevant and g.id in start.balances]
    state = start.copy()
    times = [r.at for r in resets] + [until]
    for index, end in enumerate(times):
        last = index == len(times) - 1
        state = await _run_period(state, relevant, period_start, end, last, usage_of, latest, history, observe or [])
        if not last:
            state = reset(state, relevant, resets[index].preserve_overage, history)
            period_start = end
            if on_reset is not None:
                on_reset(state.copy())
    return state


def visible_balances(state: State, grants: list[Grant]) -> dict[str, Decimal]:
    """The balances a value shows: only grants active at the state's instant."""
    active = {g.id for g in grants if g.active_at(state.at)}
    return {grant_id: balance for grant_id, balance in state.balances.items() if grant_id in active}
