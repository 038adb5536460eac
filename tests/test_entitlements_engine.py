"""The burn-down engine against OpenMeter's worked examples (E1-E10) and a
minute-by-minute oracle (tests/support/burndown.py). Pure Python, no services."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgmeter.entitlements import engine
from pgmeter.entitlements.engine import Grant, Reset, State
from pgmeter.entitlements.periods import Recurrence, add_date, add_months, expiration, parse_interval
from tests.support import burndown

T = datetime(2024, 1, 1, tzinfo=UTC)
H = timedelta(hours=1)
M = timedelta(minutes=1)
D = timedelta(days=1)
INF = Decimal(10) ** 12


def usage_fn(events: list[tuple[datetime, Decimal]]) -> engine.UsageFn:
    async def usage(period_start: datetime, lo: datetime, hi: datetime) -> Decimal:
        return sum((v for t, v in events if lo <= t < hi), Decimal(0))
    return usage


def latest_fn(events: list[tuple[datetime, Decimal]]) -> engine.UsageFn:
    async def usage(period_start: datetime, lo: datetime, hi: datetime) -> Decimal:
        inside = [(t, v) for t, v in events if lo <= t < hi]
        return max(inside)[1] if inside else Decimal(0)
    return usage


def grant(gid: str, amount: int, priority: int = 1, eff: datetime = T, exp: datetime | None = None,
          created: datetime = T, max_rollover: int = 0, min_rollover: int = 0,
          recurrence: Recurrence | None = None, voided: datetime | None = None) -> Grant:
    return Grant(id=gid, amount=Decimal(amount), priority=priority, effective_at=eff, created_at=created,
                 expires_at=exp, voided_at=voided, max_rollover=Decimal(max_rollover),
                 min_rollover=Decimal(min_rollover), recurrence=recurrence)


def run(grants: list[Grant], events: list[tuple[datetime, int]], start: datetime, until: datetime,
        resets: list[Reset] | None = None, latest: bool = False) -> tuple[State, dict[str, Decimal]]:
    evs = [(t, Decimal(v)) for t, v in events]
    state = asyncio.run(engine.run(engine.starting_state(grants, start), start, grants, resets or [], until,
                                   latest_fn(evs) if latest else usage_fn(evs), latest=latest))
    return state, engine.visible_balances(state, grants)


def summary(state: State, visible: dict[str, Decimal]) -> tuple[Decimal, Decimal, Decimal, Decimal]:
    balance = sum(visible.values(), Decimal(0))
    return balance, state.usage, state.overage, state.total_grant_usage + balance


def test_e1_future_grant_is_ignored() -> None:
    g1, g2 = grant("g1", 1000, exp=T + 3 * D), grant("g2", 1000, eff=T + 2 * H)
    state, visible = run([g1, g2], [(T + M, 100), (T + H + M, 100)], T, T + H)
    assert summary(state, visible) == (900, 100, 0, 1000)
    assert visible == {"g1": 900}


def test_e2_no_grants_is_overage() -> None:
    state, visible = run([], [(T + M, 100), (T + H + M, 100)], T, T + H)
    assert summary(state, visible) == (0, 100, 100, 0)


def test_e3_priority_then_expiry() -> None:
    a = [grant("g1", 100, 1, exp=T + 30 * D), grant("g2", 100, 2, exp=T + 30 * D)]
    state, visible = run(a, [(T + H, 120)], T, T + 2 * H)
    assert visible == {"g1": 0, "g2": 80} and summary(state, visible) == (80, 120, 0, 200)
    b = [grant("g2", 100, 1, exp=add_date(T, years=100)), grant("g1", 100, 1, exp=T + 30 * D)]
    state, visible = run(b, [(T + H, 120)], T, T + 2 * H)
    assert visible == {"g1": 0, "g2": 80}


def test_e4_overage_before_a_grant_is_paid_by_it() -> None:
    state, visible = run([grant("g", 100)], [(T - H, 25), (T + H, 25)], T - D, T + D)
    assert summary(state, visible) == (50, 50, 0, 100)


def test_e5_recurring_grant_pays_the_debt() -> None:
    g = grant("g", 100, recurrence=Recurrence(T, parse_interval("DAY")))
    state, visible = run([g], [(T + H, 120)], T, T + D - M)
    assert summary(state, visible) == (0, 120, 20, 100)
    state, visible = run([g], [(T + H, 120)], T, T + D + H)
    assert summary(state, visible) == (80, 120, 0, 200)


def test_e6_reset_with_rollover_caps() -> None:
    g1 = grant("g1", 1000, 1, eff=T + 2 * H, exp=T + 3 * D, max_rollover=1000)
    g2 = grant("g2", 1000, 3, eff=T + 2 * H, exp=T + 3 * D, max_rollover=100)
    state, visible = run([g1, g2], [(T + M, 600)], T, T + 5 * H, [Reset(T + 5 * H, False)])
    assert visible == {"g1": 400, "g2": 100} and summary(state, visible)[:3] == (500, 0, 0)


def test_e7_preserved_overage() -> None:
    def case(used: int) -> tuple[State, dict[str, Decimal]]:
        g1 = grant("g1", 1000, 1, eff=T + 2 * H, max_rollover=1000)
        g2 = grant("g2", 1000, 3, eff=T + 2 * H, max_rollover=500, min_rollover=500)
        return run([g1, g2], [(T + M, used)], T, T + 5 * H, [Reset(T + 5 * H, True)])
    assert summary(*case(2100)) == (400, 0, 0, 500)
    state, visible = case(2600)
    assert summary(state, visible) == (0, 0, 100, 500)


def test_e8_single_grant_resets() -> None:
    state, visible = run([grant("g", 100, max_rollover=50)], [(T + M, 10)], T, T + H, [Reset(T + H, False)])
    assert summary(state, visible)[0] == 50
    state, visible = run([grant("g", 100, max_rollover=50, min_rollover=50)], [(T + M, 110)], T, T + H,
                         [Reset(T + H, True)])
    assert summary(state, visible)[0] == 40 and summary(state, visible)[3] == 50


def test_e9_latest_meter_grants_are_limits() -> None:
    grants = [grant("g1", 50, 1, exp=T + H), grant("g2", 100, 2), grant("g3", 75, 3, eff=T + H),
              grant("g4", 200, 1, eff=T + 4 * H)]
    state, visible = run(grants, [(T, 15), (T + H, 30), (T + 2 * H, 10)], T, T + 3 * H, latest=True)
    assert summary(state, visible) == (165, 25, 0, 190)


def test_e10_void_keeps_usage_and_turns_later_usage_into_overage() -> None:
    g = grant("g", 100, voided=T + 2 * H)
    state, visible = run([g], [(T + H, 60), (T + 3 * H, 5)], T, T + 2 * H)
    assert summary(state, visible) == (0, 60, 0, 60)
    state, visible = run([g], [(T + H, 60), (T + 3 * H, 5)], T, T + 4 * H)
    assert summary(state, visible) == (0, 65, 5, 60)


def test_month_end_arithmetic() -> None:
    jan31 = datetime(2024, 1, 31, tzinfo=UTC)
    month = Recurrence(jan31, parse_interval("MONTH"))
    assert [month.at(n).date().isoformat() for n in range(4)] == ["2024-01-31", "2024-02-29", "2024-03-31",
                                                                  "2024-04-30"]
    assert month.period_at(datetime(2024, 3, 1, tzinfo=UTC)) == (month.at(1), month.at(2))
    assert add_months(jan31, 1).day == 29
    # Grant expirations are Go's AddDate: no clamping.
    assert expiration(jan31, "MONTH", 1) == datetime(2024, 3, 2, tzinfo=UTC)
    assert expiration(datetime(2023, 1, 31, tzinfo=UTC), "MONTH", 1) == datetime(2023, 3, 3, tzinfo=UTC)
    assert expiration(datetime(2024, 2, 29, tzinfo=UTC), "YEAR", 1) == datetime(2025, 3, 1, tzinfo=UTC)


# -- against the oracle ------------------------------------------------------------

@st.composite
def scenarios(draw: st.DrawFn) -> tuple:  # type: ignore[type-arg]
    span = 3 * 24 * 60  # minutes
    start = T
    n = draw(st.integers(0, 4))
    grants, ograants = [], []
    for i in range(n):
        eff = start + M * draw(st.integers(0, span))
        exp = eff + H * draw(st.integers(1, 60)) if draw(st.booleans()) else None
        void = eff + M * draw(st.integers(1, 3000)) if draw(st.integers(0, 4)) == 0 else None
        amount = draw(st.integers(1, 200))
        prio = draw(st.integers(0, 3))
        hi = draw(st.integers(0, 200))
        lo = draw(st.integers(0, hi))
        rec_hours = draw(st.sampled_from([None, None, 5, 24]))
        created = start + M * i
        rec = Recurrence(eff, parse_interval(f"PT{rec_hours}H")) if rec_hours else None
        grants.append(Grant(id=f"g{i}", amount=Decimal(amount), priority=prio, effective_at=eff, created_at=created,
                            expires_at=exp, voided_at=void, min_rollover=Decimal(lo), max_rollover=Decimal(hi),
                            recurrence=rec))
        ograants.append(burndown.OGrant(id=f"g{i}", amount=Decimal(amount), priority=prio, effective_at=eff,
                                        created_at=created, expires_at=exp, voided_at=void, min_rollover=Decimal(lo),
                                        max_rollover=Decimal(hi),
                                        recurrence=burndown.Every(eff, step=H * rec_hours) if rec_hours else None))
    events = [(start + M * draw(st.integers(0, span)), Decimal(draw(st.integers(0, 80))))
              for _ in range(draw(st.integers(0, 12)))]
    preserve = draw(st.booleans())
    at = start + M * draw(st.integers(0, span + 60))
    return grants, ograants, events, preserve, at


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(scenarios())
def test_engine_matches_minute_oracle_with_daily_resets(case: tuple) -> None:  # type: ignore[type-arg]
    grants, ogrants, events, preserve, at = case
    anchor = T + 7 * H
    period = Recurrence(anchor, parse_interval("DAY"))
    resets = [Reset(t, preserve) for t in period.between(T, at, include_lo=False, include_hi=True)]
    state = asyncio.run(engine.run(engine.starting_state(grants, T), T, grants, resets, at, usage_fn(events)))
    visible = engine.visible_balances(state, grants)
    usage: dict[datetime, Decimal] = {}
    for t, v in events:
        usage[t] = usage.get(t, Decimal(0)) + v
    expected = burndown.value(ogrants, usage, T, burndown.Every(anchor, step=D), [], preserve, at)
    assert visible == expected.grants
    assert summary(state, visible) == (expected.balance, expected.usage, expected.overage, expected.total)
