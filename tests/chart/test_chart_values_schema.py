"""values.schema.json: defaults pass, bad values (and plaintext secrets) are rejected.

Secrets inside the free-form `config` map are refused by the render instead
(templates/_validate.tpl, tested in test_chart_secrets.py), with a message that
names the Secret-based value to use.
"""

from __future__ import annotations

import helm_python
import pytest


def test_defaults_and_real_overlays_pass(chart) -> None:
    chart.validate_schema({})
    chart.validate_schema({
        "api": {"replicas": 4},
        "postgres": {"cluster": {"instances": 1, "storage": {"size": "5Gi"}}, "pooler": {"enabled": True}},
        "nats": {"url": "nats://nats.nats:4222", "streamReplicas": 1},
        "valkey": {"url": "", "passwordSecret": {"name": "pgmeter-valkey", "key": "password"}},
        "lago": {"enabled": True, "interval": "PT30M", "grace": 600, "window": "DAY", "subjects": {"tpp-1": "sub-1"}},
        "config": {"sink": {"retentionDays": 400}},
        "hpa": {"enabled": True, "targetMemoryUtilizationPercentage": 75},
    })


@pytest.mark.parametrize(("values", "why"), [
    ({"catalystBlueprint": {"backend": {"kind": "clickhouse"}}}, "backend/kind"),
    ({"catalystBlueprint": {"eventBus": {"kind": "kafka"}}}, "eventBus/kind"),
    ({"api": {"replicas": "two"}}, "api/replicas"),
    ({"lago": {"apiKey": "lago_live_123"}}, "apiKey"),
    ({"valkey": {"url": "redis://:hunter2@valkey:6379/0"}}, "valkey/url"),
    ({"valkey": {"password": "hunter2"}}, "password"),
    ({"lago": {"api_key": "lago_live_123"}}, "api_key"),
    ({"auth": {"tokens": {"a-token-of-sixteen-chars": "default"}}}, "tokens"),
    ({"nats": {"password": "hunter2"}}, "password"),
    ({"nats": {"credentials": {"type": "basic"}}}, "type"),
    ({"networkPolicy": {"ingress": {"api": [{}]}}}, "api"),
    ({"nats": {"url": "http://nats:4222"}}, "nats/url"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"meters": [{"slug": "Bad-Slug", "eventType": "x", "aggregation": "COUNT"}]}, "slug"),
    ({"meters": [{"slug": "x", "eventType": "x", "aggregation": "MEDIAN"}]}, "aggregation"),
    ({"serviceMonitr": {"enabled": True}}, "serviceMonitr"),
    ({"lago": {"interval": "hourly"}}, "interval"),
    ({"lago": {"enabled": True, "mappings": []}}, "mappings"),
    ({"lago": {"grace": "15 minutes"}}, "grace"),
])
def test_bad_values_are_rejected(chart, render, values, why) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=why):
        chart.validate_schema(values)
    # ...and the render (helm template / install) refuses them too.
    with pytest.raises(helm_python.HelmValuesError):
        render(values)
