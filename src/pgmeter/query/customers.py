"""Customers as meter queries see them: an id stands for a set of event subjects.

OpenMeter's meter query takes ``filterCustomerId`` and resolves each id to the
customer's usage attribution (its ``key`` and ``usageAttribution.subjectKeys``).
That resolution lives here, in the core, rather than behind a hook the
entitlements room registers: it is part of the meter query's own contract (an
unknown id is a 404 whether or not anything else uses customers), and the tables
it reads come with the core's migrations. It reads two tables and knows nothing
of entitlements; the customer CRUD and the entitlement engine stay in their room.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg


class UnknownCustomer(LookupError):
    """Customer ids with no live customer in the namespace (a meter query answers 404
    naming the first, as OpenMeter; the events list 400 naming them all)."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"customer with id {missing[0]} not found")
        self.missing = missing


async def attribution(db: asyncpg.Pool | asyncpg.Connection, namespace: str,
                      ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each live customer's usage subjects, in the order the ids came (repeats once).

    Raises :class:`UnknownCustomer` for the ids that name no live customer: a
    deleted customer no longer answers queries, as OpenMeter lists live ones only.
    """
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return {}
    rows = await db.fetch(
        "SELECT c.id, c.key, array_remove(array_agg(s.subject_key ORDER BY s.subject_key), NULL) AS keys "
        "FROM customers c LEFT JOIN customer_subjects s ON s.customer_id = c.id AND s.deleted_at IS NULL "
        "WHERE c.namespace = $1 AND c.id = ANY($2::text[]) AND c.deleted_at IS NULL GROUP BY c.id, c.key",
        namespace, wanted)
    found = {row["id"]: subjects(row["key"], row["keys"]) for row in rows}
    missing = [customer_id for customer_id in wanted if customer_id not in found]
    if missing:
        raise UnknownCustomer(missing)
    return {customer_id: found[customer_id] for customer_id in wanted}


def subjects(key: str | None, subject_keys: Sequence[str]) -> tuple[str, ...]:
    """The event subjects whose usage is a customer's: its key and its subject keys, sorted."""
    return tuple(sorted({*subject_keys, *([key] if key else [])}))
