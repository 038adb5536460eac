"""The OpenAPI document, checked in as ``openapi.yaml`` and served as JSON.

It is written by hand (the API mirrors OpenMeter's, not our handlers' shapes), and
a test holds it to the live routes, so neither can drift from the other.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import yaml
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@cache
def openapi_document() -> dict[str, Any]:
    text = resources.files("pgmeter.api").joinpath("openapi.yaml").read_text()
    return yaml.safe_load(text)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


routes = [Route("/api/v1/openapi.json", openapi, methods=["GET"])]
