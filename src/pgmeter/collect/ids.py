"""Deterministic event ids: the same source record always gets the same id.

pgmeter deduplicates on (namespace, source, id). When every collector derives an
event's id from *what the event is* (a row's key, a scrape instant and series, a log
record's content, a file and offset) rather than from a random UUID, a retry, a
restart that re-reads, or a second replica reading the same table all produce the
same id, and the event is counted once - no leader election needed. (OpenMeter's
presets map ``id: uuid_v4()``, so a requeued scrape gets new ids.)

The id is a UUIDv5 over the pipeline's ``source`` and the record's identity, so two
pipelines reading different things never collide, and replicas with the same config
always agree.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

# A fixed namespace for pgmeter collect's ids (uuid5 of the project name).
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "pgmeter:collect")


def event_id(source: str, *identity: object) -> str:
    """``uuid5(NAMESPACE, source | identity...)`` as text."""
    key = "\x1f".join([source, *(str(part) for part in identity)])
    return str(uuid.uuid5(NAMESPACE, key))


def content_hash(value: Any) -> str:
    """A stable digest of a JSON-able value (keys sorted): identity for records without a key."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
