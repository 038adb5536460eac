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
    return JSONResponse({"accounts": ["FR76..."]})


def test_gateway_serves_until_the_quota_is_used_then_answers_429(settings: Settings) -> None:
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

        async def scenario() -> list[tuple[int, Any]]:
            vk = valkey.asyncio.from_url(built.valkey.url)
            async with httpx.AsyncClient(base_url=server.base_url) as pgmeter:
                app = gateway.QuotaMiddleware(Starlette(routes=[Route("/accounts", accounts)]), valkey=vk,
                                              pgmeter=pgmeter, feature="calls", prefix=prefix)
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
                    out = []
                    out.append(((await client.get("/accounts")).status_code, None))  # not identified
                    out.append(((await client.get("/accounts", headers={"X-TPP-Id": "nobody"})).status_code, None))
                    for expected_balance in (3, 2, 1):
                        # Each call is checked against the balance the previous ones left in Valkey.
                        deadline = time.monotonic() + 30
                        while balance() != expected_balance and time.monotonic() < deadline:
                            await asyncio.sleep(0.05)
                        response = await client.get("/accounts", headers={"X-TPP-Id": "tpp-7"})
                        out.append((response.status_code, balance()))
                    deadline = time.monotonic() + 30
                    while balance() != 0 and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    refused = await client.get("/accounts", headers={"X-TPP-Id": "tpp-7"})
                    out.append((refused.status_code, refused.headers["content-type"]))
                    out.append((0, refused.json()))
            await vk.aclose()
            return out

        try:
            results = asyncio.run(scenario())
        finally:
            sync_valkey.close()
        assert results[0][0] == 401 and results[1][0] == 429
        assert results[2:5] == [(200, 3), (200, 2), (200, 1)]
        assert results[5] == (429, "application/problem+json")
        assert results[6][1]["status"] == 429 and results[6][1]["balance"] == "0"
        # Exactly the three served calls were metered (the refused ones were not).
        value = api.get("/api/v1/subjects/tpp-7/entitlements/calls/value",
                        params={"time": layout.from_millis(int(time.time() * 1000) + 60_000).isoformat()})
        assert value.json()["usage"] == 3
