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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import Gauge

from pgmeter import metric_labels
from pgmeter.config import Settings
from pgmeter.db.pool import create_pool
from pgmeter.dependencies import DEPENDENCY_ERRORS, Dependency, describe
from pgmeter.ingest.limits import EventLimits

if TYPE_CHECKING:  # the roles import the runtime; the runtime only names them
    from pgmeter.ingest.publisher import Publisher
    from pgmeter.query.cache import QueryCache
    from pgmeter.rollup.refresher import Refresher
    from pgmeter.sink.worker import Sink

log = logging.getLogger(__name__)

ROLES = ("api", "sink", "refresher", "lago-sync")

NATS_WATCH_INTERVAL = 1.0  # how often a dead NATS read loop is looked for
REPLICA_LAG_INTERVAL = 1.0  # how often the standby's lag is read (postgres.readUrl)
REPLICA_LAG = Gauge("pgmeter_query_replica_lag_seconds",
                    "How far the standby serving the api's reads (postgres.readUrl) is behind the primary")
PING_TIMEOUT = 2.0  # the Postgres recovery probe's bound


@dataclass(frozen=True)
class Committed:
    """What one sink transaction committed, for post-commit listeners.

    ``touched`` holds each (namespace, event type, subject) with at least one event in
    the transaction (duplicates included: a listener must be idempotent anyway), and
    ``seq`` the highest JetStream sequence of its messages. ``ids`` holds the event ids
    under each of those keys (the quota worker releases gateways' reservations by them).
    """

    seq: int
    touched: frozenset[tuple[str, str, str]]
    ids: Mapping[tuple[str, str, str], list[str]] = field(default_factory=dict)


# A check a meter deletion (``new_group_by`` None) or groupBy edit must pass: given the
# api's connection and the meter's id, it answers why the change is refused (409), or
# None. Rooms whose data relies on meters (features of entitlements) register one.
MeterGuard = Callable[[asyncpg.Connection, str, dict[str, str] | None], Awaitable[str | None]]


# The rooms' services other rooms reach through the runtime, named here by what is used
# of them: the core imports no room, not even to name a type.

class QuotaService(Protocol):
    """The quota worker (pgmeter.quota.worker), as the notify room and the value reads use it."""

    seq: int  # the highest sink sequence the worker has seen
    # Called with each fresh value (a pgmeter.quota.balances.Computed) and the explicit
    # resets behind it.
    listeners: list[Callable[[Any, list[str]], Awaitable[None]]]
    # Whether a listener wants values now, when the worker is not storing them in Valkey.
    interested: list[Callable[[], bool]]


class NotifyService(Protocol):
    """The notification dispatcher (pgmeter.notify.delivery), as the notify routes use it."""

    wake: asyncio.Event  # set to deliver now rather than at the next poll


# A value now: its JSON body and the headers saying how fresh it is.
ValueNow = tuple[dict[str, Any], dict[str, str]]


class QuotaValues(Protocol):
    """Entitlement values now, Valkey first (pgmeter.quota.reader), for the entitlement routes.

    The quota room imports the entitlements room, so the entitlements room does not import
    quota back: the routes find this reader on the runtime, registered by the composition
    root, and compute every value exactly where it is absent.
    """

    def enabled(self, runtime: Runtime) -> bool: ...

    def key_for(self, runtime: Runtime, namespace: str, *, subject: str | None = None,
                customer: str | None = None, feature_key: str) -> str: ...

    async def cached(self, runtime: Runtime, key: str, *, v2: bool, entitlement_id: str | None = None,
                     ) -> tuple[ValueNow | None, bool]: ...

    async def worker_running(self, runtime: Runtime) -> bool: ...

    async def computed(self, runtime: Runtime, namespace: str, entitlement_id: str, *, v2: bool,
                       ) -> ValueNow | None: ...


@dataclass
class Runtime:
    settings: Settings
    roles: frozenset[str]
    # The pool background roles (sink, refresher, Lago) and start-up work use: no
    # statement bound, since a merge or a backfill may run for minutes.
    pool: asyncpg.Pool
    # The pool api requests use: every wait bounded (postgres.statementTimeout,
    # connectTimeout, acquireTimeout), so an unwell Postgres gives a prompt 503. The
    # same pool as ``pool`` in a process that only serves the api, or runs no api.
    api_pool: asyncpg.Pool
    nats: NATS
    js: JetStreamContext
    valkey: Any | None = None  # valkey.asyncio.Valkey when configured
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    dependencies: dict[str, Dependency] = field(default_factory=dict)
    # Called (synchronously, so keep them quick) after each sink commit, before the acks.
    # Optional rooms (the quota worker) register here; the sink knows nothing of them.
    post_commit: list[Callable[[Committed], None]] = field(default_factory=list)
    # Asked, in order, before the api deletes a meter or changes its groupBy; the meters
    # api knows nothing of what they protect.
    meter_guards: list[MeterGuard] = field(default_factory=list)
    # What the roles started, for the api and for each other; None where the role does
    # not run in this process.
    publisher: Publisher | None = None
    query_cache: QueryCache | None = None
    sink: Sink | None = None
    refresher: Refresher | None = None
    quota: QuotaService | None = None
    notify: NotifyService | None = None
    quota_values: QuotaValues | None = None
    # When this process last saw the quota worker's heartbeat in Valkey (monotonic).
    quota_heartbeat_seen: float = float("-inf")
    # The event limits in force, resolved from the settings once.
    event_limits: EventLimits = field(init=False)
    # The pool of the api's read-only event and rollup reads: a standby's
    # (postgres.readUrl) when configured, else ``api_pool``.
    read_pool: asyncpg.Pool | None = None
    # Seconds the standby's data is behind the primary (0 when caught up or no
    # standby), refreshed every REPLICA_LAG_INTERVAL by the api.
    replica_lag: float = 0.0

    def __post_init__(self) -> None:
        self.event_limits = EventLimits.of(self.settings)

    @property
    def query_pool(self) -> asyncpg.Pool:
        return self.read_pool if self.read_pool is not None else self.api_pool

    def dependency(self, name: str) -> Dependency:
        """The state of ``postgres``, ``nats`` or ``valkey`` in this process."""
        found = self.dependencies.get(name)
        if found is None:
            found = self.dependencies[name] = Dependency(name)
        return found

    def spawn(self, name: str, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(_log_crash)
        self.tasks.append(task)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s crashed", task.get_name(), exc_info=task.exception())


# Errors the NATS client reports while the server is away: expected during an
# outage, so they move the state (and count), never log a traceback per attempt.
_NATS_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, nats.errors.UnexpectedEOF, nats.errors.StaleConnectionError,
    nats.errors.NoServersError, nats.errors.ConnectionClosedError, nats.errors.TimeoutError,
)


def nats_servers(url: str) -> list[str]:
    """``nats.url`` may list several servers, comma-separated ("nats://a:4222,nats://b:4222"):
    every seed of a cluster, so the client can connect while any one is down."""
    return [server.strip() for server in url.split(",") if server.strip()]


async def connect_nats(url: str, state: Dependency | None = None, **credentials: str) -> NATS:
    """A NATS connection that keeps reconnecting for as long as the process lives.

    ``credentials`` are nats-py's (user/password, token or user_credentials), from
    :meth:`pgmeter.config.NatsConfig.credentials`. Its callbacks keep ``state`` (the ``nats`` dependency) and the logs to one line
    per change: nats-py's default error callback logs a traceback for every failed
    reconnect attempt, twice a second for as long as the server is away.
    """
    state = state or Dependency("nats")
    logged: dict[str, float] = {}  # error kind -> when last logged

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, _NATS_OUTAGE_ERRORS):
            # Reported before the disconnect callback runs, so this is the outage's line.
            lost = isinstance(exc, nats.errors.UnexpectedEOF | nats.errors.StaleConnectionError)
            state.failed(f"disconnected ({'connection lost' if lost else describe(exc)})")
        else:
            # Not an outage (a slow consumer, a permissions error): worth a line, but a
            # recurring one (a slow consumer on every message) only once a minute.
            DEPENDENCY_ERRORS.labels(state.name).inc()
            kind = describe(exc)
            now = time.monotonic()
            if now - logged.get(kind, -60.0) >= 60.0:
                logged[kind] = now
                log.warning("nats: client error: %s", kind, extra={"dependency": state.name})

    async def on_disconnected() -> None:
        state.failed("disconnected")

    async def on_reconnected() -> None:
        state.recovered()

    return await nats.connect(
        nats_servers(url),
        name="pgmeter",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        allow_reconnect=True,
        connect_timeout=2,
        **credentials,
        # The client's own PINGs (never cancelled, unlike a flush that times out)
        # find a silent server: three unanswered at 5 s intervals and it reconnects.
        ping_interval=5,
        max_outstanding_pings=3,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )


def nats_read_loop_alive(nc: NATS) -> bool:
    """False when the client says it is connected but no longer reads from the socket.

    nats-py (2.16) ends its read loop on any unexpected exception, e.g. the
    ``InvalidStateError`` when a PONG arrives for a flush that timed out, and keeps
    reporting ``is_connected``: every later request then times out. There is no
    public accessor for the loop, hence the private attribute.
    """
    task = getattr(nc, "_reading_task", None)
    return task is None or not task.done()


async def _heal_nats(runtime: Runtime) -> None:
    """Reconnect a NATS client whose read loop died (see :func:`nats_read_loop_alive`)."""
    while True:
        await asyncio.sleep(NATS_WATCH_INTERVAL)
        nc = runtime.nats
        if nc.is_connected and not nats_read_loop_alive(nc):
            # Rare and worth a line of its own whatever the dependency's state.
            log.warning("nats: the client stopped reading from its connection; reconnecting")
            runtime.dependency("nats").failed("the client stopped reading")
            try:
                await nc.force_reconnect()
            except Exception as exc:  # the next round tries again
                log.warning("nats: reconnect failed: %s", describe(exc))


def connect_valkey(settings: Settings) -> Any | None:
    if not settings.valkey.url:
        return None
    import valkey.asyncio as valkey_asyncio

    if settings.valkey.cluster:
        # The node map is read on first use (a lazy start, as the single-node client connects).
        return valkey_asyncio.ValkeyCluster.from_url(
            settings.valkey.url,
            password=settings.valkey.password,
            socket_timeout=settings.valkey.timeout,
            socket_connect_timeout=settings.valkey.timeout,
        )
    return valkey_asyncio.from_url(
        settings.valkey.url,
        password=settings.valkey.password,
        socket_timeout=settings.valkey.timeout,
        socket_connect_timeout=settings.valkey.timeout,
    )


def _api_dsn(settings: Settings) -> str:
    """api requests need no session state (no LISTEN, COPY or session advisory locks),
    so they may go through a transaction-mode pooler."""
    return settings.postgres.query_url or settings.postgres.url


def _dsn_for(settings: Settings, roles: frozenset[str]) -> str:
    """The DSN of ``Runtime.pool``: the pooler only in a process that only serves the
    api; every other role needs the direct connection."""
    return _api_dsn(settings) if roles == {"api"} else settings.postgres.url


@asynccontextmanager
async def open_runtime(settings: Settings, roles: frozenset[str]) -> AsyncIterator[Runtime]:
    metric_labels.configure(settings.metrics.tenant_labels)
    pg = settings.postgres
    connect_timeout = pg.connect_timeout.total_seconds()
    api_pool = None
    if "api" in roles:
        api_pool = await create_pool(_api_dsn(settings), size=pg.pool_size, connect_timeout=connect_timeout,
                                     acquire_timeout=pg.acquire_timeout.total_seconds(),
                                     command_timeout=pg.statement_timeout.total_seconds())
    if roles == {"api"} and api_pool is not None:
        pool = api_pool
    else:
        pool = await create_pool(_dsn_for(settings, roles), size=pg.pool_size, connect_timeout=connect_timeout)
    nats_state = Dependency("nats")
    nc = await connect_nats(settings.nats.url, nats_state, **settings.nats.credentials())
    read_pool = None
    if "api" in roles and pg.read_url:
        read_pool = await create_pool(pg.read_url, size=pg.pool_size, connect_timeout=connect_timeout,
                                      acquire_timeout=pg.acquire_timeout.total_seconds(),
                                      command_timeout=pg.statement_timeout.total_seconds())
    runtime = Runtime(settings=settings, roles=roles, pool=pool, api_pool=api_pool or pool, nats=nc, js=nc.jetstream(),
                      valkey=connect_valkey(settings), read_pool=read_pool)
    runtime.dependencies["nats"] = nats_state
    runtime.dependencies["postgres"] = Dependency("postgres", probe=lambda: _ping_postgres(runtime))
    runtime.dependencies["valkey"] = Dependency("valkey")
    runtime.spawn("nats-healer", _heal_nats(runtime))
    if read_pool is not None:
        runtime.spawn("replica-lag", _watch_replica_lag(runtime))
    try:
        yield runtime
    finally:
        for task in runtime.tasks:
            task.cancel()
        await asyncio.gather(*runtime.tasks, return_exceptions=True)
        for dependency in runtime.dependencies.values():
            dependency.close()
        await nc.drain() if nc.is_connected else await nc.close()
        if runtime.valkey is not None:
            await runtime.valkey.aclose()
        if runtime.api_pool is not pool:
            await runtime.api_pool.close()
        if read_pool is not None:
            await read_pool.close()
        await pool.close()


# How far the standby's data is behind: 0 on a primary (a promoted standby) or when it
# has replayed everything it received (an idle primary sends nothing, and the last
# replayed commit may be old without any lag), else the age of the last replayed
# commit, or the standby's uptime if it has replayed none since it started (an upper
# bound).
_REPLICA_LAG = """
SELECT CASE WHEN NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM now() - coalesce(pg_last_xact_replay_timestamp(), pg_postmaster_start_time()))
       END::float8
"""


async def _watch_replica_lag(runtime: Runtime) -> None:
    """Keep ``runtime.replica_lag`` and its gauge current; a standby that does not
    answer keeps the last value (its queries fail on their own)."""
    assert runtime.read_pool is not None
    while True:
        try:
            async with runtime.read_pool.acquire(timeout=PING_TIMEOUT) as conn:
                runtime.replica_lag = max(0.0, float(await conn.fetchval(_REPLICA_LAG, timeout=PING_TIMEOUT)))
            REPLICA_LAG.set(runtime.replica_lag)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.info("replica lag unknown: %s", describe(exc))
        await asyncio.sleep(REPLICA_LAG_INTERVAL)


async def _ping_postgres(runtime: Runtime) -> None:
    async with runtime.api_pool.acquire(timeout=PING_TIMEOUT) as conn:
        await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT)

