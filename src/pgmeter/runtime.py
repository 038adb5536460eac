"""The connections one pgmeter process shares between its roles.

A process runs one or more roles (``api``, ``sink``, ``refresher``, ``lago-sync``).
They share one asyncpg pool, one NATS connection and one Valkey client, opened
when the process starts and closed when it stops. Background roles run as tasks
that are cancelled on shutdown; each must leave no half-done work behind (every
write they make is transactional and every ack follows a commit).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from pgmeter.config import Settings
from pgmeter.db.pool import create_pool

log = logging.getLogger(__name__)

ROLES = ("api", "sink", "refresher", "lago-sync")


@dataclass
class Runtime:
    settings: Settings
    roles: frozenset[str]
    pool: asyncpg.Pool
    nats: NATS
    js: JetStreamContext
    valkey: Any | None = None  # valkey.asyncio.Valkey when configured
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Filled by roles that want to be checked by /readyz: name -> async check.
    readiness: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def spawn(self, name: str, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(_log_crash)
        self.tasks.append(task)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s crashed", task.get_name(), exc_info=task.exception())


async def connect_nats(url: str, **credentials: str) -> NATS:
    """A NATS connection that keeps reconnecting for as long as the process lives.

    ``credentials`` are nats-py's (user/password, token or user_credentials), from
    :meth:`pgmeter.config.NatsConfig.credentials`.
    """
    return await nats.connect(
        url,
        name="pgmeter",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        allow_reconnect=True,
        connect_timeout=2,
        **credentials,
    )


def connect_valkey(settings: Settings) -> Any | None:
    if not settings.valkey.url:
        return None
    import valkey.asyncio as valkey_asyncio

    return valkey_asyncio.from_url(
        settings.valkey.url,
        password=settings.valkey.password,
        socket_timeout=settings.valkey.timeout,
        socket_connect_timeout=settings.valkey.timeout,
    )


def _dsn_for(settings: Settings, roles: frozenset[str]) -> str:
    """A process that only serves the API may go through a transaction-mode pooler:
    it needs no session state (no LISTEN, COPY or session advisory locks). Every
    other role needs the direct connection."""
    if roles == {"api"} and settings.postgres.query_url:
        return settings.postgres.query_url
    return settings.postgres.url


@asynccontextmanager
async def open_runtime(settings: Settings, roles: frozenset[str]) -> AsyncIterator[Runtime]:
    pool = await create_pool(_dsn_for(settings, roles), size=settings.postgres.pool_size)
    nc = await connect_nats(settings.nats.url, **settings.nats.credentials())
    runtime = Runtime(settings=settings, roles=roles, pool=pool, nats=nc, js=nc.jetstream(),
                      valkey=connect_valkey(settings))
    try:
        yield runtime
    finally:
        for task in runtime.tasks:
            task.cancel()
        await asyncio.gather(*runtime.tasks, return_exceptions=True)
        await nc.drain() if nc.is_connected else await nc.close()
        if runtime.valkey is not None:
            await runtime.valkey.aclose()
        await pool.close()
