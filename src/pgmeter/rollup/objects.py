"""A meter's rollup objects: names, creation, rebuild and removal.

Each active meter has one ``meter_rollups`` row and, per version, four rollup
levels (``rollup.m1_<id>_v<n>``, ``q15_…``, ``h1_…``, ``d1_…``), subject-only copies
of the coarse levels when it has group-by keys (``q15s_…``, ``h1s_…``, ``d1s_…``),
four set tables for UNIQUE_COUNT (``um1_…`` …) and a view ``meters.<slug>``. The
local-day levels of the configured zones (``dz_…``, ``dzs_…``, ``udz_…``) are the
refresher's to create and fill (:mod:`pgmeter.rollup.day_zones`). The version bumps when
the definition changes (a PUT that changes groupBy): the new tables start empty
at ``last_seq = 0`` and are backfilled by the refresher, while queries stay exact
because they add every event not merged yet.

Everything here runs inside the caller's transaction, so a meter and its objects
appear and disappear together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from psycopg import sql

from pgmeter.meters.model import Aggregation, MeterSpec
from pgmeter.meters.ulid import is_ulid
from pgmeter.rollup import templates
from pgmeter.rollup.states import State, state_for

SCHEMA = "rollup"
VIEW_SCHEMA = "meters"
DEFAULT_NAMESPACE = "default"
MAX_IDENTIFIER = 63  # Postgres truncates longer names; never let it


@dataclass(frozen=True)
class Rollup:
    """One meter's rollup, as recorded in ``meter_rollups``."""

    meter_id: str
    version: int
    namespace: str
    event_type: str
    aggregation: Aggregation
    event_from: datetime | None
    value_path: list[str] | None
    group_keys: list[str]
    group_paths: list[list[str]]
    view_name: str
    last_seq: int
    # Whether the hourly levels (h1, h1s, uh1) exist: meters created before them
    # have none (sql/012_hourly_levels.sql).
    hourly: bool = True
    # The zones whose local-day levels (dz, dzs, udz) are exact at last_seq, sorted;
    # kept by the refresher (pgmeter.rollup.day_zones, sql/013_day_zones.sql).
    day_zones: tuple[str, ...] = ()

    @classmethod
    def from_row(cls, row: asyncpg.Record | dict[str, Any]) -> Rollup:
        paths = row["group_paths"]
        return cls(
            meter_id=row["meter_id"], version=row["version"], namespace=row["namespace"],
            event_type=row["event_type"], aggregation=Aggregation(row["aggregation"]),
            event_from=row["event_from"],
            value_path=list(row["value_path"]) if row["value_path"] is not None else None,
            group_keys=list(row["group_keys"]),
            group_paths=json.loads(paths) if isinstance(paths, str) else paths,
            view_name=row["view_name"], last_seq=row["last_seq"], hourly=row["hourly"],
            day_zones=tuple(row["day_zones"]),
        )

    @property
    def state(self) -> State:
        return state_for(self.aggregation)

    @property
    def unique(self) -> bool:
        return self.aggregation is Aggregation.UNIQUE_COUNT

    @property
    def subject_levels(self) -> bool:
        """Whether q15s/d1s exist (without group-by keys, q15/d1 are keyed by subject alone)."""
        return bool(self.group_keys)

    def column_of(self, key: str) -> str:
        """The rollup column (``g1``…) that holds group-by key ``key``."""
        return f"g{self.group_keys.index(key) + 1}"

    def table(self, level: str) -> sql.Identifier:
        """``rollup.<level>_<id>_v<version>`` for one of :data:`LEVEL_NAMES`."""
        return table_name(self.meter_id, self.version, level)


# Everything needed to select and read the rollup, in one row.
ROLLUP_COLUMNS = ("meter_id, version, namespace, event_type, aggregation, event_from, value_path, "
                  "group_keys, group_paths::text AS group_paths, view_name, last_seq, hourly, day_zones")

# Every table a meter version may have: the levels, their subject-only copies ("s")
# and UNIQUE_COUNT sets ("u"); dz is the local day in each of the meter's zones.
LEVEL_NAMES = ("m1", "q15", "h1", "d1", "dz", "q15s", "h1s", "d1s", "dzs", "um1", "uq15", "uh1", "ud1", "udz")


def table_name(meter_id: str, version: int, level: str) -> sql.Identifier:
    if not is_ulid(meter_id):  # names are built from ids we generated; check anyway
        raise ValueError(f"not a meter id: {meter_id!r}")
    if level not in LEVEL_NAMES:
        raise ValueError(f"unknown rollup level {level!r}")
    return sql.Identifier(SCHEMA, f"{level}_{meter_id.lower()}_v{int(version)}")


def view_name(namespace: str, slug: str, meter_id: str) -> str:
    """The meter's view in schema ``meters``: the slug, or ``<namespace>__<slug>``.

    Slugs never contain ``__``, so the two forms cannot collide. When the name
    would exceed Postgres' identifier limit, the meter id is used (``@<id>``,
    a form no slug can take).
    """
    name = slug if namespace == DEFAULT_NAMESPACE else f"{namespace}__{slug}"
    if len(name.encode()) > MAX_IDENTIFIER:
        name = f"@{meter_id}"
    return name


def _definition(spec: MeterSpec) -> tuple[list[str] | None, list[str], list[list[str]]]:
    keys = sorted(spec.group_by)
    paths = spec.group_paths()
    return spec.value_path(), keys, [paths[key] for key in keys]


# ----------------------------------------------------------------------------------
# SQL fragments shared by the merge, the views and the query engine.

def path_param(path: list[str] | None, placeholder: str | None) -> sql.Composable:
    """A jsonb path: a bind parameter placeholder (``$6``) or, in DDL, a literal."""
    if placeholder is not None:
        return sql.SQL(f"{placeholder}::text[]")
    return sql.SQL("{}::text[]").format(sql.Literal(path))


def group_values(paths: list[sql.Composable], source: str = "data") -> sql.Composable:
    """``, pgmeter_group_value(data #> p1) COLLATE "C" AS g1, ...``"""
    return templates.join([
        sql.SQL('pgmeter_group_value({} #> {}) COLLATE "C" AS {}').format(
            sql.Identifier(source), path, sql.Identifier(f"g{i + 1}"))
        for i, path in enumerate(paths)
    ])


def text_key(column: str) -> str:
    """A text key as the unique indexes hold it: its md5 as a uuid (16 bytes).

    The index holds hashes, never the texts: a subject or group value may be any
    length (a btree entry over ~2.7 KB fails), and the texts stay whole in the row.
    """
    return f"(md5({column})::uuid)"


def unique_key(count: int) -> str:
    """The rollup tables' unique index (and ON CONFLICT target): ``(md5(subject)::uuid),
    bucket, (md5(g1)::uuid), ...``, in the order of the former primary key on the texts."""
    return ", ".join([text_key("subject"), "bucket", *(text_key(f"g{i + 1}") for i in range(count))])


def group_key(count: int, prefix: str = "") -> str:
    """``, g1, g2`` (optionally qualified, ``, p.g1``)."""
    return "".join(f", {prefix}g{i + 1}" for i in range(count))


def event_values(rollup_state: State, unique: bool, value_path: sql.Composable | None) -> sql.Composable:
    """The per-event columns the aggregation reads: v (number), t and seq, u (unique)."""
    parts: list[sql.Composable] = []
    if rollup_state.needs_number:
        assert value_path is not None
        parts.append(sql.SQL("pgmeter_number(data #> {}) AS v").format(value_path))
    if rollup_state.needs_time:
        parts += [sql.SQL("date_trunc('second', time) AS t"), sql.SQL("seq")]
    if unique:
        assert value_path is not None
        parts.append(sql.SQL('pgmeter_unique_value(data #> {}) COLLATE "C" AS u').format(value_path))
    return templates.join(parts)


def event_state(state: State) -> str:
    return "".join(f", {expr} AS {name}" for expr, name in zip(state.from_event, state.names, strict=False))


def combine(state: State) -> str:
    return "".join(f", {expr} AS {name}" for expr, name in zip(state.combine, state.names, strict=False))


def state_names(state: State, prefix: str = "") -> str:
    return "".join(f", {prefix}{name}" for name in state.names)


def merge_set(state: State) -> str:
    return "".join(f", {name} = {expr}" for name, expr in zip(state.names, state.merge, strict=False))


def event_from_filter(event_from: datetime | None, placeholder: str | None) -> sql.Composable:
    if event_from is None:
        return sql.SQL("")
    if placeholder is not None:
        return sql.SQL(f"AND time >= {placeholder}::timestamptz")
    return sql.SQL("AND time >= {}::timestamptz").format(sql.Literal(event_from))


# ----------------------------------------------------------------------------------
# DDL

def _ddl(rollup: Rollup) -> list[str]:
    state = rollup.state
    n = len(rollup.group_keys)
    group_columns = "".join(f'g{i + 1} text COLLATE "C" NOT NULL, ' for i in range(n))
    state_columns = "".join(f", {name} {kind}" for name, kind in state.columns)
    statements = [templates.render(
        "rollup_tables", m1=rollup.table("m1"), q15=rollup.table("q15"), d1=rollup.table("d1"),
        group_columns=group_columns, key=unique_key(n), state_columns=state_columns)]
    if rollup.subject_levels:
        statements.append(templates.render(
            "subject_levels", q15s=rollup.table("q15s"), d1s=rollup.table("d1s"), state_columns=state_columns))
    if rollup.unique:
        statements.append(templates.render(
            "unique_sets", um1=rollup.table("um1"), uq15=rollup.table("uq15"), ud1=rollup.table("ud1"),
            group_columns=group_columns, key=unique_key(n)))
    if rollup.hourly:
        for level, model in (("h1", "q15"), ("h1s", "q15s"), ("uh1", "uq15")):
            if level == "h1" or (level == "h1s" and rollup.subject_levels) or (level == "uh1" and rollup.unique):
                statements.append(templates.render("hour_level", table=rollup.table(level),
                                                   model=rollup.table(model)))
    statements.append(_view_ddl(rollup))
    return statements


def _view_columns(rollup: Rollup) -> sql.Composable:
    """``, p.g1 AS "model"``: group columns named after their keys.

    A key that would shadow a fixed column gets a ``group_`` prefix.
    """
    fixed = {"window_start", "window_end", "subject", "value"}
    parts: list[sql.Composable] = []
    for i, key in enumerate(rollup.group_keys):
        name = f"group_{key}" if key in fixed else key
        parts.append(sql.SQL("p.{} AS {}").format(sql.Identifier(f"g{i + 1}"), sql.Identifier(name)))
    return templates.join(parts)


def _view_ddl(rollup: Rollup) -> str:
    state = rollup.state
    n = len(rollup.group_keys)
    value_path = path_param(rollup.value_path, None) if rollup.value_path is not None else None
    common: dict[str, sql.Composable | str] = dict(
        view=sql.Identifier(VIEW_SCHEMA, rollup.view_name), m1=rollup.table("m1"),
        meter_id=sql.Literal(rollup.meter_id), namespace=sql.Literal(rollup.namespace),
        event_type=sql.Literal(rollup.event_type),
        event_from_filter=event_from_filter(rollup.event_from, None),
        group_values=group_values([path_param(p, None) for p in rollup.group_paths]),
        group_key=group_key(n), group_columns_named=_view_columns(rollup),
        event_values=event_values(state, rollup.unique, value_path),
    )
    if rollup.unique:
        return templates.render("view_unique", um1=rollup.table("um1"), **common)
    return templates.render(
        "view", event_state=event_state(state), state_names=state_names(state), final=state.final,
        having="" if state.reports_empty else f"HAVING {state.final} IS NOT NULL", **common)


async def _head_seq(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_sequence_last_value('events_seq')") or 0)


def definition(meter_id: str, namespace: str, slug: str, spec: MeterSpec, *, version: int = 1) -> Rollup:
    """The rollup a meter definition calls for, with nothing merged yet."""
    value_path, keys, paths = _definition(spec)
    return Rollup(
        meter_id=meter_id, version=version, namespace=namespace, event_type=spec.event_type,
        aggregation=spec.aggregation, event_from=spec.event_from, value_path=value_path,
        group_keys=keys, group_paths=paths, view_name=view_name(namespace, slug, meter_id), last_seq=0,
    )


async def create(conn: asyncpg.Connection, meter_id: str, namespace: str, slug: str, spec: MeterSpec,
                 *, version: int = 1) -> Rollup:
    """Create the objects of a new meter (or of a new version) and its progress row."""
    rollup = definition(meter_id, namespace, slug, spec, version=version)
    for statement in _ddl(rollup):
        await conn.execute(statement)
    await conn.execute(
        """
        INSERT INTO meter_rollups (meter_id, version, namespace, event_type, aggregation, event_from,
                                   value_path, group_keys, group_paths, view_name, last_seq, built_at_seq, hourly)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::jsonb, $10, 0, $11, true)
        ON CONFLICT (meter_id) DO UPDATE
           SET version = excluded.version, group_keys = excluded.group_keys,
               group_paths = excluded.group_paths, view_name = excluded.view_name,
               last_seq = 0, built_at_seq = excluded.built_at_seq, merged_at = NULL, hourly = true,
               day_zones = '{}'
        """,
        meter_id, version, namespace, spec.event_type, str(spec.aggregation), spec.event_from,
        rollup.value_path, rollup.group_keys, json.dumps(rollup.group_paths), rollup.view_name,
        await _head_seq(conn),
    )
    return rollup


async def lock(conn: asyncpg.Connection, meter_id: str) -> Rollup | None:
    """Lock the meter's progress row; waits for a refresher merging it to commit."""
    row = await conn.fetchrow(
        f"SELECT {ROLLUP_COLUMNS} FROM meter_rollups WHERE meter_id = $1 FOR UPDATE", meter_id)
    return Rollup.from_row(row) if row else None


async def _drop_objects(conn: asyncpg.Connection, rollup: Rollup) -> None:
    await conn.execute(templates.render(
        "drop", view=sql.Identifier(VIEW_SCHEMA, rollup.view_name),
        **{level: rollup.table(level) for level in LEVEL_NAMES}))


async def drop(conn: asyncpg.Connection, meter_id: str) -> None:
    """Drop every object of a meter and its progress row."""
    rollup = await lock(conn, meter_id)
    if rollup is None:
        return
    await _drop_objects(conn, rollup)
    await conn.execute("DELETE FROM meter_rollups WHERE meter_id = $1", meter_id)


async def rebuild(conn: asyncpg.Connection, meter_id: str, namespace: str, slug: str,
                  spec: MeterSpec) -> Rollup:
    """Replace the objects with a new, empty version for a changed definition."""
    old = await lock(conn, meter_id)
    version = 1
    if old is not None:
        await _drop_objects(conn, old)
        version = old.version + 1
    return await create(conn, meter_id, namespace, slug, spec, version=version)


async def load(conn: asyncpg.Connection, meter_id: str) -> Rollup | None:
    row = await conn.fetchrow(f"SELECT {ROLLUP_COLUMNS} FROM meter_rollups WHERE meter_id = $1", meter_id)
    return Rollup.from_row(row) if row else None
