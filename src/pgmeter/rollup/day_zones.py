"""The local-day levels of the operator's zones (``refresher.dayZones``).

A DAY query in Europe/Berlin cannot read the UTC-day level: its days start at 22:00
or 23:00 UTC and last 23, 24 or 25 hours. With a day level per zone (``dz``, and
``dzs``/``udz`` beside the subject-only and UNIQUE_COUNT levels), it reads one row
per local day and key, as a UTC query reads d1.

The refresher keeps a meter's zones equal to its configuration, in the transaction
of a merge and under the meter's row lock: it creates the tables the first time,
fills a newly added zone from the 15-minute level (exact at ``last_seq``, which the
same transaction holds), deletes the rows of a dropped zone and records the list in
``meter_rollups.day_zones``. From then on each merge upserts every listed zone.
Queries read a zone's rows only when the zone is listed in their own snapshot, so
they never see a half-filled zone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import asyncpg

from pgmeter.rollup import objects, templates
from pgmeter.rollup.objects import Rollup

log = logging.getLogger(__name__)

# Each zone level, the UTC level it copies the shape of, and the 15-minute level a
# new zone is filled from.
_LEVELS = (("dz", "d1", "q15"), ("dzs", "d1s", "q15s"), ("udz", "ud1", "uq15"))


def _present(rollup: Rollup) -> list[tuple[str, str, str]]:
    """The zone levels this meter has: dzs with group-by keys, udz for UNIQUE_COUNT."""
    return [(level, model, source) for level, model, source in _LEVELS
            if level == "dz" or (level == "dzs" and rollup.subject_levels) or (level == "udz" and rollup.unique)]


async def known_zones(conn: asyncpg.Connection, zones: Sequence[str]) -> tuple[str, ...]:
    """The configured zones this server's time zone database knows. Configuration checks
    names against Python's (zoneinfo); a zone Postgres lacks would fail every merge and set
    every meter aside, so it is left out, with a warning, instead."""
    known = {row[0] for row in await conn.fetch(
        "SELECT name FROM pg_timezone_names WHERE name = ANY($1::text[])", list(zones))}
    for zone in zones:
        if zone not in known:
            log.warning("refresher.dayZones: this Postgres does not know the zone; no day level for it",
                        extra={"zone": zone})
    return tuple(zone for zone in zones if zone in known)


async def sync(conn: asyncpg.Connection, rollup: Rollup, wanted: tuple[str, ...]) -> Rollup:
    """Make the meter's zone levels hold exactly the zones ``wanted`` (sorted);
    returns the rollup with its new zone list. The caller holds the meter's row lock."""
    if rollup.day_zones == wanted:
        return rollup
    levels = _present(rollup)
    n = len(rollup.group_keys)
    if await conn.fetchval("SELECT to_regclass($1) IS NULL", rollup.table("dz").as_string()):
        for level, model, _ in levels:
            key = objects.unique_key(0 if level == "dzs" else n) + (", (md5(value)::uuid)" if level == "udz" else "")
            await conn.execute(templates.render("zone_levels", table=rollup.table(level), model=rollup.table(model),
                                                key=key))
    dropped = sorted(set(rollup.day_zones) - set(wanted))
    added = sorted(set(wanted) - set(rollup.day_zones))
    state = rollup.state
    for level, _, source in levels:
        table = rollup.table(level)
        # Rows of a zone not listed are never read; deleting them also clears what a
        # refresher removed earlier, so a zone added again starts from nothing.
        await conn.execute(f"DELETE FROM {table.as_string()} WHERE zone = ANY($1::text[])", [*dropped, *added])
        for zone in added:
            if level == "udz":
                fill = templates.render("zone_unique_fill", table=table, source=rollup.table(source),
                                        zone="$1::text", group_key=objects.group_key(n))
            else:
                fill = templates.render(
                    "zone_fill", table=table, source=rollup.table(source), zone="$1::text",
                    group_key=objects.group_key(0 if level == "dzs" else n), combine=objects.combine(state),
                    state_names=objects.state_names(state))
            await conn.execute(fill, zone)
    await conn.execute("UPDATE meter_rollups SET day_zones = $2 WHERE meter_id = $1", rollup.meter_id, list(wanted))
    return dataclasses.replace(rollup, day_zones=wanted)
