"""Check-and-reserve (pgmeter.quota.layout.RESERVE_SCRIPT) against a real Valkey.

The hashes here are written by pgmeter's own writer (:func:`pgmeter.quota.balances.write`)
from hand-made values, so these tests need no Postgres: what they check is the scripts'
arithmetic under concurrency and time. The whole path (gateway -> reservation -> event ->
sink -> the worker's write dropping the reservation) is in test_gateway_example.py.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import valkey
import valkey.asyncio

from pgmeter.devstack import services
from pgmeter.quota import balances, layout

# One prefix per test run of this module: each test writes its own key.
PREFIX = f"r{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"{PREFIX}{request.node.name[:20]}:"


def key_of(prefix: str) -> str:
    return layout.subject_key(prefix, "default", "tpp", "calls")


@pytest.fixture
def vk(valkey_server: services.ProcessServer) -> Iterator[valkey.Valkey]:
    client = valkey.Valkey.from_url(valkey_server.url)
    yield client
    client.close()


def value(prefix: str, balance: Decimal, *, soft: bool = False, valid_for_ms: int = 600_000, as_of: datetime | None = None,
          entitlement: str = "ent-1") -> balances.Computed:
    as_of = as_of or datetime.now(UTC)
    valid_until = layout.millis(datetime.now(UTC)) + valid_for_ms
    fields = {"v": layout.VERSION, "entitlementId": entitlement, "hasAccess": "1" if soft or balance > 0 else "0",
              "balance": str(balance), "usage": "0", "overage": "0", "totalAvailable": str(balance),
              "softLimit": "1" if soft else "0", "grantBalances": "{}", "periodStart": "0", "periodEnd": "0",
              "validUntil": str(valid_until), "asOf": str(layout.micros(as_of)), "seq": "0", "updatedAt": "0"}
    return balances.Computed(entitlement, [key_of(prefix)], fields, as_of, valid_until)


def write(url: str, prefix: str, computed: balances.Computed, release: tuple[str, ...] = ()) -> bool:
    async def go() -> bool:
        client = valkey.asyncio.from_url(url)
        try:
            return await balances.write(client, prefix, computed, release)
        finally:
            await client.aclose()
    return asyncio.run(go())


def reserve(vk: valkey.Valkey, prefix: str, ident: str, amount: str = "1", ttl_ms: int = 60_000) -> tuple[int, str]:
    status, available = vk.eval(layout.RESERVE_SCRIPT, 1, key_of(prefix), ident, amount, str(ttl_ms))
    return int(status), available.decode()


def held(vk: valkey.Valkey, prefix: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in vk.hgetall(key_of(prefix)).items() if k.startswith(b"r:")}


def test_concurrent_reservers_never_overspend(valkey_server: services.ProcessServer, prefix: str) -> None:
    """300 reservations of 1-3 units from 40 connections at once against a balance of 100."""
    assert write(valkey_server.url, prefix, value(prefix, Decimal(100)))
    rng = random.Random(14)
    wanted = [rng.choice((1, 2, 3)) for _ in range(300)]

    async def go() -> list[tuple[int, int, str]]:
        client = valkey.asyncio.Valkey(connection_pool=valkey.asyncio.BlockingConnectionPool.from_url(
            valkey_server.url, max_connections=40))
        start = asyncio.Event()

        async def one(i: int) -> tuple[int, int, str]:
            await start.wait()
            status, available = await client.eval(layout.RESERVE_SCRIPT, 1, key_of(prefix), f"call-{i}",
                                                  str(wanted[i]), "60000")
            return int(status), wanted[i], available.decode()

        tasks = [asyncio.create_task(one(i)) for i in range(len(wanted))]
        await asyncio.sleep(0.05)
        start.set()
        try:
            return await asyncio.gather(*tasks)
        finally:
            await client.aclose()

    results = asyncio.run(go())
    granted = [amount for status, amount, _ in results if status == 1]
    refused = [amount for status, amount, _ in results if status == 0]
    assert len(granted) + len(refused) == len(wanted)
    # The independent count: what was granted fits the balance ...
    assert sum(granted) <= 100
    # ... and nothing was refused that fit (what is left is less than every refused amount).
    assert refused and 100 - sum(granted) < min(refused)
    vk = valkey.Valkey.from_url(valkey_server.url)
    try:
        holds = held(vk, prefix)
        assert sum(int(v.split()[0]) for v in holds.values()) == sum(granted) and len(holds) == len(granted)
        # Each answer's "available" is what was left right after it (a strictly decreasing trail).
        trail = sorted((Decimal(available) for status, _, available in results if status == 1), reverse=True)
        assert trail[-1] == 100 - sum(granted)
    finally:
        vk.close()


def test_reservations_expire_are_replaced_released_and_survive_writes(
        valkey_server: services.ProcessServer, vk: valkey.Valkey, prefix: str) -> None:
    url = valkey_server.url
    assert reserve(vk, prefix, "a") == (-1, "")  # no hash yet: ask pgmeter
    assert write(url, prefix, value(prefix, Decimal(5)))
    assert reserve(vk, prefix, "a", "3", ttl_ms=300) == (1, "2")
    assert reserve(vk, prefix, "a", "4", ttl_ms=300) == (1, "1")  # the same id again: replaced, not added
    assert reserve(vk, prefix, "b", "2") == (0, "1")
    time.sleep(0.4)
    # "a" expired: its units are free again, and it is gone from the hash.
    assert reserve(vk, prefix, "b", "2") == (1, "3")
    assert set(held(vk, prefix)) == {"r:b"}

    # A new value (its events not among the reservations) keeps the holds; the value that
    # counts event "b" drops its hold in the same script.
    assert write(url, prefix, value(prefix, Decimal(5)))
    assert set(held(vk, prefix)) == {"r:b"}
    assert reserve(vk, prefix, "c", "1") == (1, "2")
    assert write(url, prefix, value(prefix, Decimal(3)), release=("b",))
    assert set(held(vk, prefix)) == {"r:c"} and reserve(vk, prefix, "d", "2") == (1, "0")
    # A slower computation (an older snapshot) is not stored, but its events' holds still
    # go: the newer value stored counts them too.
    older = value(prefix, Decimal(99), as_of=datetime(2020, 1, 1, tzinfo=UTC))
    assert not write(url, prefix, older, release=("c",))
    assert set(held(vk, prefix)) == {"r:d"}
    assert layout.Quota.parse(vk.hgetall(key_of(prefix))).balance == 3  # type: ignore[union-attr]
    # The gateway's own release of a call it did not serve.
    vk.hdel(key_of(prefix), "r:d")
    assert reserve(vk, prefix, "e", "3") == (1, "0")

    # Past validUntil, no reservation: the value may have changed.
    assert write(url, prefix, value(prefix, Decimal(50), valid_for_ms=-1))
    assert reserve(vk, prefix, "f") == (-1, "")
    # A soft limit is never refused and holds nothing.
    assert write(url, prefix, value(prefix, Decimal(0), soft=True))
    assert reserve(vk, prefix, "g", "1000") == (1, "0") and "r:g" not in held(vk, prefix)
    # An exhausted hard limit refuses any amount; nonsense amounts are errors, not holds.
    assert write(url, prefix, value(prefix, Decimal(0)))
    assert reserve(vk, prefix, "h", "0.5")[0] == 0
    for bad in ("0", "-1", "x"):
        with pytest.raises(valkey.ResponseError):
            reserve(vk, prefix, "i", bad)
    # An entitlement's value gone: its hashes, holds and all, go too.
    gone = balances.Computed("ent-1", [key_of(prefix)], None, datetime.now(UTC), 0)
    assert write(url, prefix, gone)
    assert vk.exists(key_of(prefix)) == 0
