"""Meter queries: rollups plus the events not merged yet, in one snapshot.

:func:`run_query` is the entry point every reader shares (the API, the cache, the
Lago sync). One REPEATABLE READ transaction reads the meter's watermark
(``meter_rollups.last_seq``), the rollup rows the plan picks (:mod:`.plan`), the
merged raw events of the partial minutes at the edges, and the tail: every event
of the meter with ``seq > last_seq`` in the range. The watermark commits together
with the rollup rows it covers, so rollup and tail neither overlap nor leave a
gap, late events included, and an event counts as soon as the sink commits it.

All rows, rolled up or raw, carry the same mergeable state
(:mod:`pgmeter.rollup.states`) and are combined by one GROUP BY per window and
group. Values from the request are bind parameters; only fixed fragments and
quoted identifiers are written into the SQL text.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any, NamedTuple, TypeAlias, TypeVar

import asyncpg
from prometheus_client import Histogram
from psycopg import sql

from pgmeter.meters.store import Meter
from pgmeter.metric_labels import tenant
from pgmeter.query import filters as string_filters
from pgmeter.query.params import (
    QueryError,
    QueryParams,
    QueryResult,
    QueryRow,
    TooManyRows,
    WindowSize,
    validate,
    zone,
)
from pgmeter.query.plan import Plan, carve, usable_levels
from pgmeter.rollup import floor, objects
from pgmeter.rollup.objects import Rollup

QUERY_LATENCY = Histogram(
    "openmeter_query_latency_seconds", "Meter query latency (rollups + tail), by meter",
    ["meter"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
ORIGIN = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"  # the rollup grid's origin (merge.sql)
# Window end from window start: absolute for MINUTE/HOUR (an hour is an hour even
# across a DST change), local calendar arithmetic for DAY/MONTH (23 or 25 hours).
_WINDOW_END = {
    WindowSize.MINUTE: "ws + interval '1 minute'",
    WindowSize.HOUR: "ws + interval '1 hour'",
    WindowSize.DAY: "((ws AT TIME ZONE {tz}) + interval '1 day') AT TIME ZONE {tz}",
    WindowSize.MONTH: "((ws AT TIME ZONE {tz}) + interval '1 month') AT TIME ZONE {tz}",
}
_UTC_NAMES = {"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu",
              "GMT", "Etc/GMT", "Etc/GMT0", "Etc/GMT+0", "Etc/GMT-0", "GMT0", "GMT+0", "GMT-0",
              "Etc/Greenwich", "Greenwich"}

Db: TypeAlias = asyncpg.Pool | asyncpg.Connection
T = TypeVar("T")


@asynccontextmanager
async def _snapshot(db: Db) -> AsyncIterator[asyncpg.Connection]:
    """A connection in one REPEATABLE READ snapshot (or the caller's transaction).

    JIT is off for meter queries: a big estimate (a long backfill tail, a wide m1
    range) would otherwise buy a few hundred milliseconds of compilation for a
    statement that runs in tens.
    """
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await _no_jit(conn)
                yield conn
    elif db.is_in_transaction():
        yield db  # the caller chose the snapshot
    else:
        async with db.transaction(isolation="repeatable_read", readonly=True):
            await _no_jit(db)
            yield db


async def _no_jit(conn: asyncpg.Connection) -> None:
    # Custom plans too: meter queries are skewed by subject, and a generic cached plan
    # was measured 30x slower on heavy subjects. Set per transaction, not as a
    # startup parameter, because a transaction pooler (PgBouncer) refuses those.
    await conn.execute("SET LOCAL jit = off; SET LOCAL plan_cache_mode = force_custom_plan")


class Source(NamedTuple):
    """What a meter query reads before its statement, in the same snapshot: the
    meter's rollup (``tables`` False: its definition with nothing merged, for a
    deleted meter) and the least time of the events it has not merged (None: none)."""

    rollup: Rollup
    tables: bool
    tail_floor: datetime | None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Source:
        """From a row of :func:`source_sql`."""
        return cls(Rollup.from_row(row), True, row["tail_floor"])


def source_sql(meter_id: str) -> str:
    """The rollup row of the meter whose id is the SQL expression ``meter_id`` and its
    tail floor (:func:`pgmeter.rollup.floor.floor_sql`), in one statement, so they cost
    one round trip (a value read embeds it in its context statement)."""
    return (f"SELECT {objects.ROLLUP_COLUMNS}, {floor.floor_sql('r.namespace', 'r.event_type', 'r.last_seq')} AS tail_floor "
            f"FROM meter_rollups r WHERE r.meter_id = {meter_id}")


_SOURCE = source_sql("$1")


async def load_source(conn: asyncpg.Connection, meter: Meter) -> Source:
    row = await conn.fetchrow(_SOURCE, meter.id)
    if row is not None:
        return Source.of(row)
    rollup = objects.definition(meter.id, meter.namespace, meter.slug, meter.spec)
    return Source(rollup, False, await floor.time_floor(conn, rollup.namespace, rollup.event_type, rollup.last_seq))


def _floor_second(t: datetime | None) -> datetime | None:
    return None if t is None else t.replace(microsecond=0)


def _effective_from(meter: Meter, params: QueryParams) -> datetime | None:
    """``from`` clamped by the meter's eventFrom, as the caller's instant when it wins."""
    if meter.event_from is None:
        return params.from_
    if params.from_ is None or params.from_ < meter.event_from:
        return meter.event_from
    return params.from_


async def run_query(db: Db, meter: Meter, params: QueryParams, *, max_rows: int | None = None) -> QueryResult:
    """Answer an OpenMeter meter query exactly; raises :class:`QueryError` on bad params.

    With ``max_rows``, an answer of more rows raises :class:`TooManyRows`; at most
    ``max_rows + 1`` rows ever leave Postgres.
    """
    validate(params, meter.group_by)
    return await _retrying(db, meter, params, lambda conn: _run(conn, meter, params, max_rows))


async def usage_in_ranges(db: Db, meter: Meter, params: QueryParams, bounds: Sequence[datetime], *,
                          source: Source | None = None) -> list[Decimal | None]:
    """The meter's value in each ``[bounds[i], bounds[i + 1])``, in one statement and one snapshot.

    For callers that need many adjacent ranges at once (an entitlement value needs
    one per burn phase): a row per range instead of a query per range. ``params``
    gives the subjects, customers and filters; its time range and window must be
    unset, and it must not group (one value per range: several customers or subjects
    are aggregated together). ``None`` where a range has no value (no events, or none
    valid for SUM/MIN/MAX/AVG/LATEST). ``source``, when the caller already read it in
    the snapshot ``db`` is in (a REPEATABLE READ transaction), saves its round trip.
    """
    validate(params, meter.group_by)
    if params.from_ or params.to or params.window_size or params.groups_by_subject or params.meter_keys \
            or len(params.customers) > 1:
        raise ValueError("usage_in_ranges takes filters only")
    if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError("bounds must increase")
    if len(bounds) < 2:
        return []
    return await _retrying(db, meter, params, lambda conn: _ranges(conn, meter, params, list(bounds), source))


async def _retrying(db: Db, meter: Meter, params: QueryParams, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """``work`` in one snapshot, retried when the meter's rollup was rebuilt meanwhile."""
    started = time.perf_counter()
    try:
        for attempt in range(3):
            try:
                async with _snapshot(db) as conn:
                    return await work(conn)
            except asyncpg.UndefinedTableError:
                # The meter's rollup was rebuilt (groupBy changed) between reading its
                # version and reading its tables; the next snapshot sees the new one.
                if attempt == 2:
                    raise
            except asyncpg.InvalidParameterValueError as exc:
                # A zone Python knows but this server's tz database does not.
                if "time zone" in str(exc):
                    raise QueryError("windowTimeZone", f"invalid time zone: {params.window_time_zone!r}") from None
                raise
        raise AssertionError("unreachable")
    finally:
        QUERY_LATENCY.labels(tenant(meter.slug)).observe(time.perf_counter() - started)


async def _ranges(conn: asyncpg.Connection, meter: Meter, params: QueryParams,
                  bounds: list[datetime], source: Source | None) -> list[Decimal | None]:
    rollup, tables, tail_floor = source or await load_source(conn, meter)
    for key in (*params.filter_group_by, *params.advanced_filters):
        if key not in rollup.group_keys:  # the meter changed since the caller read it
            raise QueryError("groupBy", f"invalid group by: {key}")
    # Each range is carved on its own, so no rollup bucket straddles a boundary and
    # width_bucket() of a bucket's start names the range it lies in.
    plan = Plan()
    lo = bounds[0] if meter.event_from is None else max(bounds[0], meter.event_from)
    for a, b in zip(bounds, bounds[1:], strict=False):
        a = max(a, lo)
        if a < b and tables:
            part = carve(a, b, usable_levels(None, "UTC", a, b) - (set() if rollup.hourly else {"h1"}))
            for level, intervals in part.levels.items():
                _extend(plan.levels.setdefault(level, []), intervals)
            _extend(plan.raw, part.raw)
    if lo >= bounds[-1]:
        return [None] * (len(bounds) - 1)
    statement = _Statement(rollup, params, tail_floor, bounds=bounds)
    records = await conn.fetch(statement.aggregate(plan, lo, bounds[-1]), *statement.args)
    found = {record["ws"]: record["value"] for record in records}
    # width_bucket numbers the range [bounds[i], bounds[i+1]) i + 1.
    return [found.get(index + 1) for index in range(len(bounds) - 1)]


async def _run(conn: asyncpg.Connection, meter: Meter, params: QueryParams, max_rows: int | None) -> QueryResult:
    rollup, tables, tail_floor = await load_source(conn, meter)
    for key in (*params.meter_keys, *params.filter_group_by, *params.advanced_filters):
        if key not in rollup.group_keys:  # the meter changed since the caller read it
            raise QueryError("groupBy", f"invalid group by: {key}")
    window = params.window_size
    lo = _floor_second(_effective_from(meter, params))
    hi = _floor_second(params.to)
    records: list[asyncpg.Record] = []
    if lo is None or hi is None or lo < hi:
        if window is not None and (lo is None or hi is None):
            # Window boundaries are checked against the zone's offsets over the data's
            # actual span, not all of time.
            span = await _extent(conn, rollup, tables, lo, hi, tail_floor)
            if span is not None:
                lo, hi = lo or span[0], hi or span[1]
        if lo is None or hi is None or lo < hi:
            plan = _plan(rollup, tables, params, lo, hi)
            statement = _Statement(rollup, params, tail_floor)
            text = statement.aggregate(plan, lo, hi)
            if max_rows is not None:
                text += f"\nLIMIT {statement.param(max_rows + 1, 'bigint')}"
            records = await conn.fetch(text, *statement.args)
            if max_rows is not None and len(records) > max_rows:
                raise TooManyRows(max_rows)
    return QueryResult(rows=_rows(meter, rollup, params, records), watermark=rollup.last_seq)


def _plan(rollup: Rollup, tables: bool, params: QueryParams, lo: datetime | None, hi: datetime | None) -> Plan:
    """Which part of ``[lo, hi)`` each rollup level answers and which raw events do."""
    if not tables:
        return Plan()
    usable = usable_levels(params.window_size, params.window_time_zone, lo, hi, rollup.day_zones)
    if not rollup.hourly:
        usable.discard("h1")  # a meter created before the hourly level
    return carve(lo, hi, usable, params.window_time_zone)


async def _extent(conn: asyncpg.Connection, rollup: Rollup, tables: bool, lo: datetime | None,
                  hi: datetime | None, tail_floor: datetime | None) -> tuple[datetime, datetime] | None:
    """First and last minute (end exclusive) with events of the meter, or None."""
    args: list[Any] = [rollup.namespace, rollup.event_type, rollup.last_seq, tail_floor]
    bounds = ""
    if lo is not None:
        args.append(lo)
        bounds += f" AND time >= ${len(args)}::timestamptz"
    if hi is not None:
        args.append(hi)
        bounds += f" AND time < ${len(args)}::timestamptz"
    tail = (f"SELECT min(time) AS lo, max(time) AS hi FROM events "
            f"WHERE namespace = $1 AND type = $2 AND seq > $3 AND time >= $4::timestamptz{bounds}")
    if tables:
        m1 = objects.table_name(rollup.meter_id, rollup.version, "m1").as_string()
        text = (f"SELECT least(r.lo, t.lo) AS lo, greatest(r.hi, t.hi) AS hi FROM "
                f"(SELECT min(bucket) AS lo, max(bucket) AS hi FROM {m1}) r, ({tail}) t")
    else:
        text = tail
    row = await conn.fetchrow(text, *args)
    if row["lo"] is None:
        return None
    first = row["lo"].replace(second=0, microsecond=0)
    last = row["hi"].replace(second=0, microsecond=0) + MINUTE
    return first, last


def _extend(intervals: list[tuple[datetime | None, datetime | None]],
            more: list[tuple[datetime | None, datetime | None]]) -> None:
    """Append, joining an interval to the last one where they touch (fewer index probes)."""
    for a, b in sorted(more, key=lambda iv: iv[0] or EPOCH):
        if intervals and intervals[-1][1] == a:
            intervals[-1] = (intervals[-1][0], b)
        else:
            intervals.append((a, b))


class _Statement:
    """Builds one query's SQL; values go to ``args`` as bind parameters."""

    def __init__(self, rollup: Rollup, params: QueryParams, tail_floor: datetime | None, *,
                 bounds: list[datetime] | None = None) -> None:
        self.rollup = rollup
        self.params = params
        # The least time of the events not merged yet (None: there are none), read in
        # the query's snapshot; it bounds the tail so partitions are pruned.
        self.tail_floor = tail_floor
        self.state = rollup.state
        self.args: list[Any] = []
        self.window = params.window_size
        self.tz = self.param(params.window_time_zone, "text") if self.window else ""
        # Ranges instead of windows (usage_in_ranges): ws is the range's number.
        self.bounds = self.param(bounds, "timestamptz[]") if bounds else None
        self.subject = params.groups_by_subject
        self.key_columns = [rollup.column_of(key) for key in params.meter_keys]
        self.subject_filter = self._subject_filter(params)
        # Grouped by customer: each subject maps to its customer through two parallel
        # arrays (a subject belongs to at most one live customer).
        self.customer: tuple[str, str] | None = None
        if params.customers:
            pairs = [(key, cid) for cid, keys in params.customers.items() for key in keys]
            self.customer = (self.param([k for k, _ in pairs], "text[]"), self.param([c for _, c in pairs], "text[]"))
        self.group_filters = {rollup.column_of(key): self.param(list(values), "text[]")
                              for key, values in params.filter_group_by.items() if values}
        self.advanced_filters = self._advanced(params)
        # Windowless answers report each group's first and last minute.
        self.extent = self.window is None and self.bounds is None
        # A query that neither groups nor filters by a meter key reads the
        # subject-only coarse levels: one row per subject and bucket.
        self.by_subject_only = (rollup.subject_levels and not self.key_columns and not self.group_filters
                                and not self.advanced_filters)

    def param(self, value: Any, cast: str) -> str:
        self.args.append(value)
        return f"${len(self.args)}::{cast}"

    def _subject_filter(self, params: QueryParams) -> str | None:
        """The subjects to read: those asked for, and of those the filtered customers'
        (both given: both must match, as OpenMeter ANDs them)."""
        if not params.customers:
            return self.param(list(params.subjects), "text[]") if params.subjects else None
        keys = sorted({key for keys in params.customers.values() for key in keys})
        if params.subjects:
            keys = [key for key in keys if key in set(params.subjects)]
        return self.param(keys, "text[]")

    def _grouped(self) -> list[str]:
        """The grouped column names after ``ws``."""
        return (["subject"] if self.subject else []) + (["cust"] if self.customer else []) + self.key_columns

    _COLUMN = "\x00column\x00"  # stands for the (prefixed) group column in compiled filters

    def _advanced(self, params: QueryParams) -> dict[str, str]:
        """advancedMeterGroupByFilters compiled once (values bound once) per group column,
        over the group value text the rollups and the raw branch both carry."""
        compiled = {}
        for key, f in sorted(params.advanced_filters.items()):
            condition = string_filters.compile_sql(f, self._COLUMN, self.param)
            if condition is not None:
                compiled[self.rollup.column_of(key)] = condition
        return compiled

    # -- pieces ------------------------------------------------------------------

    def window_start(self, expr: str, level: str | None = None) -> str:
        if self.bounds is not None:
            return f"width_bucket({expr}, {self.bounds})"
        if self.window is None:
            return "TIMESTAMPTZ 'epoch'"  # one window; a constant keeps joins simple
        if level in ("d1", "dz") and self.window is WindowSize.DAY:
            # The plan uses d1 only at UTC+0 and dz only in its own zone, where their
            # buckets are the days.
            return expr
        return f"date_trunc('{self.window.value.lower()}', {expr}, {self.tz})"

    def group_list(self, prefix: str = "") -> str:
        """``ws, subject, g2`` with the optional prefix on every column."""
        return ", ".join(prefix + column for column in ["ws", *self._grouped()])

    def filters(self, prefix: str) -> list[str]:
        """Subject and group-value filters; on rollup rows (``hashed``) also by the
        texts' md5, which the rollup's unique index holds (the text comparison
        stays: it is what makes the answer exact)."""
        hashed = prefix == "r."
        conditions = []
        filters = ([("subject", self.subject_filter)] if self.subject_filter else []) + list(self.group_filters.items())
        for column, placeholder in filters:
            if hashed:
                conditions.append(f"{objects.text_key(prefix + column)} = ANY({self.hashes(placeholder)})")
            conditions.append(f"{prefix}{column} = ANY({placeholder})")
        for column, condition in self.advanced_filters.items():
            conditions.append(condition.replace(self._COLUMN, prefix + column))
        return conditions

    def hashes(self, placeholder: str) -> str:
        """The md5 keys of a text[] parameter, computed once per statement (an
        InitPlan), so the index can be searched for them."""
        return f"ARRAY(SELECT md5(v)::uuid FROM unnest({placeholder}) v)"

    def tail_bound(self) -> list[str]:
        """The tail's time floor as a condition (``false`` when nothing is unmerged)."""
        if self.tail_floor is None:
            return ["false"]
        return [f"time >= {self.param(self.tail_floor, 'timestamptz')}"]

    def time_range(self, column: str, lo: datetime | None, hi: datetime | None) -> list[str]:
        conditions = []
        if lo is not None:
            conditions.append(f"{column} >= {self.param(lo, 'timestamptz')}")
        if hi is not None:
            conditions.append(f"{column} < {self.param(hi, 'timestamptz')}")
        return conditions

    def selected(self, prefix: str) -> str:
        """``, r.subject, r.g2``: the grouped columns, with the optional prefix."""
        parts = ([f"{prefix}subject"] if self.subject else []) + [f"{prefix}{c}" for c in self.key_columns]
        if self.customer:
            keys, ids = self.customer
            parts.insert(1 if self.subject else 0, f"({ids})[array_position({keys}, {prefix}subject)]")
        return "".join(f", {part}" for part in parts)

    @staticmethod
    def where(conditions: list[str]) -> str:
        return (" WHERE " + " AND ".join(conditions)) if conditions else ""

    def raw_cte(self, plan: Plan, lo: datetime | None, hi: datetime | None) -> str:
        """The raw events the answer needs: merged ones at the edges, all unmerged ones.

        Computes every group column that is grouped or filtered, and the values the
        aggregation reads, each once per event.
        """
        rollup = self.rollup
        needed = sorted({*self.key_columns, *self.group_filters, *self.advanced_filters}, key=lambda c: int(c[1:]))
        groups = "".join(
            f", pgmeter_group_value(data #> {self.param(rollup.group_paths[int(c[1:]) - 1], 'text[]')}) AS {c}"
            for c in needed)
        value_path = (sql.SQL(self.param(rollup.value_path, "text[]"))
                      if rollup.value_path is not None else None)
        values = objects.event_values(self.state, rollup.unique, value_path).as_string()
        minute = f", date_bin('1 minute', time, {ORIGIN}) AS minute" if self.extent else ""
        return "\nUNION ALL\n".join(self.event_branches(f"SELECT subject, time{minute}{groups}{values} FROM events",
                                                          plan, lo, hi))

    def event_scope(self) -> list[str]:
        """The meter's events (of the requested subjects)."""
        scope = [f"namespace = {self.param(self.rollup.namespace, 'text')}",
                 f"type = {self.param(self.rollup.event_type, 'text')}"]
        if self.subject_filter:
            scope.append(f"subject = ANY({self.subject_filter})")
        return scope

    def event_branches(self, head: str, plan: Plan, lo: datetime | None, hi: datetime | None) -> list[str]:
        """``head`` (a SELECT ... FROM events) over the events the rollups do not answer.

        The exactness rule, in one place: merged events (``seq <= last_seq``) where the
        plan left edges to raw events, and every unmerged one (``seq > last_seq``) in
        ``[lo, hi)``. Rollup rows and these neither overlap nor leave a gap, because
        ``last_seq`` commits with the rollup rows it covers.
        """
        scope = self.event_scope()
        last_seq = self.param(self.rollup.last_seq, "bigint")
        branches = [head + self.where(scope + [f"seq <= {last_seq}"] + self.time_range("time", edge_lo, edge_hi))
                    for edge_lo, edge_hi in plan.raw]
        branches.append(head + self.where(scope + [f"seq > {last_seq}"] + self.tail_bound()
                                          + self.time_range("time", lo, hi)))
        return branches

    def rollup_branches(self, plan: Plan, sets: bool) -> list[str]:
        branches = []
        for level, intervals in plan.levels.items():
            if sets:
                table = self.rollup.table("u" + level)
                columns = ", r.value"
            else:
                subject_only = self.by_subject_only and level != "m1"
                table = self.rollup.table(level + "s" if subject_only else level)
                columns = f", r.cnt{objects.state_names(self.state, 'r.')}"
                if self.extent:
                    columns += ", r.bucket, r.bucket" if level == "m1" else ", r.t_min, r.t_max"
            head = f"SELECT {self.window_start('r.bucket', level)} AS ws{self.selected('r.')}{columns}"
            # The local-day level holds every zone of the meter: this query's only.
            zone = [f"r.zone = {self.tz}"] if level == "dz" else []
            if self.bounds is not None:
                # Many intervals (one or two per range): one branch per level that probes
                # the index once per interval, so planning does not grow with the ranges.
                # OFFSET 0 keeps the subquery apart, so its bounds are index conditions
                # (joined, the planner scanned all the subject's rows and filtered them).
                los = self.param([a for a, _ in intervals], "timestamptz[]")
                his = self.param([b for _, b in intervals], "timestamptz[]")
                conditions = ["r.bucket >= iv.lo", "r.bucket < iv.hi", *zone, *self.filters("r.")]
                branches.append(f"SELECT r.* FROM unnest({los}, {his}) iv (lo, hi), LATERAL ({head} FROM "
                                f"{table.as_string()} r{self.where(conditions)} OFFSET 0) r")
                continue
            for a, b in intervals:
                conditions = zone + self.time_range("r.bucket", a, b) + self.filters("r.")
                branches.append(f"{head} FROM {table.as_string()} r{self.where(conditions)}")
        return branches

    # -- statements --------------------------------------------------------------

    def aggregate(self, plan: Plan, lo: datetime | None, hi: datetime | None) -> str:
        raw = self.raw_cte(plan, lo, hi)
        raw_filter = self.where(self.filters(""))
        extent_columns = ", t_min, t_max" if self.extent else ""
        extent = ", min(t_min) AS t_min, max(t_max) AS t_max" if self.extent else ""
        raw_rows = (f"SELECT {self.window_start('time')} AS ws{self.selected('')}, 1 AS cnt"
                    f"{objects.event_state(self.state)}{', minute, minute' if self.extent else ''} "
                    f"FROM raw{raw_filter}")
        rows = "\nUNION ALL\n".join(self.rollup_branches(plan, sets=False) + [raw_rows])
        group = self.group_list()
        window_end = ""
        if self.window is not None:
            window_end = ", " + _WINDOW_END[self.window].format(tz=self.tz) + " AS we"
        # Bytewise order (COLLATE "C"): the same on every server, and what Python's
        # string order is, so callers can merge or compare results without resorting.
        order = ", ".join(c if c == "ws" else f'{c} COLLATE "C"' for c in group.split(", "))
        if not self.rollup.unique:
            having = "" if self.state.reports_empty else " WHERE value IS NOT NULL"
            return (f"WITH raw AS ({raw})\n"
                    f"SELECT *{window_end} FROM (\n"
                    f"  SELECT {group}, {self.state.final} AS value{extent}\n"
                    f"  FROM ({rows}) p (ws{self._alias_tail()}, cnt{objects.state_names(self.state)}"
                    f"{extent_columns})\n"
                    f"  GROUP BY {group}) a{having}\n"
                    f"ORDER BY {order}")
        set_rows = self.rollup_branches(plan, sets=True)
        raw_values = self.where(self.filters("") + ["u IS NOT NULL"])
        set_rows.append(f"SELECT {self.window_start('time')} AS ws{self.selected('')}, u FROM raw{raw_values}")
        sets = "\nUNION ALL\n".join(set_rows)
        join = " AND ".join(f"s.{c} = k.{c}" for c in group.split(", "))
        return (f"WITH raw AS MATERIALIZED ({raw}),\n"
                f"keys AS (SELECT {group}{extent}\n"
                f"  FROM ({rows}) p (ws{self._alias_tail()}, cnt{extent_columns}) GROUP BY {group}),\n"
                f"sets AS (SELECT {group}, count(DISTINCT value) AS n\n"
                f"  FROM ({sets}) s (ws{self._alias_tail()}, value) GROUP BY {group})\n"
                f"SELECT *{window_end} FROM (\n"
                f"  SELECT {self.group_list('k.')}, coalesce(s.n, 0)::numeric AS value"
                f"{', k.t_min, k.t_max' if self.extent else ''}\n"
                f"  FROM keys k LEFT JOIN sets s ON {join}) a\n"
                f"ORDER BY {order}")

    def _alias_tail(self) -> str:
        return "".join(f", {c}" for c in self._grouped())

    def distinct(self, plan: Plan, key: str | None, lo: datetime | None, hi: datetime | None,
                 unmerged_before: datetime | None, limit: int | None) -> str:
        """The distinct subjects (``key`` None) or values of group-by ``key``: the rollups'
        and the raw events' (:meth:`event_branches`), plus every event before
        ``unmerged_before`` (the meter's eventFrom: the rollups never hold those)."""
        rollup = self.rollup
        column = "subject" if key is None else rollup.column_of(key)
        value = ("subject" if key is None else
                 f"pgmeter_group_value(data #> {self.param(rollup.group_paths[int(column[1:]) - 1], 'text[]')})")
        head = f"SELECT {value} FROM events"
        branches = []
        if unmerged_before is not None:
            branches.append(head + self.where(self.event_scope() + self.time_range("time", lo, unmerged_before)))
            lo = unmerged_before
        if lo is None or hi is None or lo < hi:
            for level, intervals in plan.levels.items():
                table = rollup.table(level).as_string()
                branches += [f"SELECT {column} FROM {table}{self.where(self.time_range('bucket', a, b))}"
                             for a, b in intervals]
            branches += self.event_branches(head, plan, lo, hi)
        text = "SELECT DISTINCT v FROM (" + "\nUNION ALL\n".join(branches) + ") x (v)"
        return text + (f" LIMIT {self.param(limit + 1, 'bigint')}" if limit is not None else "")


def _out_zone(params: QueryParams) -> tzinfo:
    return UTC if params.window_time_zone in _UTC_NAMES else zone(params.window_time_zone)


def _rows(meter: Meter, rollup: Rollup, params: QueryParams, records: list[asyncpg.Record]) -> list[QueryRow]:
    """Records (already in window, subject, group order) to rows. This runs once per
    result row, thousands of times for big answers, so it stays lean."""
    columns = [(key, rollup.column_of(key)) for key in params.meter_keys]
    out_zone = _out_zone(params)
    start = _effective_from(meter, params)
    subject = params.groups_by_subject
    customers = bool(params.customers)
    windowed = params.window_size is not None
    rows = []
    for record in records:
        if windowed:
            window_start, window_end = record["ws"], record["we"]
            if out_zone is not UTC:
                window_start, window_end = window_start.astimezone(out_zone), window_end.astimezone(out_zone)
        else:
            window_start = start if start is not None else record["t_min"]
            window_end = params.to if params.to is not None else record["t_max"] + MINUTE
        rows.append(QueryRow(record["value"], window_start, window_end, record["subject"] if subject else None,
                             {key: record[column] for key, column in columns},
                             record["cust"] if customers else None))
    if not windowed and start is None:
        # Each group's window starts at its first event: order by that first.
        rows.sort(key=lambda row: (row.window_start, row.subject or "", row.customer_id or "",
                                   tuple(row.group_by.values())))
    if not rows and not windowed and not subject and not customers and not params.meter_keys \
            and meter.aggregation in ("COUNT", "UNIQUE_COUNT"):
        # OpenMeter's aggregate without GROUP BY returns one row even over no events.
        rows.append(QueryRow(value=Decimal(0), window_start=start if start is not None else EPOCH,
                             window_end=params.to if params.to is not None else EPOCH + MINUTE,
                             subject=None, group_by={}))
    return rows


async def distinct_values(db: Db, meter: Meter, key: str | None, from_: datetime | None,
                          to: datetime | None, *, max_rows: int | None = None) -> list[str]:
    """The distinct subjects (``key`` None) or values of group-by ``key`` among the
    meter's events in ``[from_, to)``, sorted. More than ``max_rows`` raises
    :class:`TooManyRows`.

    OpenMeter ignores eventFrom here, while rollups only hold events from eventFrom
    on, so the part of the range before it is read from raw events.
    """
    lo, hi = _floor_second(from_), _floor_second(to)
    if lo is not None and hi is not None and lo >= hi:
        return []
    async with _snapshot(db) as conn:
        rollup, tables, tail_floor = await load_source(conn, meter)
        # The meter's eventFrom, as read by the catalog (a stored -infinity is None there).
        before = None
        if meter.event_from is not None and (lo is None or lo < meter.event_from):
            before = meter.event_from if hi is None else min(hi, meter.event_from)
        params = QueryParams()
        merged_lo = before if before is not None else lo
        statement = _Statement(rollup, params, tail_floor)
        text = statement.distinct(_plan(rollup, tables, params, merged_lo, hi), key, lo, hi, before, max_rows)
        records = await conn.fetch(text, *statement.args)
    if max_rows is not None and len(records) > max_rows:
        raise TooManyRows(max_rows, "narrow the range (from, to)")
    return sorted(record["v"] for record in records)
