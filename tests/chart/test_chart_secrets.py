"""No secret ever sits in plain values: the render refuses it, whatever its spelling.

`config` is merged into the pgmeter.yaml ConfigMap, and the schema cannot know
every spelling pgmeter's loader accepts (authTokens and auth_tokens both load),
so templates/_validate.tpl walks the values: a secret-bearing key in any case
or separator style, a database URL, or any URL with credentials fails the
render with a message naming the Secret-based value to use instead. Nothing is
rendered, so no ConfigMap (or Deployment) can carry the secret.
"""

from __future__ import annotations

from typing import Any

import helm_python
import pytest
import yaml

SECRET = "Sup3rSecretValue-0123456789"
TOKEN_MAP = {SECRET: "default"}

# (values, text the message must contain: the offending path and the value to use instead)
REFUSED: list[tuple[dict[str, Any], str, str]] = [
    # API tokens, every spelling pgmeter's loader accepts and then some
    ({"config": {"authTokens": TOKEN_MAP}}, "config.authTokens", "auth.tokensSecret"),
    ({"config": {"auth_tokens": TOKEN_MAP}}, "config.auth_tokens", "auth.tokensSecret"),
    ({"config": {"AuthTokens": TOKEN_MAP}}, "config.AuthTokens", "auth.tokensSecret"),
    ({"config": {"AUTH-TOKENS": TOKEN_MAP}}, "config.AUTH-TOKENS", "auth.tokensSecret"),
    # Lago API key
    ({"config": {"lago": {"apiKey": SECRET}}}, "config.lago.apiKey", "lago.apiKeySecret"),
    ({"config": {"lago": {"api_key": SECRET}}}, "config.lago.api_key", "lago.apiKeySecret"),
    ({"config": {"lago": {"API_KEY": SECRET}}}, "config.lago.API_KEY", "lago.apiKeySecret"),
    ({"config": {"lago": {"Api-Key": SECRET}}}, "config.lago.Api-Key", "lago.apiKeySecret"),
    # Passwords and tokens of every dependency
    ({"config": {"valkey": {"password": SECRET}}}, "config.valkey.password", "valkey.passwordSecret"),
    ({"config": {"valkey": {"PASSWORD": SECRET}}}, "config.valkey.PASSWORD", "valkey.passwordSecret"),
    ({"config": {"nats": {"user": "pgmeter", "password": SECRET}}}, "config.nats.password", "nats.credentials"),
    ({"config": {"nats": {"token": SECRET}}}, "config.nats.token", "nats.credentials"),
    ({"config": {"nats": {"Token": SECRET}}}, "config.nats.Token", "nats.credentials"),
    ({"config": {"postgres": {"password": SECRET}}}, "config.postgres.password", "postgres.dsnSecret"),
    # Database URLs carry the password, with or without it spelled out
    ({"config": {"postgres": {"url": f"postgresql://pgmeter:{SECRET}@db/pgmeter"}}}, "config.postgres.url",
     "postgres.dsnSecret"),
    ({"config": {"postgres": {"queryUrl": f"postgresql://pgmeter:{SECRET}@pooler/pgmeter"}}},
     "config.postgres.queryUrl", "postgres.pooler.enabled"),
    ({"config": {"postgres": {"query_url": f"postgresql://pgmeter:{SECRET}@pooler/pgmeter"}}},
     "config.postgres.query_url", "postgres.pooler.enabled"),
    ({"config": {"postgres": {"QUERY_URL": "postgresql://pooler/pgmeter"}}}, "config.postgres.QUERY_URL",
     "postgres.pooler.enabled"),
    # Settings pgmeter may grow later, and anything nested
    ({"config": {"metrics": {"bearerToken": SECRET}}}, "config.metrics.bearerToken", "secretKeyRef"),
    ({"config": {"x": [{"clientSecret": SECRET}]}}, "config.x[0].clientSecret", "secretKeyRef"),
    ({"meters": [{"slug": "calls", "eventType": "api.call", "aggregation": "COUNT",
                  "metadata": {"apiKey": SECRET}}]}, "meters[0].metadata.apiKey", "lago.apiKeySecret"),
    # URLs with credentials, anywhere in the values
    ({"nats": {"url": f"nats://pgmeter:{SECRET}@nats.nats-system:4222"}}, "nats.url", "nats.credentials"),
    ({"nats": {"url": f"tls://{SECRET}@nats.nats-system:4222"}}, "nats.url", "nats.credentials"),
    ({"lago": {"url": f"https://lago:{SECRET}@lago.example.org"}}, "lago.url", "lago.apiKeySecret"),
    ({"config": {"nats": {"url": f"nats://{SECRET}@nats:4222"}}}, "config.nats.url", "nats.credentials"),
    ({"config": {"valkey": {"url": f"redis://:{SECRET}@valkey:6379/0"}}}, "config.valkey.url",
     "valkey.passwordSecret"),
    ({"meters": [{"slug": "calls", "eventType": "api.call", "aggregation": "COUNT",
                  "description": f"see https://ops:{SECRET}@wiki.example.org"}]},
     "meters[0].description", "secretKeyRef"),
    # Plain env values (Deployments, not ConfigMaps, but still plain values)
    ({"extraEnv": [{"name": "PGMETER_AUTH_TOKENS", "value": SECRET}]}, "extraEnv[0] (PGMETER_AUTH_TOKENS)",
     "auth.tokensSecret"),
    ({"api": {"extraEnv": [{"name": "PGMETER_NATS_PASSWORD", "value": SECRET}]}},
     "api.extraEnv[0] (PGMETER_NATS_PASSWORD)", "nats.credentials"),
    ({"sink": {"extraEnv": [{"name": "pgmeter_lago_api_key", "value": SECRET}]}},
     "sink.extraEnv[0] (pgmeter_lago_api_key)", "lago.apiKeySecret"),
    ({"refresher": {"extraEnv": [{"name": "PGMETER_POSTGRES_URL",
                                  "value": f"postgresql://pgmeter:{SECRET}@db/pgmeter"}]}},
     "refresher.extraEnv[0].value", "secretKeyRef"),
]


def _ids() -> list[str]:
    return [path for _, path, _ in REFUSED]


@pytest.mark.parametrize(("values", "path", "instead"), REFUSED, ids=_ids())
def test_secret_in_plain_values_is_refused(render, values, path, instead) -> None:
    with pytest.raises(helm_python.HelmRenderError) as caught:
        render(values)
    message = str(caught.value)
    assert f"{path}:" in message, message
    assert instead in message, message
    # The refusal itself never echoes the secret (CI logs keep error messages).
    assert SECRET not in message
    # Nothing was rendered: no ConfigMap, Deployment or anything else holds the secret.


def test_schema_refuses_secret_keys_outside_config(chart) -> None:
    """Outside `config` the schema is closed: unknown keys (a plain apiKey, password or
    tokens next to the Secret references) are refused in any spelling."""
    for values in ({"lago": {"apiKey": SECRET}}, {"lago": {"api_key": SECRET}},
                   {"valkey": {"Password": SECRET}}, {"auth": {"auth_tokens": TOKEN_MAP}},
                   {"nats": {"token": SECRET}}, {"postgres": {"query_url": "postgresql://x"}}):
        with pytest.raises(helm_python.HelmValuesError, match="additional properties"):
            chart.validate_schema(values)


def test_look_alikes_that_hold_no_secret_render(render) -> None:
    """Event data that merely looks like a secret name is not a setting: a meter may group
    by a `token_type` property, and a Lago subject may be called `api-key-holder`."""
    meters = [{"slug": "calls", "eventType": "api.call", "aggregation": "COUNT",
               "groupBy": {"token_type": "$.token_type", "password_reset": "$.reset"}}]
    rendered = render({
        "meters": meters,
        "lago": {"subjects": {"api-key-holder": "sub-1"}},
        "config": {"valkey": {"keyPrefix": "pgm:"}, "nats": {"url": "nats://nats.nats-system:4222"},
                   "postgres": {"poolSize": 20}},
        "extraEnv": [{"name": "PGMETER_NATS_TOKEN", "valueFrom": {"secretKeyRef": {"name": "n", "key": "t"}}}],
    })
    config = yaml.safe_load(rendered.get("ConfigMap", "pgmeter-config")["data"]["pgmeter.yaml"])
    assert config["meters"] == meters
    assert config["lago"]["subjects"] == {"api-key-holder": "sub-1"}
    assert config["postgres"] == {"poolSize": 20}


def test_configmaps_never_carry_a_secret(all_on_render) -> None:
    """With every Secret-based value in use, the ConfigMaps hold only references-free
    settings: no Secret name, key or URL with credentials."""
    for cm in all_on_render.of_kind("ConfigMap"):
        if cm["metadata"]["name"] == "pgmeter-dashboard":
            continue
        text = "\n".join(cm["data"].values())
        config = yaml.safe_load(text)
        flat = yaml.safe_dump(config).lower()
        for word in ("password", "token", "apikey", "api_key", "secret", "queryurl", "query_url", "@"):
            assert word not in flat, (cm["metadata"]["name"], word)


class TestAuthIsOnByDefault:
    def test_default_api_needs_the_tokens_secret(self, default_render) -> None:
        api = default_render.get("Deployment", "pgmeter-api")
        env = {e["name"]: e for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
        ref = env["PGMETER_AUTH_TOKENS"]["valueFrom"]["secretKeyRef"]
        # Not optional: the api does not start without its tokens.
        assert ref == {"name": "pgmeter-auth", "key": "tokens.json"}
        assert "kubectl -n metering create secret generic pgmeter-auth" in default_render.notes
        assert "tokens.json=" in default_render.notes

    def test_named_secret(self, render) -> None:
        rendered = render({"auth": {"tokensSecret": {"name": "bank-tokens", "key": "t.json"}}})
        api = rendered.get("Deployment", "pgmeter-api")
        env = {e["name"]: e for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["PGMETER_AUTH_TOKENS"]["valueFrom"]["secretKeyRef"] == {"name": "bank-tokens", "key": "t.json"}
        assert "create secret generic" not in rendered.notes

    def test_explicitly_off(self, render) -> None:
        rendered = render({"auth": {"enabled": False}})
        for doc in rendered.of_kind("Deployment") + rendered.of_kind("Job"):
            names = {e["name"] for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert "PGMETER_AUTH_TOKENS" not in names
        assert "WARNING: auth.enabled=false" in rendered.notes

    def test_off_with_a_secret_is_a_contradiction(self, render) -> None:
        with pytest.raises(helm_python.HelmRenderError, match="auth.enabled=false contradicts auth.tokensSecret.name"):
            render({"auth": {"enabled": False, "tokensSecret": {"name": "bank-tokens", "key": "t.json"}}})


def _workloads(rendered) -> dict[str, dict[str, Any]]:
    return {d["spec"]["template"]["spec"]["containers"][0]["args"][-1]: d
            for d in rendered.of_kind("Deployment") + rendered.of_kind("Job")}


def _env(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]}


class TestNatsCredentials:
    ROLES = {"api", "sink", "refresher", "lago-sync"}

    def test_user_and_password(self, render) -> None:
        rendered = render({"lago": {"enabled": True}, "nats": {"credentials": {
            "type": "userPassword", "secretName": "pgmeter-nats", "userKey": "username", "passwordKey": "pw"}}})
        found = _workloads(rendered)
        for role in self.ROLES:
            env = _env(found[role])
            assert env["PGMETER_NATS_USER"]["valueFrom"]["secretKeyRef"] == {"name": "pgmeter-nats", "key": "username"}
            assert env["PGMETER_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "pgmeter-nats", "key": "pw"}
            assert not {"PGMETER_NATS_TOKEN", "PGMETER_NATS_CREDS_FILE"} & set(env)
        assert not {"PGMETER_NATS_USER", "PGMETER_NATS_PASSWORD"} & set(_env(found["migrate"]))

    def test_token(self, render) -> None:
        rendered = render({"nats": {"credentials": {"type": "token", "secretName": "pgmeter-nats"}}})
        found = _workloads(rendered)
        for role in ("api", "sink", "refresher"):
            env = _env(found[role])
            assert env["PGMETER_NATS_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "pgmeter-nats", "key": "token"}
            assert not {"PGMETER_NATS_USER", "PGMETER_NATS_PASSWORD", "PGMETER_NATS_CREDS_FILE"} & set(env)
        assert "PGMETER_NATS_TOKEN" not in _env(found["migrate"])

    def test_creds_file_is_mounted_from_the_secret(self, all_on_render) -> None:
        found = _workloads(all_on_render)
        for role in self.ROLES:
            spec = found[role]["spec"]["template"]["spec"]
            container = spec["containers"][0]
            assert _env(found[role])["PGMETER_NATS_CREDS_FILE"]["value"] == "/etc/pgmeter-nats/nats.creds"
            mount = next(m for m in container["volumeMounts"] if m["name"] == "nats-creds")
            assert mount == {"name": "nats-creds", "mountPath": "/etc/pgmeter-nats", "readOnly": True}
            volume = next(v for v in spec["volumes"] if v["name"] == "nats-creds")
            assert volume["secret"]["secretName"] == "pgmeter-nats"
            assert volume["secret"]["items"] == [{"key": "pgmeter.creds", "path": "nats.creds"}]
            assert volume["secret"]["defaultMode"] == 0o440
        migrate = found["migrate"]["spec"]["template"]["spec"]
        assert "nats-creds" not in {v["name"] for v in migrate["volumes"]}
        assert "PGMETER_NATS_CREDS_FILE" not in _env(found["migrate"])

    def test_none_by_default(self, default_render) -> None:
        for role, doc in _workloads(default_render).items():
            assert not {"PGMETER_NATS_USER", "PGMETER_NATS_PASSWORD", "PGMETER_NATS_TOKEN",
                        "PGMETER_NATS_CREDS_FILE"} & set(_env(doc)), role
            assert "nats-creds" not in {v["name"] for v in doc["spec"]["template"]["spec"]["volumes"]}

    @pytest.mark.parametrize("kind", ["userPassword", "token", "credsFile"])
    def test_a_type_needs_its_secret(self, render, kind) -> None:
        with pytest.raises(helm_python.HelmRenderError, match=f"nats.credentials.type={kind} needs nats.credentials.secretName"):
            render({"nats": {"credentials": {"type": kind}}})
