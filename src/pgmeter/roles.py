"""What each role adds to a process: API routes and background work.

This is the one place that knows which module implements which role, so the CLI,
the app factory and the tests start roles the same way.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from pgmeter.runtime import Runtime


def api_routes() -> list[BaseRoute]:
    return []


async def start(runtime: Runtime) -> None:
    """Start the background work of ``runtime.roles``; it stops with the runtime."""
    return None
