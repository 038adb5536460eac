"""Fuzz the live server against the OpenAPI document (schemathesis).

Every operation gets valid and invalid inputs generated from the document. Nothing
may answer 5xx, every 4xx must be problem+json, and responses must match the
document. Bounded so it fits in the normal suite.
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
from pgmeter.config import Settings
from tests.support.app import AppServer

METERS = [
    {"slug": "calls", "eventType": "api.call", "aggregation": "COUNT", "groupBy": {"endpoint": "$.endpoint"}},
    {"slug": "latency", "eventType": "api.call", "aggregation": "SUM", "valueProperty": "$.ms"},
]


@pytest.fixture
def live_api(settings: Settings) -> Iterator[AppServer]:
    with AppServer(settings, {"api", "sink", "refresher"}) as app:
        with app.client() as client:
            for meter in METERS:
                assert client.post("/api/v1/meters", json=meter).status_code == 201
        yield app


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


@pytest.mark.parametrize(("operation", "mode"), CASES, ids=lambda v: getattr(v, "label", str(v)))
def test_api_conforms_and_never_fails(live_api: AppServer, operation: Any, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(max_examples=15, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=live_api.base_url)
        # Semantic rules the document cannot express (from < to, NUL characters,
        # valueProperty required unless COUNT) rightly reject schema-valid requests,
        # so "valid data is accepted" is the one default check left out.
        case.validate_response(response, additional_checks=[problem_json_for_errors],
                               excluded_checks=[positive_data_acceptance])

    run()
