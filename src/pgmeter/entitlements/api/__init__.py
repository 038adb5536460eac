"""The entitlements room's HTTP surface: customers, features, entitlements and grants.

OpenMeter's ``/api/v1`` routes for them (and the deprecated subject-scoped ones),
registered by :mod:`pgmeter.roles`; ``shapes`` holds the door checks and JSON shapes
the notify room's routes share.
"""
