"""Metric assertions scoped to one test: what changed between two scrapes.

Every in-process server of a test session shares one Prometheus registry, so an
absolute value (or "the series exists") says more about the tests that ran before
than about this one: such an assertion cannot fail in a full run and means
something only when the test runs alone. Sample before, act, sample after, and
assert the difference, with ``==`` where the exact count is known::

    before = scrape(client)
    ...  # the thing under test
    assert delta(before, scrape(client), "openmeter_events_processed_total") == 2

A sample is selected by its full name (``_total``, ``_count``, ``_bucket`` included)
and the labels given; every other label is summed over all its values, so the
assertion does not depend on, say, what the namespace label holds.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    return [(sample.name, dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(text) for sample in family.samples]


def scrape(client: httpx.Client) -> Samples:
    """Every sample of ``/metrics`` on the server ``client`` talks to."""
    response = client.get("/metrics")
    response.raise_for_status()
    return parse(response.text)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(value for sample, have, value in samples
               if sample == name and all(have.get(key) == want for key, want in labels.items()))


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)
