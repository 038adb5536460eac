"""Placeholder until its issue lands."""

from pgmeter.runtime import Runtime


async def ensure_stream(runtime: Runtime) -> None:
    return None
