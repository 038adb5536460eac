"""OpenMeter's official Python SDK, unchanged, against pgmeter's entitlements.

customer -> feature -> entitlement (v2, customer routes) -> grant -> ingest through
the API -> value, every call through the SDK's own request builders and models.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from openmeter import Client, models

from pgmeter.config import Settings
from tests.support.app import AppServer


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with AppServer(settings, {"api", "sink"}) as server:
        yield Client(endpoint=server.base_url)


def test_customer_feature_entitlement_grant_ingest_value(client: Client) -> None:
    client.meters.create(models.MeterCreate(slug="api_calls", aggregation="COUNT", event_type="api.call"))
    customer = client.customers.create(models.CustomerCreate(
        name="TPP 12345", key="tpp-12345",
        usage_attribution=models.CustomerUsageAttribution(subject_keys=["tpp-12345"])))
    assert customer.id and customer.usage_attribution.subject_keys == ["tpp-12345"]
    feature = client.features.create(models.FeatureCreateInputs(key="api_calls", name="API calls",
                                                                meter_slug="api_calls"))
    assert feature.meter_slug == "api_calls"

    start = datetime.now(UTC).replace(second=0, microsecond=0)
    entitlement = client.customer_entitlements_v2.post(customer.id, models.EntitlementMeteredV2CreateInputs(
        type="metered", feature_key="api_calls",
        usage_period=models.RecurringPeriodCreateInput(interval="MONTH")))
    # The SDK cannot resolve its own union annotation here and hands back the JSON object.
    assert entitlement["type"] == "metered" and entitlement["customerId"] == customer.id
    grant = client.customer_entitlement_v2.create_customer_entitlement_grant(
        "tpp-12345", "api_calls", models.EntitlementGrantCreateInputV2(amount=3, effective_at=start))
    assert grant.amount == 3

    now = datetime.now(UTC)
    client.events.ingest_events([
        models.Event(id=f"evt-{i}", source="gateway", specversion="1.0", type="api.call", subject="tpp-12345",
                     time=now) for i in range(2)])

    deadline = time.monotonic() + 30
    while True:  # until the sink has committed both events (an exact answer, not a timing assertion)
        value = client.customer_entitlement_v2.get_customer_entitlement_value(
            customer.id, "api_calls", time=now + timedelta(minutes=1))
        if value.usage == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (value.has_access, value.balance, value.usage, value.overage) == (True, 1, 2, 0)
    assert value.total_available_grant_amount == 3
    assert value.grant_balances == {grant.id: 1}

    client.events.ingest_event(models.Event(id="evt-2", source="gateway", specversion="1.0", type="api.call",
                                            subject="tpp-12345", time=now))
    deadline = time.monotonic() + 30
    while True:
        v1 = client.customer_entitlement.get_customer_entitlement_value("tpp-12345", "api_calls",
                                                                       time=now + timedelta(minutes=1))
        if v1.usage == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (v1.has_access, v1.balance, v1.usage) == (False, 0, 3)
