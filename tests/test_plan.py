"""Which rollup level answers which part of a range: h1 serves DAY queries in
whole-hour zones (Berlin, DST included), q15 only the :30/:45 zones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pgmeter.query.params import WindowSize
from pgmeter.query.plan import carve, usable_levels


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_berlin_days_across_dst_are_whole_hours() -> None:
    lo, hi = at("2024-03-01T00:00:00+01:00"), at("2024-04-01T00:00:00+02:00")
    usable = usable_levels(WindowSize.DAY, "Europe/Berlin", lo, hi)
    assert usable == {"m1", "q15", "h1"}
    assert carve(lo, hi, usable).levels == {"h1": [(lo, hi)]}


def test_kolkata_and_kathmandu_days_need_quarter_hours() -> None:
    for zone, start in (("Asia/Kolkata", "2024-03-01T00:00:00+05:30"), ("Asia/Kathmandu", "2024-03-01T00:00:00+05:45")):
        lo = at(start)
        hi = lo + timedelta(days=30)
        usable = usable_levels(WindowSize.DAY, zone, lo, hi)
        assert usable == {"m1", "q15"}, zone
        assert carve(lo, hi, usable).levels == {"q15": [(lo, hi)]}, zone


def test_utc_days_carve_from_minutes_to_days() -> None:
    lo, hi = at("2024-03-01T00:10:30+00:00"), at("2024-03-04T00:00:00+00:00")
    usable = usable_levels(WindowSize.DAY, "UTC", lo, hi)
    assert usable == {"m1", "q15", "h1", "d1"}
    plan = carve(lo, hi, usable)
    assert plan.raw == [(lo, at("2024-03-01T00:11:00+00:00"))]
    assert plan.levels == {
        "m1": [(at("2024-03-01T00:11:00+00:00"), at("2024-03-01T00:15:00+00:00"))],
        "q15": [(at("2024-03-01T00:15:00+00:00"), at("2024-03-01T01:00:00+00:00"))],
        "h1": [(at("2024-03-01T01:00:00+00:00"), at("2024-03-02T00:00:00+00:00"))],
        "d1": [(at("2024-03-02T00:00:00+00:00"), hi)],
    }


def test_a_meter_without_the_hourly_level_goes_from_quarter_hours_to_days() -> None:
    lo, hi = at("2024-03-01T00:15:00+00:00"), at("2024-03-04T00:00:00+00:00")
    plan = carve(lo, hi, {"m1", "q15", "d1"})
    assert plan.levels == {"q15": [(lo, at("2024-03-02T00:00:00+00:00"))],
                           "d1": [(at("2024-03-02T00:00:00+00:00"), hi)]}


def test_minute_windows_use_minutes_only() -> None:
    lo, hi = at("2024-03-01T00:00:00+00:00"), at("2024-03-02T00:00:00+00:00")
    assert usable_levels(WindowSize.MINUTE, "Europe/Berlin", lo, hi) == {"m1"}
    assert usable_levels(WindowSize.HOUR, "Europe/Berlin", lo, hi) == {"m1", "q15", "h1"}
