"""The chart's ConfigMap and env vars load through pgmeter's real config loader.

This is the seam between the chart and the Python code: every role's
pgmeter.yaml plus PGMETER_* environment (secret values stubbed) must produce
the settings the chart means to set.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import yaml

from pgmeter.config import load_settings
from pgmeter.meters.service import config_meters

CNPG_API = "postgresql.cnpg.io/v1"


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]["containers"][0]


def _env(doc: dict[str, Any]) -> dict[str, str]:
    """Resolve the container env as the kubelet would, with a stub per secret key."""
    resolved: dict[str, str] = {}
    for item in _container(doc)["env"]:
        if "value" in item:
            # $(VAR) expands variables defined earlier in the list.
            resolved[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: resolved.get(m.group(1), m.group(0)),
                                            item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            resolved[item["name"]] = {
                "uri": "postgresql://pgmeter:s3cret@pgmeter-pg-rw.metering:5432/pgmeter",
                "username": "pgmeter", "password": "s3cret", "dbname": "pgmeter",
                "tokens.json": '{"tok-0123456789abcdef": "fingate"}',
            }.get(ref["key"], f"stub-{ref['name']}-{ref['key']}")
    return resolved


@pytest.fixture
def load(tmp_path, monkeypatch):
    def _load(rendered, doc: dict[str, Any]):
        c = _container(doc)
        volume = next(v for v in doc["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
        config = rendered.get("ConfigMap", volume["configMap"]["name"])["data"]["pgmeter.yaml"]
        path = tmp_path / f"{doc['metadata']['name']}.yaml"
        path.write_text(config)
        assert c["args"][:2] == ["--config", "/etc/pgmeter/pgmeter.yaml"]
        for name in [k for k in os.environ if k.startswith("PGMETER_")]:
            monkeypatch.delenv(name)
        for name, value in _env(doc).items():
            monkeypatch.setenv(name, value)
        return load_settings(path)
    return _load


def test_every_role_loads_its_settings(render, load) -> None:
    values = {
        "postgres": {"pooler": {"enabled": True}},
        "lago": {"enabled": True},
        "valkey": {"passwordSecret": {"name": "pgmeter-valkey", "key": "valkey-password"}},
        "auth": {"tokensSecret": {"name": "pgmeter-auth", "key": "tokens.json"}},
        "logLevel": "debug",
    }
    rendered = render(values, api_versions=(CNPG_API,))
    docs = {_container(d)["args"][-1]: d for d in rendered.of_kind("Deployment") + rendered.of_kind("Job")}
    assert set(docs) == {"api", "sink", "refresher", "lago-sync", "migrate"}
    for role, doc in docs.items():
        settings = load(rendered, doc)
        assert settings.address == "0.0.0.0:8888", role
        assert settings.log_level == "debug", role
        assert settings.namespace == "default", role
        assert settings.postgres.url == "postgresql://pgmeter:s3cret@pgmeter-pg-rw.metering:5432/pgmeter", role
        assert settings.nats.url == "nats://nats-jetstream.nats-system.svc.cluster.local:4222", role
        assert settings.nats.replicas == 3, role
        if role == "migrate":
            assert settings.valkey.url is None and settings.valkey.password is None
        else:
            assert settings.valkey.url == "redis://valkey-primary.valkey.svc:6379/0", role
            assert settings.valkey.password == "stub-pgmeter-valkey-valkey-password", role
        assert [m.slug for m in config_meters(settings)] == ["api_calls", "api_latency"], role
        # Only lago-sync runs the sync (and holds the key); the file says enabled.
        assert settings.lago.enabled is (role == "lago-sync"), role
        # The chart's defaults deliver running usage ahead of Lago's hourly invoicing clock.
        assert settings.lago.interval.total_seconds() == 60
        assert settings.lago.grace.total_seconds() == 0
        assert settings.lago.batch_size == 100
        assert [(m.meter, m.code) for m in settings.lago.mappings] == [("api_calls", "api_calls")]
        if role == "api":
            assert settings.postgres.query_url == "postgresql://pgmeter:s3cret@pgmeter-pg-pooler.metering.svc:5432/pgmeter"
            assert settings.auth_tokens == {"tok-0123456789abcdef": "fingate"}
        else:
            assert settings.postgres.query_url is None, role
            assert settings.auth_tokens == {}, role
        if role == "lago-sync":
            assert settings.lago.api_key == "stub-pgmeter-lago-api-key"
        else:
            assert settings.lago.api_key is None, role


def test_default_config_file_loads(default_render, tmp_path) -> None:
    path = tmp_path / "pgmeter.yaml"
    path.write_text(default_render.get("ConfigMap", "pgmeter-config")["data"]["pgmeter.yaml"])
    settings = load_settings(path)
    assert settings.lago.enabled is False
    assert yaml.safe_load(path.read_text())["meters"][0]["slug"] == config_meters(settings)[0].slug


@pytest.mark.parametrize(("credentials", "expected"), [
    ({"type": "userPassword", "secretName": "pgmeter-nats", "userKey": "u", "passwordKey": "p"},
     {"user": "stub-pgmeter-nats-u", "password": "stub-pgmeter-nats-p"}),
    ({"type": "token", "secretName": "pgmeter-nats", "tokenKey": "t"}, {"token": "stub-pgmeter-nats-t"}),
    ({"type": "credsFile", "secretName": "pgmeter-nats"}, {"user_credentials": "/etc/pgmeter-nats/nats.creds"}),
    ({"type": ""}, {}),
])
def test_nats_credentials_reach_every_role_that_connects(render, load, credentials, expected) -> None:
    rendered = render({"lago": {"enabled": True}, "nats": {"credentials": credentials}})
    docs = {_container(d)["args"][-1]: d for d in rendered.of_kind("Deployment") + rendered.of_kind("Job")}
    for role, doc in docs.items():
        settings = load(rendered, doc)
        # Migrations never connect to NATS, so they get no credentials.
        assert settings.nats.credentials() == ({} if role == "migrate" else expected), role


def test_read_replicas_route_only_the_api_reads_to_the_ro_service(render, load) -> None:
    rendered = render({"postgres": {"readReplicas": True}}, api_versions=(CNPG_API,))
    docs = {_container(d)["args"][-1]: d for d in rendered.of_kind("Deployment") + rendered.of_kind("Job")}
    for role, doc in docs.items():
        settings = load(rendered, doc)
        assert settings.postgres.url == "postgresql://pgmeter:s3cret@pgmeter-pg-rw.metering:5432/pgmeter", role
        assert settings.postgres.query_url is None, role  # no pooler: writes go to -rw
        if role == "api":
            assert settings.postgres.read_url == "postgresql://pgmeter:s3cret@pgmeter-pg-ro.metering.svc:5432/pgmeter"
        else:
            assert settings.postgres.read_url is None, role


def test_the_cluster_commits_synchronously_to_one_standby(render) -> None:
    """An asynchronous standby promoted after a crash may miss commits the sink has
    acknowledged to JetStream; with one synchronous standby it cannot."""
    spec = render({}, api_versions=(CNPG_API,)).get("Cluster", "pgmeter-pg")["spec"]
    assert (spec["instances"], spec["minSyncReplicas"], spec["maxSyncReplicas"]) == (3, 0, 1)
    single = render({"postgres": {"cluster": {"instances": 1}}}, api_versions=(CNPG_API,)).get("Cluster", "pgmeter-pg")
    assert "maxSyncReplicas" not in single["spec"]
    off = render({"postgres": {"cluster": {"syncReplicas": 0}}}, api_versions=(CNPG_API,)).get("Cluster", "pgmeter-pg")
    assert "maxSyncReplicas" not in off["spec"]
