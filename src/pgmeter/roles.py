"""What each role adds to a process: API routes and background work.

This is the one place that knows which module implements which role, so the CLI,
the app factory and the tests start roles the same way.
"""

from __future__ import annotations

import gc

from starlette.routing import BaseRoute

from pgmeter.runtime import Runtime


def api_routes() -> list[BaseRoute]:
    from pgmeter.api import docs, events, meters, portal, query
    from pgmeter.console import routes as console
    from pgmeter.credits import webhooks
    from pgmeter.entitlements.api import customers, entitlements, features
    from pgmeter.notify import api as notifications

    return [*events.routes, *meters.routes, *query.routes, *customers.routes, *features.routes,
            *entitlements.routes, *docs.routes, *portal.routes, *webhooks.routes, *notifications.routes,
            *console.routes]


async def start(runtime: Runtime) -> None:
    """Start the background work of ``runtime.roles``; it stops with the runtime."""
    from pgmeter.ingest import stream
    from pgmeter.meters import service as meters_service

    # Every role may be the first to start; each makes sure of what it relies on.
    await stream.ensure_stream(runtime)
    await meters_service.start(runtime)
    if "api" in runtime.roles:
        from pgmeter.entitlements import service as entitlements
        from pgmeter.ingest import publisher
        from pgmeter.query.cache import QueryCache
        from pgmeter.quota import reader as quota_values

        # Features rely on their meter: no deleting it, no removing a groupBy key they filter on.
        runtime.meter_guards.append(entitlements.meter_change_refusal)
        # Entitlement values now come from the quota room's copy in Valkey when it is
        # fresh; the entitlements routes find the reader here (quota imports entitlements).
        runtime.quota_values = quota_values

        runtime.query_cache = QueryCache(runtime.valkey, runtime.settings)
        await publisher.start(runtime)
    if "sink" in runtime.roles:
        from pgmeter.sink import worker

        await worker.start(runtime)
        from pgmeter.quota import worker as quota_worker

        await quota_worker.start(runtime)
        from pgmeter.notify import delivery

        await delivery.start(runtime)
    if "refresher" in runtime.roles:
        from pgmeter.rollup import refresher

        await refresher.start(runtime)
    if "lago-sync" in runtime.roles and runtime.settings.lago.enabled:
        from pgmeter.lago import sync

        await sync.start(runtime)

    # What start-up built lives as long as the process: move it out of the cyclic
    # collector's reach and collect the young generation less often. Requests
    # allocate dozens of short-lived objects each; with the defaults, full
    # collections rescanning the start-up heap took ~20% of the api's CPU
    # (single-event ingest went from 13k to 17k req/s in the same run).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
