"""Valkey cache for meter queries: settled windows from the cache, the live part fresh.

A window is *settled* once it ended more than ``valkey.settleAfter`` ago. Only
events dated inside settled windows can change a settled answer, and the sink
bumps ``cache_epochs`` for (namespace, event type) in the same transaction that
commits any event older than half that horizon. The cache key carries the epoch,
read before the answer is computed, so a cached answer is never staler than an
uncached one: every event that could change it either was committed before the
epoch was read (and is in the answer) or bumped the epoch (and changed the key).
The margin of half the horizon covers sink transactions that started before the
query and commit after it.

A windowed query is split at the last window boundary before the horizon: the
settled windows come from the cache, the rest is always computed. A query without
windows is cached only when it lies wholly in settled time.

Valkey being down or slow never fails a query: each call has a short timeout,
failures are counted as bypasses and Valkey is left alone for a second after one.

Answers are bounded: at most ``limits.queryMaxRows`` rows (more is a
:class:`~pgmeter.query.params.TooManyRows`), rendered in chunks as they are sent,
and stored only when the rendering is at most ``limits.cacheMaxEntryBytes``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
from prometheus_client import Counter
from valkey.exceptions import TimeoutError as ValkeyTimeoutError

from pgmeter.config import Settings
from pgmeter.meters.store import Meter
from pgmeter.query.engine import run_query
from pgmeter.query.params import QueryError, QueryParams, QueryResult, QueryRow, TooManyRows, WindowSize

log = logging.getLogger(__name__)

CACHE_REQUESTS = Counter("pgmeter_cache_requests_total", "Meter queries that could use the cache, by outcome",
                         ["result"])
CACHE_HITS = Counter("pgmeter_cache_hits_total", "Meter queries whose settled part came from Valkey")
CACHE_TOO_LARGE = Counter("pgmeter_cache_too_large_total",
                          "Meter query answers not cached because they exceed limits.cacheMaxEntryBytes")
CACHE_BYPASS = Counter("pgmeter_cache_bypass_total", "Meter queries answered without Valkey because it failed",
                       ["reason"])

_TRUNC_UNIT = {WindowSize.MINUTE: "minute", WindowSize.HOUR: "hour", WindowSize.DAY: "day",
               WindowSize.MONTH: "month"}
# After a Valkey failure, skip it for this long rather than pay its timeout on every query.
_BACKOFF_SECONDS = 1.0


# A rendered answer: the cached bytes, or chunks rendered while they are sent.
Body = bytes | AsyncIterator[bytes]


async def collect(body: Body) -> bytes:
    """The whole answer as bytes (for callers that do not stream)."""
    if isinstance(body, bytes):
        return body
    return b"".join([chunk async for chunk in body])


@dataclasses.dataclass(frozen=True)
class _Moment:
    epoch: int
    version: int
    cut: datetime      # now - settleAfter: everything before it is settled
    split: datetime    # the last window boundary at or before ``cut``


class QueryCache:
    def __init__(self, valkey: Any | None, settings: Settings) -> None:
        self.valkey = valkey
        self.prefix = settings.valkey.key_prefix
        self.timeout = settings.valkey.timeout
        self.settle_after = settings.valkey.settle_after
        self.ttl = int(settings.valkey.ttl.total_seconds())
        self.max_rows = settings.limits.query_max_rows
        self.max_entry_bytes = settings.limits.cache_max_entry_bytes
        self._skip_until = 0.0

    async def respond(self, pool: asyncpg.Pool, meter: Meter, params: QueryParams, variant: str,
                      render: Callable[[QueryResult], Iterable[bytes]]) -> Body:
        """The rendered answer (``variant`` names the rendering, e.g. json or csv).

        A query wholly in settled time is cached as the rendered bytes, so a hit
        costs one Valkey GET and no decoding, however many rows the answer has.
        Otherwise the answer is computed here (so a bad or too big query raises
        before anything is sent) and rendered chunk by chunk as the caller iterates.
        """
        if self.valkey is None:
            return self._stream(render(await self._run(pool, meter, params)), None)
        moment = await self._moment(pool, meter, params)
        settled, live = _split(params, moment)
        if settled is None or live is not None:
            return self._stream(render(await self._answer(pool, meter, params, moment, settled, live)), None)
        key = f"{self._key(meter, params, moment)}:{variant}"
        found = await self._valkey_call("get", key)
        if isinstance(found, bytes):
            CACHE_REQUESTS.labels("hit").inc()
            CACHE_HITS.inc()
            return found
        CACHE_REQUESTS.labels("miss" if found is None else "bypass").inc()
        result = await self._run(pool, meter, params)
        return self._stream(render(result), key if found is None else None)

    async def _run(self, pool: asyncpg.Pool, meter: Meter, params: QueryParams) -> QueryResult:
        return await run_query(pool, meter, params, max_rows=self.max_rows)

    async def _stream(self, chunks: Iterable[bytes], key: str | None) -> AsyncIterator[bytes]:
        """Yield the rendered chunks; then store them under ``key`` if they fit an entry.

        Each chunk is rendered when the response asks for it, so the event loop runs
        between chunks and a large answer is never held twice.
        """
        kept: list[bytes] = []
        size = 0
        for chunk in chunks:
            if key is not None:
                size += len(chunk)
                if size <= self.max_entry_bytes:
                    kept.append(chunk)
                else:
                    CACHE_TOO_LARGE.inc()
                    key, kept = None, []
            yield chunk
        if key is not None:
            await self._valkey_call("set", key, b"".join(kept), ex=self.ttl)

    async def _answer(self, pool: asyncpg.Pool, meter: Meter, params: QueryParams, moment: _Moment,
                      settled: QueryParams | None, live: QueryParams | None) -> QueryResult:
        if settled is None:
            CACHE_REQUESTS.labels("live").inc()
            return await self._run(pool, meter, params)
        cached = await self._cached(pool, meter, settled, moment)
        if live is None:
            return cached
        fresh = await self._run(pool, meter, live)
        if len(cached.rows) + len(fresh.rows) > self.max_rows:
            raise TooManyRows(self.max_rows)
        return QueryResult(rows=[*cached.rows, *fresh.rows], watermark=fresh.watermark)

    async def _moment(self, pool: asyncpg.Pool, meter: Meter, params: QueryParams) -> _Moment:
        unit = _TRUNC_UNIT[params.window_size] if params.window_size else "second"
        try:
            row = await self._moment_row(pool, meter, unit, params.window_time_zone)
        except asyncpg.InvalidParameterValueError:
            # A zone Python's database knows and this server's does not.
            raise QueryError("windowTimeZone", f"invalid time zone: {params.window_time_zone!r}") from None
        return _Moment(row["epoch"], row["version"], row["cut"], row["split"])

    async def _moment_row(self, pool: asyncpg.Pool, meter: Meter, unit: str, zone: str) -> asyncpg.Record:
        return await pool.fetchrow(
            """
            SELECT coalesce((SELECT epoch FROM cache_epochs WHERE namespace = $1 AND event_type = $2), 0) AS epoch,
                   coalesce((SELECT version FROM meter_rollups WHERE meter_id = $3), 0) AS version,
                   now() - $4::interval AS cut,
                   date_trunc($5, now() - $4::interval, $6) AS split
            """,
            meter.namespace, meter.event_type, meter.id, self.settle_after, unit, zone)

    async def _cached(self, pool: asyncpg.Pool, meter: Meter, params: QueryParams, moment: _Moment) -> QueryResult:
        key = self._key(meter, params, moment)
        found = await self._valkey_call("get", key)
        if isinstance(found, bytes):
            CACHE_REQUESTS.labels("hit").inc()
            CACHE_HITS.inc()
            return _decode(found)
        CACHE_REQUESTS.labels("miss" if found is None else "bypass").inc()
        result = await self._run(pool, meter, params)
        if found is None:  # Valkey answered "not there": worth filling
            encoded = _encode(result)
            if len(encoded) <= self.max_entry_bytes:
                await self._valkey_call("set", key, encoded, ex=self.ttl)
            else:
                CACHE_TOO_LARGE.inc()
        return result

    def _key(self, meter: Meter, params: QueryParams, moment: _Moment) -> str:
        shape = {
            "from": params.from_.isoformat() if params.from_ else None,
            "to": params.to.isoformat() if params.to else None,
            "window": params.window_size, "tz": params.window_time_zone,
            "subjects": sorted(params.subjects), "groupBy": list(params.group_by),
            "filter": {k: sorted(v) for k, v in sorted(params.filter_group_by.items())},
            "advanced": {k: f.canonical() for k, f in sorted(params.advanced_filters.items())},
            # The subjects too: an answer by customer changes when its subject keys do.
            "customers": {k: sorted(v) for k, v in sorted(params.customers.items())},
            "meter": meter.updated_at.isoformat(),
        }
        digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:32]
        return f"{self.prefix}q:{meter.id}:v{moment.version}:e{moment.epoch}:{digest}"

    async def _valkey_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The Valkey answer, or ``False`` when Valkey failed or is being skipped."""
        if time.monotonic() < self._skip_until:
            CACHE_BYPASS.labels("backoff").inc()
            return False
        error: Exception
        try:
            return await asyncio.wait_for(getattr(self.valkey, method)(*args, **kwargs), self.timeout * 2)
        except (TimeoutError, ValkeyTimeoutError) as exc:
            reason, error = "timeout", exc
        except Exception as exc:  # connection refused, reset, protocol: all mean "answer without it"
            reason, error = "error", exc
        self._skip_until = time.monotonic() + _BACKOFF_SECONDS
        CACHE_BYPASS.labels(reason).inc()
        log.warning("valkey unavailable, answering from Postgres", extra={"reason": reason, "error": str(error)})
        return False


def _split(params: QueryParams, moment: _Moment) -> tuple[QueryParams | None, QueryParams | None]:
    """(settled part or None, live part or None) of a query."""
    if params.window_size is None:
        if params.to is not None and params.to <= moment.cut:
            return params, None
        return None, None
    split = moment.split
    if split > moment.cut:
        # date_trunc picked the later of two local midnights (a DST fall-back at
        # midnight): the boundary lies past the horizon, so nothing here is settled.
        return None, params
    if params.to is not None and params.to <= split:
        return params, None
    if params.from_ is not None and params.from_ >= split:
        return None, params
    return dataclasses.replace(params, to=split), dataclasses.replace(params, from_=split)


def _encode(result: QueryResult) -> bytes:
    rows = [[str(r.value), r.window_start.isoformat(), r.window_end.isoformat(), r.subject, r.group_by,
             r.customer_id] for r in result.rows]
    return json.dumps({"rows": rows, "watermark": result.watermark}).encode()


def _decode(data: bytes) -> QueryResult:
    loaded = json.loads(data)
    rows = [QueryRow(value=Decimal(v), window_start=datetime.fromisoformat(ws), window_end=datetime.fromisoformat(we),
                     subject=subject, group_by=group_by, customer_id=customer_id)
            for v, ws, we, subject, group_by, customer_id in loaded["rows"]]
    return QueryResult(rows=rows, watermark=loaded["watermark"])

