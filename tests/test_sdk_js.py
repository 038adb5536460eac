"""OpenMeter's JavaScript SDK (``@openmeter/sdk``) against a live pgmeter, through node.

tests/js/sdk_calls.mjs makes every SDK call that reaches an endpoint pgmeter serves,
with every filter and list option, and prints what each returned; each call is
checked by its own test here. The SDK is installed with ``npm install`` into
``.cache/js-sdk`` (gitignored, reused while the version matches). Without node
and npm these tests skip, saying so. Not here: ``info``, ``debug`` and
``events.listV2`` (pgmeter does not serve them). The usage-limit flow is one path
(customer -> feature -> entitlement -> grant -> ingest -> value, and a meter query by
that customer); an unknown customer is checked to fail as OpenMeter fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support import meter_env

SDK = "@openmeter/sdk"
SDK_VERSION = "1.0.0-beta.232"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "js-sdk"
SCRIPT = Path(__file__).resolve().parent / "js" / "sdk_calls.mjs"
NOW = datetime.now(UTC).replace(microsecond=0)
DAY0 = datetime(NOW.year, NOW.month, NOW.day, tzinfo=UTC) - timedelta(days=2)
DAY1 = DAY0 + timedelta(days=1)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def install_sdk() -> Path:
    installed = CACHE / "node_modules" / "@openmeter" / "sdk" / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != SDK_VERSION:
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / "package.json").write_text('{"private": true, "type": "module"}\n')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--no-save", f"{SDK}@{SDK_VERSION}"],
                       cwd=CACHE, check=True, capture_output=True, timeout=300)
    # ESM resolves packages from the script's own directory: run a copy beside node_modules.
    shutil.copy(SCRIPT, CACHE / SCRIPT.name)
    return CACHE / SCRIPT.name


@pytest.fixture(scope="module")
def calls(pg_server, nats_server, valkey_server) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the JavaScript SDK cannot run")
    script = install_sdk()
    with meter_env.database(pg_server) as url:
        settings = meter_env.settings_for(url, nats_server, valkey_server)
        with meter_env.api_server(settings, frozenset({"api", "sink"})) as app:
            done = subprocess.run(["node", str(script), app.base_url, iso(NOW)], capture_output=True, text=True,
                                  timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def value(calls: dict[str, Any], name: str) -> Any:
    result = calls[name]
    assert result["ok"], result
    return result["value"]


def test_events_ingest_one(calls: dict[str, Any]) -> None:
    assert calls["events.ingest (one)"] == {"ok": True}  # 204: the SDK returns undefined


def test_events_ingest_batch(calls: dict[str, Any]) -> None:
    assert calls["events.ingest (batch)"] == {"ok": True}


def test_events_list(calls: dict[str, Any]) -> None:
    assert value(calls, "events.list") == [
        {"id": "e2", "data": {"tokens": 5, "model": "GPT-4o-mini", "region": "us"}, "stored": True},
        {"id": "e1", "data": {"tokens": 10, "model": "gpt-4o", "region": "eu"}, "stored": True}]
    assert calls["events.list customerId"]["status"] == 400  # an unknown customer, as OpenMeter


def test_meters_create(calls: dict[str, Any]) -> None:
    created = value(calls, "meters.create")
    assert (created["slug"], created["name"], created["aggregation"]) == ("tokens", "Tokens", "SUM")


def test_meters_get(calls: dict[str, Any]) -> None:
    assert value(calls, "meters.get") == {"slug": "tokens", "name": "Tokens", "aggregation": "SUM",
                                          "groupBy": {"model": "$.model", "region": "$.region"}}


def test_meters_list(calls: dict[str, Any]) -> None:
    assert value(calls, "meters.list") == ["tokens"]  # listed before the other meters were made


def test_meters_update(calls: dict[str, Any]) -> None:
    assert value(calls, "meters.update") == {"name": "Edited", "description": "d", "groupBy": {"region": "$.region"},
                                             "metadata": {"team": "a"}}


def test_meters_delete(calls: dict[str, Any]) -> None:
    assert value(calls, "meters.delete") is False  # gone from the list


def test_meters_query(calls: dict[str, Any]) -> None:
    assert value(calls, "meters.query") == [
        [iso(DAY0), "alice", {"model": "GPT-4o-mini"}, 5], [iso(DAY0), "alice", {"model": "gpt-4o"}, 10],
        [iso(DAY1), "bob", {"model": "claude"}, 7]]
    assert calls["meters.query filterCustomerId"]["status"] == 404  # unknown customer, as OpenMeter


def test_meters_query_filter_group_by(calls: dict[str, Any]) -> None:
    rows = value(calls, "meters.query filterGroupBy")
    assert [(r[2], r[3]) for r in rows] == [({"region": "eu"}, 10), ({"region": "ap"}, 1)]


def test_meters_query_advanced_filters(calls: dict[str, Any]) -> None:
    rows = value(calls, "meters.query advancedMeterGroupByFilters")
    assert [(r[2], r[3]) for r in rows] == [({"model": "gpt-4o"}, 10), ({"model": "GPT-4o-mini"}, 5)]


def test_meters_query_post(calls: dict[str, Any]) -> None:
    assert value(calls, "meters.queryPost") == [
        [iso(DAY0), "alice", {"model": "gpt-4o"}, 10], [iso(DAY1), "bob", {"model": "claude"}, 7]]
    rows = value(calls, "meters.queryPost advancedMeterGroupByFilters")
    assert [(r[2], r[3]) for r in rows] == [({"region": "eu"}, 17), ({"region": "ap"}, 1)]


def test_meters_list_group_by_values(calls: dict[str, Any]) -> None:
    assert value(calls, "meters.listGroupByValues") == ["GPT-4o-mini", "claude", "gpt-4o"]


def test_customer_feature_entitlement_grant_ingest_value(calls: dict[str, Any]) -> None:
    assert value(calls, "customers.create") == {"key": "tpp-js", "subjectKeys": ["tpp-js-app"], "id": "string"}
    assert value(calls, "features.create") == {"key": "js_calls", "meterSlug": "js_calls"}
    assert value(calls, "customers.entitlements.create") == {"type": "metered", "customerId": True,
                                                             "featureKey": "js_calls"}
    assert value(calls, "customers.entitlements.createGrant") == {"amount": 3}
    assert calls["events.ingest (customer)"] == {"ok": True}
    # One event under the customer's key and one under its subject key: both are its usage.
    got = value(calls, "customers.entitlements.value")
    assert (got["hasAccess"], got["balance"], got["usage"], got["overage"]) == (True, 1, 2, 0)
    assert (got["totalAvailableGrantAmount"], got["grantBalances"]) == (3, 1)
    assert value(calls, "customers.entitlementsV1.value") == {"hasAccess": True, "balance": 1, "usage": 2}
    assert value(calls, "meters.query filterCustomerId (known)") == [[True, "tpp-js", 1], [True, "tpp-js-app", 1]]


def test_every_call_is_checked(calls: dict[str, Any]) -> None:
    checked = {"events.ingest (one)", "events.ingest (batch)", "events.list", "events.list customerId",
               "meters.create", "meters.get", "meters.list", "meters.update", "meters.delete", "meters.query",
               "meters.query filterGroupBy", "meters.query advancedMeterGroupByFilters",
               "meters.query filterCustomerId", "meters.queryPost", "meters.queryPost advancedMeterGroupByFilters",
               "meters.listGroupByValues", "customers.create", "features.create", "customers.entitlements.create",
               "customers.entitlements.createGrant", "events.ingest (customer)", "customers.entitlements.value",
               "customers.entitlementsV1.value", "meters.query filterCustomerId (known)"}
    assert set(calls) == checked
