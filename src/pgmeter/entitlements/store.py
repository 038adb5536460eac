"""Customers, features, entitlements, grants, resets and snapshots in Postgres.

Plain reads and writes in the caller's connection; the rules (what conflicts,
what is refused) live in :mod:`.service`. JSON columns travel as text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from pgmeter.entitlements.engine import Grant, State
from pgmeter.entitlements.periods import Recurrence, parse_interval
from pgmeter.meters import store as meter_store
from pgmeter.meters.ulid import is_ulid, new_ulid
from pgmeter.query.customers import subjects as customer_subjects
from pgmeter.query.engine import Source, source_sql


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _with_json(row: Mapping[str, Any], *columns: str) -> dict[str, Any]:
    """The row as keyword arguments, its JSON ``columns`` (selected as text) decoded."""
    values = dict(row)
    for column in columns:
        values[column] = _load(values[column])
    return values


# -- customers -------------------------------------------------------------------

@dataclass
class Customer:
    id: str
    namespace: str
    key: str | None
    name: str
    description: str | None
    primary_email: str | None
    currency: str | None
    billing_address: dict[str, Any] | None
    metadata: dict[str, str] | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    subject_keys: list[str]

    @property
    def usage_keys(self) -> list[str]:
        """The event subjects whose usage is this customer's: its key and subject keys."""
        return list(customer_subjects(self.key, self.subject_keys))


# The customer's subject keys come with its row (no query per customer). A deleted
# customer's mappings were deleted with it: it shows the ones it had then.
_CUSTOMER = ("c.id, c.namespace, c.key, c.name, c.description, c.primary_email, c.currency, "
             "c.billing_address::text AS billing_address, c.metadata::text AS metadata, c.created_at, c.updated_at, "
             "c.deleted_at, ARRAY(SELECT s.subject_key FROM customer_subjects s WHERE s.customer_id = c.id "
             "AND s.deleted_at IS NOT DISTINCT FROM c.deleted_at ORDER BY s.subject_key) AS subject_keys")


def _customer(row: Mapping[str, Any] | None) -> Customer | None:
    if row is None:
        return None
    values = _with_json(row, "billing_address", "metadata")
    return Customer(**{**values, "subject_keys": list(values["subject_keys"])})


async def customer_by_id(conn: asyncpg.Connection, namespace: str, customer_id: str) -> Customer | None:
    row = await conn.fetchrow(f"SELECT {_CUSTOMER} FROM customers c WHERE c.namespace = $1 AND c.id = $2",
                              namespace, customer_id)
    return _customer(row)


async def customer_by_key(conn: asyncpg.Connection, namespace: str, key: str) -> Customer | None:
    """The live customer whose key is ``key``."""
    row = await conn.fetchrow(f"SELECT {_CUSTOMER} FROM customers c WHERE c.namespace = $1 AND c.key = $2 "
                              "AND c.deleted_at IS NULL", namespace, key)
    return _customer(row)


async def customer_by_id_or_key(conn: asyncpg.Connection, namespace: str, id_or_key: str) -> Customer | None:
    """An id matches deleted customers too; a key only live ones (OpenMeter)."""
    if is_ulid(id_or_key):
        found = await customer_by_id(conn, namespace, id_or_key)
        if found is not None:
            return found
    return await customer_by_key(conn, namespace, id_or_key)


async def customer_by_subject(conn: asyncpg.Connection, namespace: str, subject: str) -> Customer | None:
    """The live customer a usage subject resolves to: a key match wins over a subject-key match."""
    found = await customer_by_key(conn, namespace, subject)
    if found is not None:
        return found
    row = await conn.fetchrow(
        f"SELECT {_CUSTOMER} FROM customers c "
        "JOIN customer_subjects m ON m.customer_id = c.id AND m.deleted_at IS NULL "
        "WHERE c.namespace = $1 AND m.subject_key = $2 AND c.deleted_at IS NULL", namespace, subject)
    return _customer(row)


async def customer_conflicts(conn: asyncpg.Connection, namespace: str, key: str | None, subject_keys: list[str],
                             exclude_id: str | None) -> str | None:
    """Why these keys cannot belong to a customer (other than ``exclude_id``), or None."""
    if key is not None:
        other = await conn.fetchval("SELECT id FROM customers WHERE namespace = $1 AND id = $2 AND id IS DISTINCT FROM $3",
                                    namespace, key, exclude_id)
        if other:
            return f"key \"{key}\" is already used by an another customer in the namespace {namespace}"
        other = await conn.fetchval(
            "SELECT c.id FROM customers c WHERE c.namespace = $1 AND c.deleted_at IS NULL AND c.id IS DISTINCT FROM $3 "
            "AND (c.key = $2 OR EXISTS (SELECT 1 FROM customer_subjects s WHERE s.customer_id = c.id "
            "AND s.deleted_at IS NULL AND s.subject_key = $2))", namespace, key, exclude_id)
        if other:
            return f"key \"{key}\" is already used by an another customer in the namespace {namespace}"
    if subject_keys:
        other = await conn.fetchval(
            "SELECT s.customer_id FROM customer_subjects s JOIN customers c ON c.id = s.customer_id "
            "WHERE s.namespace = $1 AND s.deleted_at IS NULL AND c.deleted_at IS NULL AND s.subject_key = ANY($2) "
            "AND s.customer_id IS DISTINCT FROM $3 LIMIT 1", namespace, subject_keys, exclude_id)
        if other:
            return (f"one or multiple subject keys of [{', '.join(subject_keys)}] are already associated with an "
                    f"different customer in the namespace {namespace}")
    return None


async def insert_customer(conn: asyncpg.Connection, namespace: str, fields: dict[str, Any],
                          subject_keys: list[str]) -> Customer:
    customer_id = new_ulid()
    await conn.execute(
        "INSERT INTO customers (id, namespace, key, name, description, primary_email, currency, billing_address, metadata) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::jsonb, $9::text::jsonb)",
        customer_id, namespace, fields["key"], fields["name"], fields["description"], fields["primary_email"],
        fields["currency"], _json(fields["billing_address"]), _json(fields["metadata"]))
    await conn.executemany("INSERT INTO customer_subjects (namespace, customer_id, subject_key) VALUES ($1, $2, $3)",
                           [(namespace, customer_id, key) for key in subject_keys])
    found = await customer_by_id(conn, namespace, customer_id)
    assert found is not None
    return found


async def update_customer(conn: asyncpg.Connection, customer: Customer, fields: dict[str, Any],
                          subject_keys: list[str]) -> Customer:
    await conn.execute(
        "UPDATE customers SET key = $2, name = $3, description = $4, primary_email = $5, currency = $6, "
        "billing_address = $7::text::jsonb, metadata = $8::text::jsonb, updated_at = now() WHERE id = $1",
        customer.id, fields["key"], fields["name"], fields["description"], fields["primary_email"],
        fields["currency"], _json(fields["billing_address"]), _json(fields["metadata"]))
    removed = sorted(set(customer.subject_keys) - set(subject_keys))
    added = sorted(set(subject_keys) - set(customer.subject_keys))
    if removed:
        await conn.execute("UPDATE customer_subjects SET deleted_at = now() WHERE customer_id = $1 "
                           "AND deleted_at IS NULL AND subject_key = ANY($2)", customer.id, removed)
    await conn.executemany("INSERT INTO customer_subjects (namespace, customer_id, subject_key) VALUES ($1, $2, $3)",
                           [(customer.namespace, customer.id, key) for key in added])
    found = await customer_by_id(conn, customer.namespace, customer.id)
    assert found is not None
    return found


async def delete_customer(conn: asyncpg.Connection, customer: Customer) -> None:
    at = await conn.fetchval("SELECT now()")
    await conn.execute("UPDATE customers SET deleted_at = $2, updated_at = $2 WHERE id = $1", customer.id, at)
    await conn.execute("UPDATE customer_subjects SET deleted_at = $2 WHERE customer_id = $1 AND deleted_at IS NULL",
                       customer.id, at)


async def list_customers(conn: asyncpg.Connection, namespace: str, *, filters: dict[str, str], include_deleted: bool,
                         order_by: str, descending: bool, page: int, page_size: int) -> tuple[int, list[Customer]]:
    conditions = ["namespace = $1"]
    args: list[Any] = [namespace]
    if not include_deleted:
        conditions.append("deleted_at IS NULL")
    for name, column in (("key", "key"), ("name", "name"), ("primaryEmail", "primary_email")):
        if name in filters:
            args.append(filters[name])
            conditions.append(f"{column} ILIKE '%' || ${len(args)} || '%'")
    if "subject" in filters:
        args.append(filters["subject"])
        conditions.append(f"EXISTS (SELECT 1 FROM customer_subjects s WHERE s.customer_id = customers.id "
                          f"AND s.deleted_at IS NULL AND s.subject_key ILIKE '%' || ${len(args)} || '%')")
    where = " AND ".join(conditions)
    total = await conn.fetchval(f"SELECT count(*) FROM customers WHERE {where}", *args)
    column = {"id": "id", "name": 'name COLLATE "C"', "createdAt": "created_at"}[order_by]
    direction = "DESC" if descending else "ASC"
    order = f"ORDER BY {column} {direction}, id"
    rows = await conn.fetch(f"SELECT {_CUSTOMER} FROM (SELECT * FROM customers WHERE {where} {order} "
                            f"LIMIT {page_size} OFFSET {(page - 1) * page_size}) c {order}", *args)
    return total, [customer for row in rows if (customer := _customer(row)) is not None]


# -- features --------------------------------------------------------------------

@dataclass
class Feature:
    id: str
    namespace: str
    key: str
    name: str
    meter_slug: str | None
    meter_id: str | None
    filters: dict[str, str] | None
    metadata: dict[str, str] | None
    created_at: datetime
    updated_at: datetime
    archived_at: datetime | None


_FEATURE = ("id, namespace, key, name, meter_slug, meter_id, filters::text AS filters, metadata::text AS metadata, "
            "created_at, updated_at, archived_at")


def _feature(row: Mapping[str, Any] | None) -> Feature | None:
    return None if row is None else Feature(**_with_json(row, "filters", "metadata"))


async def feature_by_id(conn: asyncpg.Connection, namespace: str, feature_id: str) -> Feature | None:
    return _feature(await conn.fetchrow(f"SELECT {_FEATURE} FROM features WHERE namespace = $1 AND id = $2",
                                        namespace, feature_id))


async def live_feature(conn: asyncpg.Connection, namespace: str, id_or_key: str) -> Feature | None:
    """A non-archived feature by id or key."""
    return _feature(await conn.fetchrow(
        f"SELECT {_FEATURE} FROM features WHERE namespace = $1 AND (id = $2 OR key = $2) AND archived_at IS NULL "
        "ORDER BY (id = $2) DESC LIMIT 1", namespace, id_or_key))


async def insert_feature(conn: asyncpg.Connection, namespace: str, key: str, name: str, meter_slug: str | None,
                         meter_id: str | None, filters: dict[str, str] | None,
                         metadata: dict[str, str] | None) -> Feature:
    row = await conn.fetchrow(
        f"INSERT INTO features (id, namespace, key, name, meter_slug, meter_id, filters, metadata) "
        f"VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8::text::jsonb) RETURNING {_FEATURE}",
        new_ulid(), namespace, key, name, meter_slug, meter_id, _json(filters), _json(metadata))
    feature = _feature(row)
    assert feature is not None
    return feature


async def archive_feature(conn: asyncpg.Connection, feature: Feature) -> None:
    await conn.execute("UPDATE features SET archived_at = now(), updated_at = now() WHERE id = $1", feature.id)


async def list_features(conn: asyncpg.Connection, namespace: str, *, meter_slugs: list[str], include_archived: bool,
                        order_by: str, descending: bool, limit: int, offset: int) -> tuple[int, list[Feature]]:
    conditions = ["namespace = $1"]
    args: list[Any] = [namespace]
    if not include_archived:
        conditions.append("archived_at IS NULL")
    if meter_slugs:
        args.append(meter_slugs)
        conditions.append("meter_slug = ANY($2)")
    where = " AND ".join(conditions)
    total = await conn.fetchval(f"SELECT count(*) FROM features WHERE {where}", *args)
    column = {"id": "id", "key": 'key COLLATE "C"', "name": 'name COLLATE "C"', "createdAt": "created_at",
              "updatedAt": "updated_at"}[order_by]
    direction = "DESC" if descending else "ASC"
    rows = await conn.fetch(f"SELECT {_FEATURE} FROM features WHERE {where} ORDER BY {column} {direction}, id "
                            f"LIMIT {limit} OFFSET {offset}", *args)
    return total, [f for f in (_feature(r) for r in rows) if f is not None]


async def features_using_meter(conn: asyncpg.Connection, meter_id: str) -> list[str]:
    """Keys of the live features built on a meter (its deletion is refused while any exist)."""
    rows = await conn.fetch("SELECT key FROM features WHERE meter_id = $1 AND archived_at IS NULL ORDER BY key",
                            meter_id)
    return [r["key"] for r in rows]


async def filter_keys_of_meter(conn: asyncpg.Connection, meter_id: str) -> dict[str, str]:
    """Group-by key -> a live feature filtering on it."""
    rows = await conn.fetch("SELECT key, filters::text AS filters FROM features WHERE meter_id = $1 "
                            "AND archived_at IS NULL AND filters IS NOT NULL", meter_id)
    out: dict[str, str] = {}
    for row in rows:
        for group_key in (_load(row["filters"]) or {}):
            out.setdefault(group_key, row["key"])
    return out


# -- entitlements ----------------------------------------------------------------

@dataclass
class Entitlement:
    id: str
    namespace: str
    customer_id: str
    feature_id: str
    feature_key: str
    type: str
    measure_usage_from: datetime | None
    is_soft_limit: bool
    issue_after_reset: Decimal | None
    issue_after_reset_priority: int | None
    preserve_overage_at_reset: bool
    usage_interval: str | None
    usage_anchor: datetime | None
    config: str | None
    metadata: dict[str, str] | None
    annotations: dict[str, Any] | None
    active_from: datetime
    active_to: datetime | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None

    def active_at(self, t: datetime) -> bool:
        return self.active_from <= t and all(end is None or t < end for end in (self.active_to, self.deleted_at))

    @property
    def recurrence(self) -> Recurrence | None:
        if self.usage_interval is None or self.usage_anchor is None:
            return None
        return Recurrence(self.usage_anchor, parse_interval(self.usage_interval))


_ENTITLEMENT = ("id, namespace, customer_id, feature_id, feature_key, type, measure_usage_from, is_soft_limit, "
                "issue_after_reset, issue_after_reset_priority, preserve_overage_at_reset, usage_interval, "
                "usage_anchor, config, metadata::text AS metadata, annotations::text AS annotations, active_from, "
                "active_to, created_at, updated_at, deleted_at")


def _entitlement(row: asyncpg.Record | None) -> Entitlement | None:
    return None if row is None else Entitlement(**_with_json(row, "metadata", "annotations"))


async def entitlement_by_id(conn: asyncpg.Connection, namespace: str, entitlement_id: str) -> Entitlement | None:
    return _entitlement(await conn.fetchrow(
        f"SELECT {_ENTITLEMENT} FROM entitlements WHERE namespace = $1 AND id = $2", namespace, entitlement_id))


async def entitlement_for_feature_at(conn: asyncpg.Connection, namespace: str, customer_id: str, feature_key: str,
                                     at: datetime) -> Entitlement | None:
    """The customer's entitlement of the feature key that is active at ``at``."""
    return _entitlement(await conn.fetchrow(
        f"SELECT {_ENTITLEMENT} FROM entitlements WHERE namespace = $1 AND customer_id = $2 AND feature_key = $3 "
        "AND active_from <= $4 AND (active_to IS NULL OR active_to > $4) AND (deleted_at IS NULL OR deleted_at > $4) "
        "ORDER BY active_from DESC LIMIT 1", namespace, customer_id, feature_key, at))


async def scheduled_conflict(conn: asyncpg.Connection, namespace: str, customer_id: str, feature_key: str,
                             active_from: datetime) -> str | None:
    """An entitlement of the same customer and feature whose active span overlaps ``[active_from, ∞)``."""
    found: str | None = await conn.fetchval(
        "SELECT id FROM entitlements WHERE namespace = $1 AND customer_id = $2 AND feature_key = $3 "
        "AND coalesce(least(active_to, deleted_at), 'infinity') > $4 ORDER BY created_at LIMIT 1",
        namespace, customer_id, feature_key, active_from)
    return found


async def insert_entitlement(conn: asyncpg.Connection, values: dict[str, Any]) -> Entitlement:
    values = dict(values, id=new_ulid())
    values["metadata"] = _json(values.get("metadata"))
    values["annotations"] = _json(values.get("annotations"))
    columns = list(values)
    casts = {"metadata": "::text::jsonb", "annotations": "::text::jsonb"}
    placeholders = ", ".join(f"${i + 1}{casts.get(c, '')}" for i, c in enumerate(columns))
    row = await conn.fetchrow(f"INSERT INTO entitlements ({', '.join(columns)}) VALUES ({placeholders}) "
                              f"RETURNING {_ENTITLEMENT}", *values.values())
    entitlement = _entitlement(row)
    assert entitlement is not None
    return entitlement


async def end_entitlement(conn: asyncpg.Connection, entitlement: Entitlement, *, column: str, at: datetime) -> None:
    assert column in ("deleted_at", "active_to")
    await conn.execute(f"UPDATE entitlements SET {column} = $2, updated_at = now() WHERE id = $1",
                       entitlement.id, at)


async def list_entitlements(conn: asyncpg.Connection, namespace: str, *, customer_ids: list[str] | None = None,
                            customer_keys: list[str] | None = None, features: list[str] | None = None,
                            types: list[str] | None = None, include_deleted: bool = False,
                            active_at: datetime | None = None, order_by: str = "createdAt",
                            descending: bool = False, limit: int = 1000, offset: int = 0,
                            ) -> tuple[int, list[Entitlement]]:
    conditions = ["e.namespace = $1"]
    args: list[Any] = [namespace]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if customer_ids:
        conditions.append(f"e.customer_id = ANY({arg(customer_ids)})")
    if customer_keys:
        conditions.append(f"e.customer_id IN (SELECT id FROM customers WHERE namespace = $1 AND key = ANY({arg(customer_keys)}))")
    if features:
        placeholder = arg(features)
        conditions.append(f"(e.feature_key = ANY({placeholder}) OR e.feature_id = ANY({placeholder}))")
    if types:
        conditions.append(f"e.type = ANY({arg(types)})")
    if not include_deleted:
        conditions.append("e.deleted_at IS NULL")
    if active_at is not None:
        placeholder = arg(active_at)
        conditions.append(f"e.active_from <= {placeholder} AND (e.active_to IS NULL OR e.active_to > {placeholder}) "
                          f"AND (e.deleted_at IS NULL OR e.deleted_at > {placeholder})")
    where = " AND ".join(conditions)
    total = await conn.fetchval(f"SELECT count(*) FROM entitlements e WHERE {where}", *args)
    column = {"createdAt": "e.created_at", "updatedAt": "e.updated_at"}[order_by]
    direction = "DESC" if descending else "ASC"
    columns = ", ".join("e." + c.strip() for c in _ENTITLEMENT.split(","))
    rows = await conn.fetch(f"SELECT {columns} FROM entitlements e WHERE {where} ORDER BY {column} {direction}, e.id "
                            f"LIMIT {limit} OFFSET {offset}", *args)
    return total, [e for e in (_entitlement(r) for r in rows) if e is not None]


# -- grants ----------------------------------------------------------------------

@dataclass
class GrantRow:
    id: str
    namespace: str
    entitlement_id: str
    amount: Decimal
    priority: int
    effective_at: datetime
    expiration_duration: str | None
    expiration_count: int | None
    expires_at: datetime | None
    min_rollover: Decimal
    max_rollover: Decimal
    recurrence_interval: str | None
    recurrence_anchor: datetime | None
    metadata: dict[str, str] | None
    annotations: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    voided_at: datetime | None

    @property
    def recurrence(self) -> Recurrence | None:
        if self.recurrence_interval is None or self.recurrence_anchor is None:
            return None
        return Recurrence(self.recurrence_anchor, parse_interval(self.recurrence_interval))

    def engine_grant(self) -> Grant:
        return Grant(id=self.id, amount=self.amount, priority=self.priority, effective_at=self.effective_at,
                     created_at=self.created_at, expires_at=self.expires_at, voided_at=self.voided_at,
                     deleted_at=self.deleted_at, min_rollover=self.min_rollover, max_rollover=self.max_rollover,
                     recurrence=self.recurrence)


_GRANT = ("id, namespace, entitlement_id, amount, priority, effective_at, expiration_duration, expiration_count, "
          "expires_at, min_rollover, max_rollover, recurrence_interval, recurrence_anchor, metadata::text AS metadata, "
          "annotations::text AS annotations, created_at, updated_at, deleted_at, voided_at")


def _grant(row: Mapping[str, Any] | None) -> GrantRow | None:
    return None if row is None else GrantRow(**_with_json(row, "metadata", "annotations"))


async def insert_grant(conn: asyncpg.Connection, namespace: str, values: dict[str, Any]) -> GrantRow:
    values = dict(values, id=new_ulid(), namespace=namespace)
    values["metadata"] = _json(values.get("metadata"))
    values["annotations"] = _json(values.get("annotations"))
    columns = list(values)
    casts = {"metadata": "::text::jsonb", "annotations": "::text::jsonb"}
    placeholders = ", ".join(f"${i + 1}{casts.get(c, '')}" for i, c in enumerate(columns))
    row = await conn.fetchrow(f"INSERT INTO grants ({', '.join(columns)}) VALUES ({placeholders}) RETURNING {_GRANT}",
                              *values.values())
    grant = _grant(row)
    assert grant is not None
    return grant


async def grant_by_id(conn: asyncpg.Connection, namespace: str, grant_id: str) -> GrantRow | None:
    return _grant(await conn.fetchrow(f"SELECT {_GRANT} FROM grants WHERE namespace = $1 AND id = $2",
                                      namespace, grant_id))


async def grants_of(conn: asyncpg.Connection, entitlement_id: str, *, include_deleted: bool = True,
                    order_by: str = "createdAt", descending: bool = False) -> list[GrantRow]:
    column = {"id": "id", "createdAt": "created_at", "updatedAt": "updated_at"}[order_by]
    deleted = "" if include_deleted else " AND deleted_at IS NULL"
    rows = await conn.fetch(f"SELECT {_GRANT} FROM grants WHERE entitlement_id = $1{deleted} "
                            f"ORDER BY {column} {'DESC' if descending else 'ASC'}, id", entitlement_id)
    return [g for g in (_grant(r) for r in rows) if g is not None]


async def list_grants(conn: asyncpg.Connection, namespace: str, *, customer_ids: list[str] | None,
                      features: list[str] | None, include_deleted: bool, order_by: str, descending: bool,
                      limit: int, offset: int) -> tuple[int, list[GrantRow]]:
    conditions = ["g.namespace = $1"]
    args: list[Any] = [namespace]
    if customer_ids:
        args.append(customer_ids)
        conditions.append(f"e.customer_id = ANY(${len(args)})")
    if features:
        args.append(features)
        conditions.append(f"(e.feature_key = ANY(${len(args)}) OR e.feature_id = ANY(${len(args)}))")
    if not include_deleted:
        conditions.append("g.deleted_at IS NULL")
    where = " AND ".join(conditions)
    base = f"FROM grants g JOIN entitlements e ON e.id = g.entitlement_id WHERE {where}"
    total = await conn.fetchval(f"SELECT count(*) {base}", *args)
    column = {"id": "g.id", "createdAt": "g.created_at", "updatedAt": "g.updated_at"}[order_by]
    columns = ", ".join("g." + c.strip().replace("::text AS metadata", "::text AS metadata") for c in _GRANT.split(","))
    rows = await conn.fetch(f"SELECT {columns} {base} ORDER BY {column} {'DESC' if descending else 'ASC'}, g.id "
                            f"LIMIT {limit} OFFSET {offset}", *args)
    return total, [g for g in (_grant(r) for r in rows) if g is not None]


async def void_grant(conn: asyncpg.Connection, grant: GrantRow, at: datetime) -> None:
    await conn.execute("UPDATE grants SET voided_at = $2, updated_at = now() WHERE id = $1", grant.id, at)


# -- resets and snapshots --------------------------------------------------------

@dataclass(frozen=True)
class ResetRow:
    reset_time: datetime
    anchor: datetime
    usage_interval: str
    preserve_overage: bool


_RESET = "reset_time, anchor, usage_interval, preserve_overage"


async def resets_of(conn: asyncpg.Connection, entitlement_id: str) -> list[ResetRow]:
    rows = await conn.fetch(f"SELECT {_RESET} FROM usage_resets WHERE entitlement_id = $1 ORDER BY reset_time",
                            entitlement_id)
    return [ResetRow(**dict(r)) for r in rows]


async def insert_reset(conn: asyncpg.Connection, entitlement_id: str, reset: ResetRow) -> None:
    await conn.execute("INSERT INTO usage_resets (id, entitlement_id, reset_time, anchor, usage_interval, "
                       "preserve_overage) VALUES ($1, $2, $3, $4, $5, $6)", new_ulid(), entitlement_id,
                       reset.reset_time, reset.anchor, reset.usage_interval, reset.preserve_overage)


@dataclass
class Snapshot:
    state: State
    epoch: int


_SNAPSHOT = "at, balances::text AS balances, overage, usage, total_grant_usage, checksum, epoch"


def _snapshot(r: Mapping[str, Any]) -> Snapshot:
    balances = {k: Decimal(v) for k, v in json.loads(r["balances"]).items()}
    return Snapshot(State(at=r["at"], balances=balances, overage=r["overage"], usage=r["usage"],
                          total_grant_usage=r["total_grant_usage"], checksum=r["checksum"]), r["epoch"])


def _snapshots_sql(entitlement_id: str, at: str) -> str:
    """The newest 8 snapshots at or before ``at`` (SQL expressions both)."""
    return (f"SELECT {_SNAPSHOT} FROM balance_snapshots WHERE entitlement_id = {entitlement_id} AND at <= {at} "
            "ORDER BY at DESC LIMIT 8")


async def snapshots_at_or_before(conn: asyncpg.Connection, entitlement_id: str, at: datetime) -> list[Snapshot]:
    """Newest first."""
    return [_snapshot(r) for r in await conn.fetch(_snapshots_sql("$1", "$2"), entitlement_id, at)]


async def save_snapshot(conn: asyncpg.Connection, entitlement_id: str, snapshot: Snapshot) -> None:
    s = snapshot.state
    await conn.execute(
        "INSERT INTO balance_snapshots (entitlement_id, at, balances, overage, usage, total_grant_usage, checksum, epoch) "
        "VALUES ($1, $2, $3::text::jsonb, $4, $5, $6, $7, $8) ON CONFLICT (entitlement_id, at) DO UPDATE SET "
        "balances = EXCLUDED.balances, overage = EXCLUDED.overage, usage = EXCLUDED.usage, "
        "total_grant_usage = EXCLUDED.total_grant_usage, checksum = EXCLUDED.checksum, epoch = EXCLUDED.epoch, "
        "created_at = now()",
        entitlement_id, s.at, json.dumps({k: str(v) for k, v in s.balances.items()}), s.overage, s.usage,
        s.total_grant_usage, s.checksum, snapshot.epoch)


async def restamp_snapshot(conn: asyncpg.Connection, entitlement_id: str, at: datetime, epoch: int) -> None:
    await conn.execute("UPDATE balance_snapshots SET epoch = $3 WHERE entitlement_id = $1 AND at = $2",
                       entitlement_id, at, epoch)


async def invalidate_snapshots(conn: asyncpg.Connection, entitlement_ids: list[str], since: datetime) -> None:
    """Drop the snapshots at or after ``since``: something before them changed."""
    await conn.execute("DELETE FROM balance_snapshots WHERE entitlement_id = ANY($1) AND at >= $2",
                       entitlement_ids, since)


async def cache_epoch(conn: asyncpg.Connection, namespace: str, event_type: str) -> int:
    value = await conn.fetchval("SELECT epoch FROM cache_epochs WHERE namespace = $1 AND event_type = $2",
                                namespace, event_type)
    return int(value or 0)



# -- a value's context, in one statement -----------------------------------------

def _fingerprint_sql(entitlement_id: str, customer_id: str) -> str:
    """What a value's inputs were (see :func:`fingerprint`), as four columns."""
    return (f"(SELECT count(*) FROM grants WHERE entitlement_id = {entitlement_id}) AS grant_count, "
            f"(SELECT max(updated_at) FROM grants WHERE entitlement_id = {entitlement_id}) AS grants_at, "
            f"(SELECT count(*) FROM usage_resets WHERE entitlement_id = {entitlement_id}) AS reset_count, "
            f"(SELECT updated_at FROM customers WHERE id = {customer_id}) AS customer_at")


_FINGERPRINT = ("grant_count", "grants_at", "reset_count", "customer_at")


async def fingerprint(conn: asyncpg.Connection, ent: Entitlement) -> tuple[object, ...]:
    """What a value's inputs were: any change in between makes a computed snapshot stale."""
    row = await conn.fetchrow("SELECT " + _fingerprint_sql("$1", "$2"), ent.id, ent.customer_id)
    return tuple(row[name] for name in _FINGERPRINT)


def _names(columns: str) -> list[str]:
    """The output names of a select list (each item's alias, else its column), to read
    the anonymous records (tuples) of :data:`_CONTEXT` by name."""
    names, depth, item = [], 0, ""
    for char in columns + ",":
        if char == "," and depth == 0:
            names.append(item.split(" AS ")[-1].strip().split(".")[-1])
            item = ""
            continue
        depth += (char == "(") - (char == ")")
        item += char
    return names


def _record(columns: str) -> Callable[[tuple[Any, ...]], dict[str, Any]]:
    names = _names(columns)
    return lambda values: dict(zip(names, values, strict=True))


# Everything a metered value reads before its usage, in one round trip (a dozen
# before): the session settings of a meter query (see query.engine._no_jit; they
# apply to the statements after this one), the fingerprint, the customer, feature
# and meter, the grants and resets, the cache epoch, the snapshots at or before $5,
# and the meter query's source (rollup row and tail floor, NULL columns when the
# meter has no rollup). Rows of several columns come as anonymous records, read by
# name through :func:`_record`. $1 namespace, $2 entitlement, $3 customer, $4 feature.
_CONTEXT = f"""
WITH f AS (SELECT {_FEATURE} FROM features WHERE namespace = $1 AND id = $4),
m AS (SELECT {meter_store.COLUMNS} FROM meters WHERE namespace = $1 AND id = (SELECT meter_id FROM f))
SELECT s.*, now() AS now,
       set_config('jit', 'off', true) AS jit, set_config('plan_cache_mode', 'force_custom_plan', true) AS plans,
       {_fingerprint_sql("$2", "$3")},
       (SELECT ROW(c.*) FROM (SELECT {_CUSTOMER} FROM customers c WHERE c.namespace = $1 AND c.id = $3) c) AS customer,
       (SELECT ROW(f.*) FROM f) AS feature,
       (SELECT ROW(m.*) FROM m) AS meter,
       (SELECT e.epoch FROM cache_epochs e, m WHERE e.namespace = m.namespace AND e.event_type = m.event_type)
         AS epoch,
       ARRAY(SELECT ROW(g.*) FROM (SELECT {_GRANT} FROM grants WHERE entitlement_id = $2) g
              ORDER BY g.created_at, g.id) AS grant_rows,
       ARRAY(SELECT ROW(r.*) FROM (SELECT {_RESET} FROM usage_resets WHERE entitlement_id = $2) r
              ORDER BY r.reset_time) AS reset_rows,
       ARRAY(SELECT ROW(b.*) FROM ({_snapshots_sql("$2", "$5")}) b ORDER BY b.at DESC) AS snapshot_rows
  FROM (SELECT) one LEFT JOIN LATERAL ({source_sql("(SELECT meter_id FROM f)")}) s ON true
"""
_CUSTOMER_RECORD = _record(_CUSTOMER)
_FEATURE_RECORD = _record(_FEATURE)
_METER_RECORD = _record(meter_store.COLUMNS)
_GRANT_RECORD = _record(_GRANT)
_RESET_RECORD = _record(_RESET)
_SNAPSHOT_RECORD = _record(_SNAPSHOT)


@dataclass
class Loaded:
    """What :func:`load` read, in one snapshot."""

    now: datetime
    fingerprint: tuple[object, ...]
    customer: Customer
    feature: Feature
    meter: meter_store.Meter
    grants: list[GrantRow]
    resets: list[ResetRow]
    epoch: int
    snapshots: list[Snapshot]  # newest first, at or before load's ``at``
    source: Source | None  # None: the meter has no rollup (deleted)


async def load(conn: asyncpg.Connection, ent: Entitlement, at: datetime | None) -> Loaded:
    """The context of a value of ``ent`` (metered, its feature has a meter) at ``at``
    (None: no snapshots), in one statement."""
    row = await conn.fetchrow(_CONTEXT, ent.namespace, ent.id, ent.customer_id, ent.feature_id, at)
    customer = _customer(_CUSTOMER_RECORD(row["customer"]))
    feature = _feature(_FEATURE_RECORD(row["feature"]))
    assert customer is not None and feature is not None and row["meter"] is not None
    return Loaded(
        now=row["now"], fingerprint=tuple(row[name] for name in _FINGERPRINT), customer=customer, feature=feature,
        meter=meter_store.from_row(_METER_RECORD(row["meter"])),
        grants=[grant for g in row["grant_rows"] if (grant := _grant(_GRANT_RECORD(g))) is not None],
        resets=[ResetRow(**_RESET_RECORD(r)) for r in row["reset_rows"]],
        epoch=int(row["epoch"] or 0),
        snapshots=[_snapshot(_SNAPSHOT_RECORD(b)) for b in row["snapshot_rows"]],
        source=None if row["meter_id"] is None else Source.of(row))
