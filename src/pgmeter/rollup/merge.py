"""Merge one seq range of events into one meter's rollup (sql/templates/merge.sql).

The statement reads the events with ``lo < seq <= hi`` of the meter's type once,
extracts values with jsonb operators (paths are bind parameters) and upserts
every level (and the subject-only levels and UNIQUE_COUNT sets where they
exist). The caller runs it in the transaction that also moves the meter's
``last_seq`` to ``hi``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from pgmeter.rollup import floor, objects, templates
from pgmeter.rollup.objects import Rollup

# Rendered statements by (meter id, version, hourly): a version's definition never
# changes.
_statements: dict[tuple[str, int, bool], str] = {}


def _statement(rollup: Rollup) -> str:
    key = (rollup.meter_id, rollup.version, rollup.hourly)
    if key not in _statements:
        _statements[key] = _render(rollup)
    return _statements[key]


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
    state = rollup.state
    group_key = objects.group_key(len(rollup.group_keys))
    unique_ctes = ""
    if rollup.unique:
        unique_ctes = templates.render(
            "unique_merge", um1=rollup.table("um1"), uq15=rollup.table("uq15"), ud1=rollup.table("ud1"),
            group_key=group_key)
    subject_ctes = ""
    if rollup.subject_levels:
        subject_ctes = templates.render(
            "subject_merge", q15s=rollup.table("q15s"), d1s=rollup.table("d1s"),
            combine=objects.combine(state), state_names=objects.state_names(state), merge=objects.merge_set(state))
    hour_ctes = ""
    if rollup.hourly:
        parts = [templates.render(
            "hour_merge", h1=rollup.table("h1"), key=objects.unique_key(len(rollup.group_keys)),
            group_key=group_key, combine=objects.combine(state), state_names=objects.state_names(state),
            merge=objects.merge_set(state))]
        if rollup.subject_levels:
            parts.append(templates.render(
                "hour_subject_merge", h1s=rollup.table("h1s"), combine=objects.combine(state),
                state_names=objects.state_names(state), merge=objects.merge_set(state)))
        if rollup.unique:
            parts.append(templates.render("hour_unique_merge", uh1=rollup.table("uh1"), group_key=group_key))
        hour_ctes = "\n".join(parts)
    return templates.render(
        "merge",
        hour_ctes=hour_ctes,
        lo="$1", hi="$2", namespace="$3", event_type="$4", time_floor="$5::timestamptz",
        event_from_filter=objects.event_from_filter(rollup.event_from, event_from),
        group_values=objects.group_values(group_paths),
        event_values=objects.event_values(state, rollup.unique, value_path),
        group_key=group_key,
        key=objects.unique_key(len(rollup.group_keys)),
        event_state=objects.event_state(state),
        unique_value=", u" if rollup.unique else "",
        combine=objects.combine(state),
        state_names=objects.state_names(state),
        merge=objects.merge_set(state),
        m1=rollup.table("m1"), q15=rollup.table("q15"), d1=rollup.table("d1"),
        subject_ctes=subject_ctes,
        unique_ctes=unique_ctes,
    )


def _params(rollup: Rollup, lo: int, hi: int, time_floor: datetime) -> list[Any]:
    params: list[Any] = [lo, hi, rollup.namespace, rollup.event_type, time_floor]
    if rollup.event_from is not None:
        params.append(rollup.event_from)
    if rollup.value_path is not None:
        params.append(rollup.value_path)
    params.extend(rollup.group_paths)
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
