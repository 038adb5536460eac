"""Merge one seq range of events into one meter's rollup (sql/templates/merge.sql).

The statement reads the events with ``lo < seq <= hi`` of the meter's type once,
extracts values with jsonb operators (paths are bind parameters) and upserts
every level (and the subject-only levels, the local days of the meter's zones and
UNIQUE_COUNT sets where they exist). The caller runs it in the transaction that also moves the meter's
``last_seq`` to ``hi``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from pgmeter.rollup import floor, objects, templates
from pgmeter.rollup.objects import Rollup

# Rendered statements by (meter id, version, hourly, zoned): a version's definition
# never changes; whether it has hourly or zone levels is part of the key.
_statements: dict[tuple[str, int, bool, bool], str] = {}

# The rollup grid's origin, as in merge.sql.
_ORIGIN = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"
# The coarse levels on the UTC grid and their grain.
_GRAINS = (("q15", "15 minutes"), ("h1", "1 hour"), ("d1", "1 day"))


def _statement(rollup: Rollup) -> str:
    key = (rollup.meter_id, rollup.version, rollup.hourly, bool(rollup.day_zones))
    if key not in _statements:
        _statements[key] = _render(rollup)
    return _statements[key]


def _levels(rollup: Rollup, zones: str | None) -> list[tuple[str, str, str]]:
    """(level, bucket expression, FROM addition) of every coarse level the meter has:
    the UTC grains, then the local day of each zone (the CROSS JOIN over the zones
    parameter ``zones``)."""
    levels = [(level, f"date_bin('{grain}', bucket, {_ORIGIN})", "")
              for level, grain in _GRAINS if level != "h1" or rollup.hourly]
    if zones is not None:
        levels.append(("dz", "date_trunc('day', bucket, z.zone)", f" CROSS JOIN unnest({zones}) AS z (zone)"))
    return levels


def _level_ctes(rollup: Rollup, zones: str | None) -> str:
    """The upserts of the coarse levels (level_merge.sql, level_unique_merge.sql)."""
    state = rollup.state
    n = len(rollup.group_keys)
    group_key = objects.group_key(n)
    fragments = dict(combine=objects.combine(state), state_names=objects.state_names(state),
                     merge=objects.merge_set(state))
    ctes = []
    for level, bucket, cross in _levels(rollup, zones):
        zoned = dict(zone_column="zone, " if cross else "", zone="z.zone, " if cross else "", zones=cross)
        prefix = "zone, " if cross else ""
        ctes.append(templates.render("level_merge", cte=f"up_{level}", table=rollup.table(level), bucket=bucket,
                                     key=prefix + objects.unique_key(n), group_key=group_key, **zoned, **fragments))
        if rollup.subject_levels:
            ctes.append(templates.render(
                "level_merge", cte=f"up_{level}s", table=rollup.table(level + "s"), bucket=bucket,
                key=prefix + objects.unique_key(0), group_key="", **zoned, **fragments))
    if rollup.unique:
        for level, bucket, cross in [("m1", "bucket", ""), *_levels(rollup, zones)]:
            ctes.append(templates.render(
                "level_unique_merge", cte=f"up_u{level}", table=rollup.table("u" + level), bucket=bucket,
                group_key=group_key, zone_column="zone, " if cross else "", zone="z.zone, " if cross else "",
                zones=cross))
    return "\n".join(ctes)


def _render(rollup: Rollup) -> str:
    # Bind parameters: $1 lo, $2 hi, $3 namespace, $4 type, $5 time floor, then the
    # optional ones in the order _params() appends them.
    n = 5
    event_from = None
    if rollup.event_from is not None:
        n += 1
        event_from = f"${n}"
    value_path = None
    if rollup.value_path is not None:
        n += 1
        value_path = objects.path_param(None, f"${n}")
    group_paths = []
    for _ in rollup.group_paths:
        n += 1
        group_paths.append(objects.path_param(None, f"${n}"))
    zones = None
    if rollup.day_zones:
        n += 1
        zones = f"${n}::text[]"
    state = rollup.state
    return templates.render(
        "merge",
        level_ctes=_level_ctes(rollup, zones),
        lo="$1", hi="$2", namespace="$3", event_type="$4", time_floor="$5::timestamptz",
        event_from_filter=objects.event_from_filter(rollup.event_from, event_from),
        group_values=objects.group_values(group_paths),
        event_values=objects.event_values(state, rollup.unique, value_path),
        group_key=objects.group_key(len(rollup.group_keys)),
        key=objects.unique_key(len(rollup.group_keys)),
        event_state=objects.event_state(state),
        unique_value=", u" if rollup.unique else "",
        combine=objects.combine(state),
        state_names=objects.state_names(state),
        merge=objects.merge_set(state),
        m1=rollup.table("m1"),
    )


def _params(rollup: Rollup, lo: int, hi: int, time_floor: datetime) -> list[Any]:
    params: list[Any] = [lo, hi, rollup.namespace, rollup.event_type, time_floor]
    if rollup.event_from is not None:
        params.append(rollup.event_from)
    if rollup.value_path is not None:
        params.append(rollup.value_path)
    params.extend(rollup.group_paths)
    if rollup.day_zones:
        params.append(list(rollup.day_zones))
    return params


async def merge_range(conn: asyncpg.Connection, rollup: Rollup, lo: int, hi: int) -> int:
    """Merge events ``lo < seq <= hi``; returns how many of them the meter counted.

    The events' least time (:func:`pgmeter.rollup.floor.time_floor`, read first, in
    this transaction: every event up to ``hi`` is committed, so its floor row is
    visible) bounds the scan to the partitions that can hold them; with no event of
    the meter's type after ``lo`` there is nothing to read at all.
    """
    time_floor = await floor.time_floor(conn, rollup.namespace, rollup.event_type, lo)
    if time_floor is None:
        return 0
    return int(await conn.fetchval(_statement(rollup), *_params(rollup, lo, hi, time_floor)))
