"""RFC 3339 date-times as the API reads and writes them: one definition for all of it.

Ingest, query parameters and answers used to carry their own parsers and formatters,
and they disagreed (one took a space for the "T", one printed offsets, one UTC). Both
directions follow Go's ``time.RFC3339Nano``, as OpenMeter does: a "T" (or "t"), any
number of fractional digits (kept to microseconds, truncated as Go truncates), and "Z"
or a numeric offset.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

# Checked before datetime.fromisoformat, which alone would also take dates without a
# time, week dates and naive times.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})\Z", re.ASCII)


def parse_rfc3339(text: str) -> datetime:
    """An aware datetime; ``ValueError`` with a readable reason for anything else.

    On the ingest hot path: a regular expression and ``fromisoformat`` (which takes any
    number of fractional digits in 3.11, but only an upper-case "T" and "Z").
    """
    if not _RFC3339.match(text):
        raise ValueError("must be an RFC 3339 date-time, e.g. 2024-01-01T00:00:00Z")
    if text[10] == "t":
        text = f"{text[:10]}T{text[11:]}"
    if text[-1] == "z":
        text = text[:-1] + "Z"
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"is not a valid date-time: {exc}") from None


def format_rfc3339(value: datetime, *, utc: bool = False) -> str:
    """As Go prints it: ``Z`` for UTC, the fraction without trailing zeros.

    ``utc`` converts first (event times are stored and listed in UTC); otherwise the
    value's own offset is kept (a query echoes the zone it was asked in).
    """
    if utc:
        value = value.astimezone(UTC)
    text = value.isoformat()
    if value.microsecond:
        head, _, rest = text.partition(".")
        digits, offset = rest[:6].rstrip("0"), rest[6:]
        text = f"{head}.{digits}{offset}"
    if text.endswith("+00:00"):
        text = text[:-6] + "Z"
    return text
