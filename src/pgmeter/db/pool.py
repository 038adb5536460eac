"""asyncpg pools: the hot paths (sink COPY, queries) run on asyncpg."""

from __future__ import annotations

import json

import asyncpg


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as Python objects; the text codec keeps it to one json pass.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, *, size: int = 10, min_size: int = 1) -> asyncpg.Pool:
    """A pool of connections with JSON codecs.

    Only ``application_name`` goes in the startup packet: PgBouncer in transaction
    mode rejects other startup parameters, and the api may sit behind one. Query
    settings are set per transaction where they matter (``query.engine``).
    """
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min(min_size, size),
        max_size=size,
        init=_init_connection,
        server_settings={"application_name": "pgmeter"},
    )
    assert pool is not None
    return pool
