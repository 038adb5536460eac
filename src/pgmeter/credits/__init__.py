"""Lago's prepaid credits become entitlement grants (``POST /lago/webhooks``).

A room of its own: it builds on the entitlements room, and the core ``lago`` package
(usage pushed to Lago) knows nothing of it.
"""
