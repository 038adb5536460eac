"""The meter catalog in Postgres: lookups for every caller, and the writes.

Lookups are what the API, the query cache and the Lago sync share. Writes create,
update and soft-delete meters together with their rollup objects, in the
caller's connection and one transaction, so a meter never exists without its
rollup (or the other way round).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg

from pgmeter.meters.model import SLUG_PATTERN, Aggregation, MeterSpec
from pgmeter.meters.ulid import is_ulid, new_ulid
from pgmeter.rollup import objects


class SlugTaken(Exception):
    """Another active meter of the namespace has this slug."""


class TooManyMeters(Exception):
    """The namespace already has its quota of active meters (limits.metersPerNamespace)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


@dataclass(frozen=True)
class Failure:
    """The refresher set this meter aside after its merge failed (see
    pgmeter.rollup.refresher); its data is still exact, served from raw events."""

    reason: str
    since: datetime
    next_attempt: datetime
    failures: int


@dataclass(frozen=True)
class Meter:
    id: str
    namespace: str
    slug: str
    name: str
    description: str | None
    aggregation: Aggregation
    event_type: str
    event_from: datetime | None
    value_property: str | None
    group_by: dict[str, str]
    metadata: dict[str, str] | None
    annotations: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    failure: Failure | None = None

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    @property
    def spec(self) -> MeterSpec:
        """The stored definition, taken as it is: it was validated when written, and a
        rule added since must not make an existing meter unreadable."""
        return MeterSpec.model_construct(
            slug=self.slug, name=self.name, description=self.description, aggregation=self.aggregation,
            event_type=self.event_type, event_from=self.event_from, value_property=self.value_property,
            group_by=self.group_by, metadata=self.metadata,
        )


COLUMNS = ("id, namespace, slug, name, description, aggregation, event_type, event_from, value_property, "
            "group_by::text AS group_by, metadata::text AS metadata, annotations::text AS annotations, "
            "created_at, updated_at, deleted_at, "
            "(SELECT json_build_object('reason', r.failure_reason, 'since', r.failing_since, "
            "'next_attempt', r.next_attempt, 'failures', r.failures)::text "
            "FROM meter_rollups r WHERE r.meter_id = meters.id AND r.failures > 0) AS failure")

# orderBy values of GET /api/v1/meters and the columns they sort by ("key" is the slug).
ORDER_COLUMNS = {"key": "slug", "name": "name", "aggregation": "aggregation",
                 "createdAt": "created_at", "updatedAt": "updated_at"}


def _json(text: str | None) -> Any:
    return json.loads(text) if text is not None else None


def _event_from(value: datetime | None) -> datetime | None:
    """A stored eventFrom as readers can use it.

    asyncpg reads timestamptz '-infinity' as a naive ``datetime.min``. Earlier
    versions stored it for an eventFrom of 0001-01-01T00:00:00Z (now refused at the
    door); "from before all time" means "no eventFrom", which every reader handles,
    while the value itself broke the meter's queries with a 500 for ever after.
    """
    return None if value is not None and value.tzinfo is None and value == datetime.min else value


def from_row(row: Mapping[str, Any]) -> Meter:
    return Meter(
        id=row["id"], namespace=row["namespace"], slug=row["slug"], name=row["name"],
        description=row["description"], aggregation=Aggregation(row["aggregation"]),
        event_type=row["event_type"], event_from=_event_from(row["event_from"]), value_property=row["value_property"],
        group_by=_json(row["group_by"]) or {}, metadata=_json(row["metadata"]),
        annotations=_json(row["annotations"]), created_at=row["created_at"],
        updated_at=row["updated_at"], deleted_at=row["deleted_at"], failure=_failure(row["failure"]),
    )


def _failure(text: str | None) -> Failure | None:
    if text is None:
        return None
    found = json.loads(text)
    return Failure(reason=found["reason"], since=datetime.fromisoformat(found["since"]),
                   next_attempt=datetime.fromisoformat(found["next_attempt"]), failures=found["failures"])


async def get_by_id(conn: asyncpg.Connection, namespace: str, meter_id: str) -> Meter | None:
    """By ULID, deleted meters included (as OpenMeter)."""
    row = await conn.fetchrow(f"SELECT {COLUMNS} FROM meters WHERE namespace = $1 AND id = $2",
                              namespace, meter_id)
    return from_row(row) if row else None


async def get_by_slug(conn: asyncpg.Connection, namespace: str, slug: str) -> Meter | None:
    """The active meter with this slug (deleted ones freed it)."""
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM meters WHERE namespace = $1 AND slug = $2 AND deleted_at IS NULL",
        namespace, slug)
    return from_row(row) if row else None


async def get(conn: asyncpg.Connection, namespace: str, id_or_slug: str) -> Meter | None:
    """``{meterIdOrSlug}``: a ULID is looked up as an id first, then as a slug."""
    if is_ulid(id_or_slug):
        found = await get_by_id(conn, namespace, id_or_slug)
        if found is not None:
            return found
    if SLUG_PATTERN.match(id_or_slug):
        return await get_by_slug(conn, namespace, id_or_slug)
    return None


async def list_meters(conn: asyncpg.Connection, namespace: str, *, order_by: str = "key",
                      descending: bool = False, include_deleted: bool = False) -> list[Meter]:
    column = ORDER_COLUMNS[order_by]  # KeyError for anything else: callers validate
    # Text sorts bytewise, the same on every server whatever its default collation.
    collate = ' COLLATE "C"' if column in ("slug", "name", "aggregation") else ""
    direction = "DESC" if descending else "ASC"
    deleted = "" if include_deleted else "AND deleted_at IS NULL"
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM meters WHERE namespace = $1 {deleted} "
        f"ORDER BY {column}{collate} {direction}, id {direction}", namespace)
    return [from_row(row) for row in rows]


async def active_meters(conn: asyncpg.Connection) -> list[Meter]:
    rows = await conn.fetch(f"SELECT {COLUMNS} FROM meters WHERE deleted_at IS NULL ORDER BY id")
    return [from_row(row) for row in rows]


async def create(conn: asyncpg.Connection, namespace: str, spec: MeterSpec, *,
                 max_meters: int | None = None) -> Meter:
    """Insert a meter and build its (empty) rollup; the refresher backfills it.

    Raises :class:`SlugTaken` when an active meter of the namespace has the slug, and
    :class:`TooManyMeters` when the namespace already has ``max_meters`` active ones.
    """
    meter_id = new_ulid()
    async with conn.transaction():
        if max_meters is not None:
            # Serialise creates per namespace so two concurrent ones cannot both pass the count.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('pgmeter.meters:' || $1, 0))",
                               namespace)
            active = await conn.fetchval(
                "SELECT count(*) FROM meters WHERE namespace = $1 AND deleted_at IS NULL", namespace)
            if active >= max_meters:
                raise TooManyMeters(max_meters)
        try:
            row = await conn.fetchrow(
                f"""
                INSERT INTO meters (id, namespace, slug, name, description, aggregation, event_type,
                                    event_from, value_property, group_by, metadata)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::text::jsonb, $11::text::jsonb)
                RETURNING {COLUMNS}
                """,
                meter_id, namespace, spec.slug, spec.display_name, spec.description, str(spec.aggregation),
                spec.event_type, spec.event_from, spec.value_property, json.dumps(spec.group_by),
                json.dumps(spec.metadata) if spec.metadata is not None else None,
            )
        except asyncpg.UniqueViolationError:
            raise SlugTaken(spec.slug) from None
        await objects.create(conn, meter_id, namespace, spec.slug, spec)
    return from_row(row)


def updated_spec(meter: Meter, *, name: str | None, description: str | None,
                 group_by: dict[str, str], metadata: dict[str, str] | None) -> MeterSpec:
    """The meter's definition after an update, validated (raises pydantic's ValidationError).

    eventFrom cannot change and is kept as stored, unjudged: a meter created before
    a rule about it existed stays updatable.
    """
    fields = replace(meter, name=name or meter.slug, description=description, group_by=group_by,
                     metadata=metadata, event_from=None).spec.model_dump(by_alias=True)
    return MeterSpec.model_validate(fields).model_copy(update={"event_from": meter.event_from})


async def update(conn: asyncpg.Connection, meter: Meter, *, name: str | None, description: str | None,
                 group_by: dict[str, str], metadata: dict[str, str] | None) -> Meter:
    """Apply a ``MeterUpdate`` (already merged by the caller's rules).

    A changed group-by changes the rollup's key, so the rollup is rebuilt as a new
    version and backfilled; everything else is catalog data only.
    """
    spec = updated_spec(meter, name=name, description=description, group_by=group_by, metadata=metadata)
    async with conn.transaction():
        row = await conn.fetchrow(
            f"""
            UPDATE meters
               SET name = $2, description = $3, group_by = $4::text::jsonb,
                   metadata = $5::text::jsonb, updated_at = now()
             WHERE id = $1 AND deleted_at IS NULL
            RETURNING {COLUMNS}
            """,
            meter.id, spec.display_name, spec.description, json.dumps(spec.group_by),
            json.dumps(spec.metadata) if spec.metadata is not None else None,
        )
        if row is None:
            raise LookupError(meter.id)
        if spec.group_by != meter.group_by:
            await objects.rebuild(conn, meter.id, meter.namespace, meter.slug, spec)
    return from_row(row)


async def delete(conn: asyncpg.Connection, meter: Meter) -> None:
    """Soft delete: the row stays (lookups by id still find it), the slug is freed
    and the rollup objects are dropped."""
    async with conn.transaction():
        await objects.drop(conn, meter.id)
        await conn.execute("UPDATE meters SET deleted_at = now(), updated_at = now() "
                           "WHERE id = $1 AND deleted_at IS NULL", meter.id)
