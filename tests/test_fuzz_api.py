"""Fuzz the live server against the OpenAPI document (schemathesis).

Every operation gets valid and invalid inputs generated from the document. Nothing
may answer 5xx, every 4xx must be problem+json, and responses must match the
document. Bounded so it fits in the normal suite.

One server serves the module; each test works in a namespace of its own (a bearer
token per test), so it starts from nothing, as on a fresh server, for a fraction of
the cost (a database, a stream and three roles started per test took most of the
module's time).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from pgmeter.api.docs import openapi_document
from tests.support.app import AppServer
from tests.support.ingest import isolated_settings

METERS = [
    {"slug": "calls", "eventType": "api.call", "aggregation": "COUNT", "groupBy": {"endpoint": "$.endpoint"}},
    {"slug": "latency", "eventType": "api.call", "aggregation": "SUM", "valueProperty": "$.ms"},
]


OPERATIONS = [result.ok() for result in schemathesis.openapi.from_dict(openapi_document()).get_all_operations()]


def problem_json_for_errors(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                            case: schemathesis.Case) -> bool:
    if 400 <= response.status_code < 500:
        content_type = response.headers.get("content-type", [""])[0]
        assert content_type.startswith("application/problem+json"), f"{response.status_code} is {content_type}"
        body = response.json()
        assert body["status"] == response.status_code and body["title"]
        assert body.get("detail"), "a 4xx must say what was wrong"
    return True


def _takes_input(operation: Any) -> bool:
    return bool(list(operation.iter_parameters())) or bool(operation.body)


# Negative data needs something to break: operations without parameters or a body
# only get valid requests.
CASES = [(op, mode) for op in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode is GenerationMode.POSITIVE or _takes_input(op)]
# A namespace per test: token -> namespace.
TENANTS = {f"fuzz-tenant-token-{n:04d}": f"fuzz{n}" for n in range(len(CASES))}
_unused_tenants = iter(TENANTS)
# The one route that takes no namespace token: it wants a portal token (a JWT).
PORTAL_QUERY = "/api/v1/portal/meters/{meterSlug}/query"


@pytest.fixture(scope="module")
def live_api(pg_server: Any, nats_server: Any, valkey_server: Any) -> Iterator[AppServer]:
    with isolated_settings(pg_server, nats_server.url, valkey_server.url, auth_tokens=TENANTS,
                           portal={"tokenSecret": "fuzz-portal-signing-key-0123456789abcdef"}) as settings, \
            AppServer(settings, {"api", "sink", "refresher"}) as app:
        yield app


@pytest.fixture
def tenant(live_api: AppServer) -> dict[str, str]:
    """The headers of a namespace no other test uses, its meters created."""
    headers = {"Authorization": f"Bearer {next(_unused_tenants)}"}
    with live_api.client(headers=headers) as client:
        for meter in METERS:
            assert client.post("/api/v1/meters", json=meter).status_code == 201
    return headers


@pytest.mark.parametrize(("operation", "mode"), CASES, ids=lambda v: getattr(v, "label", str(v)))
def test_api_conforms_and_never_fails(live_api: AppServer, tenant: dict[str, str], operation: Any,
                                      mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(max_examples=15, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=live_api.base_url, headers=tenant)
        # Every request carries its tenant's token: a 401 would mean the fuzz never got
        # past auth and proved nothing.
        assert response.status_code != 401 or operation.path == PORTAL_QUERY, response.text
        # Semantic rules the document cannot express (from < to, NUL characters,
        # valueProperty required unless COUNT) rightly reject schema-valid requests,
        # so "valid data is accepted" is the one default check left out.
        case.validate_response(response, additional_checks=[problem_json_for_errors],
                               excluded_checks=[positive_data_acceptance])

    run()
