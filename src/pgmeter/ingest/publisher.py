"""Placeholder until its issue lands."""

from pgmeter.runtime import Runtime


async def start(runtime: Runtime) -> None:
    return None
