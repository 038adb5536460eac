"""The checked-in OpenAPI document and the live routes describe the same API."""

from __future__ import annotations

import re

from starlette.routing import Route

from pgmeter.api.app import create_app
from pgmeter.api.docs import openapi_document
from pgmeter.config import Settings

HTTP_METHODS = {"get", "put", "post", "delete", "patch"}


def live_operations() -> set[tuple[str, str]]:
    app = create_app(Settings(), frozenset({"api"}))
    found = set()
    for route in app.routes:
        # The console (/, /console/*) is a web page, not part of the API.
        if not isinstance(route, Route) or route.path == "/":
            continue
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method.lower(), path))
    return found


def documented_operations() -> set[tuple[str, str]]:
    doc = openapi_document()
    return {(method, path) for path, item in doc["paths"].items() for method in item if method in HTTP_METHODS}


def normalise(operations: set[tuple[str, str]]) -> set[tuple[str, str]]:
    # Path parameter names may differ between Starlette and the document.
    return {(method, re.sub(r"\{\w+\}", "{}", path)) for method, path in operations}


def test_every_live_route_is_documented_and_every_documented_route_is_live() -> None:
    live, documented = normalise(live_operations()), normalise(documented_operations())
    assert live - documented == set(), "routes missing from openapi.yaml"
    assert documented - live == set(), "documented routes the server does not serve"


def test_document_is_valid_openapi() -> None:
    from openapi_spec_validator import validate

    validate(openapi_document())  # raises on an invalid document
    assert openapi_document()["openapi"].startswith("3.0")
