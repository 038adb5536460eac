"""examples/gateway: the quota middleware in front of an app, against real Valkey and pgmeter."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import valkey
import valkey.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pgmeter.config import Settings
from pgmeter.quota import layout
from tests.support.app import AppServer

METER = {"slug": "api_calls", "aggregation": "SUM", "eventType": "api.call", "valueProperty": "$.n"}


def load_gateway() -> Any:
    path = Path(__file__).resolve().parents[1] / "examples" / "gateway" / "gateway.py"
    spec = importlib.util.spec_from_file_location("gateway_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gateway_example"] = module
    spec.loader.exec_module(module)
    return module


async def accounts(request: Request) -> JSONResponse:
    await asyncio.sleep(0.05)  # the calls overlap
    return JSONResponse({"accounts": ["FR76..."]})


async def fail(request: Request) -> JSONResponse:
    return JSONResponse({"error": "upstream down"}, status_code=500)


def test_gateway_reserves_so_concurrent_calls_never_overspend(settings: Settings) -> None:
    gateway = load_gateway()
    built = settings.model_copy(update={"meters": [METER]})
    prefix = built.valkey.key_prefix
    with AppServer(built, {"api", "sink"}) as server, server.client() as api:
        assert api.post("/api/v1/features", json={"key": "calls", "name": "calls",
                                                  "meterSlug": "api_calls"}).status_code == 201
        assert api.post("/api/v1/customers", json={"name": "TPP", "key": "tpp-7",
                                                   "usageAttribution": {"subjectKeys": ["tpp-7"]}}).status_code == 201
        assert api.post("/api/v2/customers/tpp-7/entitlements", json={
            "type": "metered", "featureKey": "calls", "issueAfterReset": 3,
            "usagePeriod": {"interval": "DAY"}}).status_code == 201
        sync_valkey = valkey.Valkey.from_url(built.valkey.url)
        key = layout.subject_key(prefix, "default", "tpp-7", "calls")

        def balance() -> Any:
            found = layout.Quota.parse(sync_valkey.hgetall(key))
            return None if found is None else found.balance

        def holds() -> dict[bytes, bytes]:
            return {k: v for k, v in sync_valkey.hgetall(key).items() if k.startswith(b"r:")}

        async def scenario() -> list[Any]:
            vk = valkey.asyncio.from_url(built.valkey.url)
            async with httpx.AsyncClient(base_url=server.base_url) as pgmeter:
                app = gateway.QuotaMiddleware(Starlette(routes=[Route("/accounts", accounts), Route("/fail", fail)]),
                                              valkey=vk, pgmeter=pgmeter, feature="calls", prefix=prefix)
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
                    out: list[Any] = []
                    deadline = time.monotonic() + 30
                    while balance() != 3 and time.monotonic() < deadline:  # the worker has written the hash
                        await asyncio.sleep(0.05)
                    out.append((await client.get("/accounts")).status_code)  # not identified
                    out.append((await client.get("/accounts", headers={"X-TPP-Id": "nobody"})).status_code)
                    # A call the upstream fails is not charged, and holds nothing after.
                    out.append((await client.get("/fail", headers={"X-TPP-Id": "tpp-7"})).status_code)
                    out.append((balance(), holds()))
                    # Eight concurrent calls against an allowance of 3: each reserves before it is
                    # served, so exactly three are, whatever the order.
                    calls = await asyncio.gather(*(client.get("/accounts", headers={"X-TPP-Id": "tpp-7"})
                                                   for _ in range(8)))
                    out.append(sorted(r.status_code for r in calls))
                    refused = next(r for r in calls if r.status_code == 429)
                    out.append((refused.headers["content-type"], refused.json()))
                    # The events land: the writes that count them drop their holds (never both, never neither).
                    deadline = time.monotonic() + 30
                    while (balance(), holds()) != (0, {}) and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    out.append((balance(), holds()))
                    out.append((await client.get("/accounts", headers={"X-TPP-Id": "tpp-7"})).status_code)
            await vk.aclose()
            return out

        try:
            results = asyncio.run(scenario())
        finally:
            sync_valkey.close()
        assert results[0] == 401 and results[1] == 429
        assert results[2] == 500 and results[3] == (3, {})
        assert results[4] == [200] * 3 + [429] * 5
        assert results[5][0] == "application/problem+json"
        assert results[5][1]["status"] == 429 and results[5][1]["balance"] == "0"
        assert results[6] == (0, {}) and results[7] == 429
        # Exactly the three served calls were metered (the refused ones were not).
        value = api.get("/api/v1/subjects/tpp-7/entitlements/calls/value",
                        params={"time": layout.from_millis(int(time.time() * 1000) + 60_000).isoformat()})
        assert value.json()["usage"] == 3
