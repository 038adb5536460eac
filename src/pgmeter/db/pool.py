"""asyncpg pools: the hot paths (sink COPY, queries) run on asyncpg.

Every wait on Postgres is bounded where a caller is waiting for an answer: opening a
connection (``connect_timeout``), getting one from the pool (``acquire_timeout``,
which also bounds handing it back), and for the api every statement
(``command_timeout``). asyncpg enforces the statement bound on the client: when it
passes, it sends Postgres a cancel request for the statement and raises
``TimeoutError``. That works whether Postgres is slow (the cancel stops the work) or
not answering at all (SIGSTOP, a partition: no server-side ``statement_timeout``
would ever fire), and it needs no startup parameter, which a transaction-mode
pooler would refuse.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as Python objects; the text codec keeps it to one json pass.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class Pool(asyncpg.Pool):
    """asyncpg's pool whose ``acquire()`` waits at most ``acquire_timeout`` by default.

    asyncpg applies the acquire timeout to the release as well, so a connection
    stuck in a cancelled statement is terminated instead of holding up the caller.
    """

    def __init__(self, *args: Any, acquire_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquire_timeout = acquire_timeout

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=self.acquire_timeout if timeout is None else timeout)


async def create_pool(dsn: str, *, size: int = 10, min_size: int = 1, connect_timeout: float = 5.0,
                      acquire_timeout: float | None = None, command_timeout: float | None = None) -> asyncpg.Pool:
    """A pool of connections with JSON codecs and bounded waits.

    Only ``application_name`` goes in the startup packet: PgBouncer in transaction
    mode rejects other startup parameters, and the api may sit behind one. Query
    settings are set per transaction where they matter (``query.engine``).
    """
    pool = Pool(
        dsn,
        acquire_timeout=acquire_timeout,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        # Opened at start (so a wrong DSN fails fast), but no floor kept afterwards:
        # asyncpg restores a floor by retrying in the background and logs a traceback
        # per attempt for as long as Postgres is away. Connections open on demand.
        init_size=min(min_size, size),
        min_size=0,
        max_size=size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        loop=None,
        init=_init_connection,
        timeout=connect_timeout,
        command_timeout=command_timeout,
        server_settings={"application_name": "pgmeter"},
    )
    await pool
    return pool
