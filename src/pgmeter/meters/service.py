"""Meters declared in the config file: validated, then made real at start.

:func:`config_meters` turns the file's plain definitions into :class:`MeterSpec`
under the same rules and limits as the API (the CLI calls it right after loading
the file, so a bad meter is a one-line configuration error with exit 2, before any
connection). Every role calls :func:`start`. Config meters are created in ``settings.namespace``
when missing; a database meter with the same slug that differs stops the process
with one line saying what differs (as OpenMeter does), rather than letting the
file and the database silently disagree. Several processes may start at once: an
advisory transaction lock serialises them, and whoever comes second finds the
work done.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from pydantic import ValidationError

from pgmeter.config import ConfigError, Settings, invalid
from pgmeter.meters import store
from pgmeter.meters.model import MeterSpec, check_limits
from pgmeter.rollup import objects
from pgmeter.runtime import Runtime

log = logging.getLogger(__name__)

# Arbitrary constant all pgmeter processes agree on (migrations use ...001).
CONFIG_METERS_LOCK_KEY = 7_283_110_004


class MeterConfigError(RuntimeError):
    """A config meter disagrees with the database. The message is one line."""


def config_meters(settings: Settings) -> list[MeterSpec]:
    """The config file's meters, validated; raises :class:`ConfigError` naming the file
    and the field, as for any other bad setting."""
    source, limits = settings.source, settings.limits
    if len(settings.meters) > limits.meters_per_namespace:
        raise ConfigError(f"{source}: meters: {len(settings.meters)} meters, more than "
                          f"limits.metersPerNamespace ({limits.meters_per_namespace})")
    specs = []
    for index, definition in enumerate(settings.meters):
        try:
            spec = MeterSpec.model_validate(definition)
        except ValidationError as exc:
            raise invalid(source, exc, at=("meters", index)) from None
        problems = check_limits(spec, group_by_keys=limits.meter_group_by_keys,
                                json_path_bytes=limits.json_path_bytes, json_path_depth=limits.json_path_depth)
        if problems:
            raise ConfigError(f"{source}: meters.{index} ({spec.slug}): "
                              + "; ".join(f"{field}: {message}" for field, message in problems))
        specs.append(spec)
    slugs = [spec.slug for spec in specs]
    duplicates = sorted({slug for slug in slugs if slugs.count(slug) > 1})
    if duplicates:
        raise ConfigError(f"{source}: meters: duplicate slug {', '.join(duplicates)}")
    return specs


def _fields(name: str, description: str | None, spec_like: Any) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "aggregation": str(spec_like.aggregation),
        "eventType": spec_like.event_type,
        "eventFrom": spec_like.event_from,
        "valueProperty": spec_like.value_property,
        "groupBy": dict(sorted(spec_like.group_by.items())),
        "metadata": spec_like.metadata,
    }


def differences(meter: store.Meter, spec: MeterSpec) -> list[str]:
    """What differs between a database meter and its config declaration."""
    have = _fields(meter.name, meter.description, meter)
    want = _fields(spec.display_name, spec.description, spec)
    return [f"{key} {have[key]!r} in the database, {want[key]!r} in the config"
            for key in want if have[key] != want[key]]


async def sync_config_meters(conn: asyncpg.Connection, namespace: str, specs: list[MeterSpec]) -> list[str]:
    """Create missing config meters; raise :class:`MeterConfigError` on a conflict.

    Also rebuilds missing rollup objects of active meters (a repair that should
    never be needed, but costs one query). Returns the slugs it created.
    """
    created: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", CONFIG_METERS_LOCK_KEY)
        for spec in specs:
            meter = await store.get_by_slug(conn, namespace, spec.slug)
            if meter is None:
                try:
                    await store.create(conn, namespace, spec)
                    created.append(spec.slug)
                    continue
                except store.SlugTaken:  # created through the API a moment ago
                    meter = await store.get_by_slug(conn, namespace, spec.slug)
                    assert meter is not None
            diff = differences(meter, spec)
            if diff:
                raise MeterConfigError(
                    f"config meter {spec.slug!r} differs from the meter in the database "
                    f"(namespace {namespace!r}): {'; '.join(diff)}. Change the config or the meter "
                    f"(PUT /api/v1/meters/{spec.slug}) so they agree.")
        orphans = await conn.fetch(
            "SELECT m.id FROM meters m WHERE m.deleted_at IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM meter_rollups r WHERE r.meter_id = m.id)")
        for row in orphans:
            meter = await _by_id_any(conn, row["id"])
            log.warning("rebuilding missing rollup objects", extra={"meter": meter.slug})
            await objects.create(conn, meter.id, meter.namespace, meter.slug, meter.spec)
    for slug in created:
        log.info("created config meter", extra={"meter": slug, "namespace": namespace})
    return created


async def _by_id_any(conn: asyncpg.Connection, meter_id: str) -> store.Meter:
    namespace = await conn.fetchval("SELECT namespace FROM meters WHERE id = $1", meter_id)
    meter = await store.get_by_id(conn, namespace, meter_id)
    assert meter is not None
    return meter


async def start(runtime: Runtime) -> None:
    settings = runtime.settings
    async with runtime.pool.acquire() as conn:
        try:
            await sync_config_meters(conn, settings.namespace, config_meters(settings))
        except MeterConfigError as exc:
            log.error(str(exc))
            raise
