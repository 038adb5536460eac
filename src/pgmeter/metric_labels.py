"""Label values that name a tenant: namespaces and meter slugs.

``/metrics`` needs no token, so by default its series must not tell one tenant the
names, slugs or volumes of another (``metrics.tenantLabels: false``): such labels
keep their names but carry "" (Prometheus treats an empty label like an absent one,
so dashboards and recording rules keep working), which also keeps the number of
series fixed however many tenants and meters there are. A single-tenant install
turns them on. Every series labelled by namespace, slug or meter takes its value
through :func:`tenant`.
"""

from __future__ import annotations

_enabled = False


def configure(enabled: bool) -> None:
    """Set once per process from ``settings.metrics.tenantLabels`` (at start-up)."""
    global _enabled
    _enabled = enabled


def tenant(value: str) -> str:
    """``value`` if tenant labels are on, else ""."""
    return value if _enabled else ""
