"""Which rollup level answers which part of a query's time range.

Levels are m1 (minutes), q15 (15 minutes), h1 (hours) and d1 (UTC days), on an
epoch-aligned UTC grid. A level may answer ``[a, b)`` when a and b lie on its grid and so does
every window boundary inside: then each of its buckets falls wholly inside one
window and inside the range. The range is carved from the outside in: the partial
minutes at non-minute-aligned edges are read from raw events, the next partial
quarter hours from m1, the partial hours from q15, the partial days from h1, the
whole days from d1 (a level that is not usable is skipped: each grid contains the
coarser ones):

    [from ... raw ... | m1 ... | q15 ... | h1 ... | d1 ... d1 | h1 ... | q15 ... | m1 ... | raw ... to)

Window boundaries are local whole minutes (MINUTE) or hours (HOUR/DAY/MONTH)
in the query's zone, so whether they sit on a level's grid depends only on the
zone's UTC offsets during the range (:mod:`pgmeter.query.zones`), checked per
query: m1 needs offsets in whole minutes, q15 in multiples of 15 minutes (every
zone since ~1980), h1 in whole hours (all but the :30 and :45 zones such as
Asia/Kolkata and Asia/Kathmandu; Europe/Berlin's days, DST included, are whole h1
buckets), d1 needs UTC+0 throughout and DAY or MONTH windows. Queries
without windows have no inner boundaries, so every level serves them.

dz is the local day of one of the meter's zones (refresher.dayZones): it serves DAY
and MONTH windows in exactly that zone, innermost, where d1 would in UTC. Its rows
are exact for days whose boundaries lie on the 15-minute grid (they may have been
filled from q15), and the planner computes local midnights with zoneinfo as
Postgres' date_trunc('day', t, zone) does, so it also needs every local midnight of
the range to exist once (no DST change at midnight, as some zones had).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from pgmeter.query.params import WindowSize
from pgmeter.query.zones import offset_table

# Finest first: each level is only tried inside the range the finer one covers. dz's
# grid is the local days of the query's zone (step 0: not a fixed step).
LEVELS: tuple[tuple[str, int], ...] = (("m1", 60), ("q15", 15 * 60), ("h1", 3600), ("d1", 24 * 3600), ("dz", 0))
DAY = timedelta(days=1)


@dataclass
class Plan:
    # Rollup level -> the [lo, hi) intervals it answers (None: unbounded).
    levels: dict[str, list[tuple[datetime | None, datetime | None]]] = field(default_factory=dict)
    # Intervals answered from merged raw events (the partial minutes at the edges).
    raw: list[tuple[datetime | None, datetime | None]] = field(default_factory=list)


def _floor(t: datetime | None, step: int) -> datetime | None:
    if t is None:
        return None
    seconds = int(t.timestamp() // 1)
    return datetime.fromtimestamp(seconds - seconds % step, UTC)


def _ceil(t: datetime | None, step: int) -> datetime | None:
    if t is None:
        return None
    floored = _floor(t, step)
    assert floored is not None
    return floored if floored == t else datetime.fromtimestamp(floored.timestamp() + step, UTC)


def _nonempty(lo: datetime | None, hi: datetime | None) -> bool:
    return lo is None or hi is None or lo < hi


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)


def _day_floor(t: datetime | None, zone: ZoneInfo) -> datetime | None:
    """The start of ``t``'s local day, as an instant (date_trunc('day', t, zone))."""
    return None if t is None else _midnight(t.astimezone(zone).date(), zone)


def _day_ceil(t: datetime | None, zone: ZoneInfo) -> datetime | None:
    floored = _day_floor(t, zone)
    if t is None or floored == t:
        return floored
    return _midnight(t.astimezone(zone).date() + DAY, zone)


def _midnights_defined(zone: ZoneInfo, lo: datetime, hi: datetime) -> bool:
    """Whether every local midnight from ``lo``'s day to ``hi``'s next one exists and
    happens once, so local days have one start instant that Python and Postgres agree on."""
    day, last = lo.astimezone(zone).date(), hi.astimezone(zone).date() + DAY
    while day <= last:
        wall = datetime(day.year, day.month, day.day, tzinfo=zone)
        if (wall.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != wall.replace(tzinfo=None)
                or wall.replace(fold=1).utcoffset() != wall.utcoffset()):
            return False
        day += DAY
    return True


def usable_levels(window: WindowSize | None, zone: str, lo: datetime | None, hi: datetime | None,
                  day_zones: tuple[str, ...] = ()) -> set[str]:
    """The levels whose grid holds every window boundary of ``[lo, hi)`` in ``zone``;
    ``day_zones`` are the zones the meter keeps a local-day level (dz) of."""
    if window is None:
        return {name for name, _ in LEVELS if name != "dz"}
    table = offset_table(zone)
    if table is None:
        return set()
    offsets = table.offsets_between(lo, hi)
    usable = set()
    if all(offset % 60 == 0 for offset in offsets):
        usable.add("m1")
        if window is not WindowSize.MINUTE and all(offset % 900 == 0 for offset in offsets):
            usable.add("q15")
            if all(offset % 3600 == 0 for offset in offsets):
                usable.add("h1")
                if window in (WindowSize.DAY, WindowSize.MONTH) and offsets == {0}:
                    usable.add("d1")
            if (window in (WindowSize.DAY, WindowSize.MONTH) and zone in day_zones and "d1" not in usable
                    and lo is not None and hi is not None and _midnights_defined(ZoneInfo(zone), lo, hi)):
                usable.add("dz")
    return usable


def carve(lo: datetime | None, hi: datetime | None, usable: set[str], zone: str | None = None) -> Plan:
    """Split ``[lo, hi)`` between raw events and the usable levels, coarsest inside
    (``zone``: the query's, for the local-day level dz)."""
    plan = Plan()
    current: str | None = None  # None: raw events
    pieces: list[tuple[str | None, datetime | None, datetime | None]] = []
    for name, step in LEVELS:
        if name not in usable:
            continue
        if name == "dz":
            assert zone is not None
            inner_lo, inner_hi = _day_ceil(lo, ZoneInfo(zone)), _day_floor(hi, ZoneInfo(zone))
        else:
            inner_lo, inner_hi = _ceil(lo, step), _floor(hi, step)
        if not _nonempty(inner_lo, inner_hi):
            break
        if lo is not None and inner_lo is not None and lo < inner_lo:
            pieces.append((current, lo, inner_lo))
        if hi is not None and inner_hi is not None and inner_hi < hi:
            pieces.append((current, inner_hi, hi))
        lo, hi, current = inner_lo, inner_hi, name
    if _nonempty(lo, hi):
        pieces.append((current, lo, hi))
    for level, a, b in pieces:
        if level is None:
            plan.raw.append((a, b))
        else:
            plan.levels.setdefault(level, []).append((a, b))
    return plan
