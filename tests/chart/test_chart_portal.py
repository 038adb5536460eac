"""The portal settings as chart/README.md documents them: the signing key from a
Secret through the api's extraEnv, the CORS origins through `config`."""

from __future__ import annotations

import helm_python
import pytest

from tests.chart.test_chart_runtime_contract import _container, load  # noqa: F401 (fixture)

PORTAL_ENV = {"name": "PGMETER_PORTAL_TOKEN_SECRET",
              "valueFrom": {"secretKeyRef": {"name": "pgmeter-portal", "key": "token-secret"}}}


def test_portal_key_from_a_secret_and_cors_from_config(render, load) -> None:  # noqa: F811
    rendered = render({"api": {"extraEnv": [PORTAL_ENV]},
                       "config": {"portal": {"corsAllowedOrigins": ["https://tpp.example"]}}})
    api = next(d for d in rendered.of_kind("Deployment") if _container(d)["args"][-1] == "api")
    settings = load(rendered, api)
    assert settings.portal.token_secret == "stub-pgmeter-portal-token-secret"
    assert settings.portal.cors_allowed_origins == ["https://tpp.example"]


def test_a_plain_portal_key_is_refused(render) -> None:
    with pytest.raises(helm_python.HelmRenderError, match="config.portal.tokenSecret"):
        render({"config": {"portal": {"tokenSecret": "x" * 40}}})
    with pytest.raises(helm_python.HelmRenderError, match="PGMETER_PORTAL_TOKEN_SECRET"):
        render({"api": {"extraEnv": [{"name": "PGMETER_PORTAL_TOKEN_SECRET", "value": "x" * 40}]}})
