"""One RFC 3339 reader and writer for ingest, query parameters and answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from pgmeter.times import format_rfc3339, parse_rfc3339

BERLIN_SUMMER = timezone(timedelta(hours=2))


@pytest.mark.parametrize(("text", "expected"), [
    ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ("2024-05-01t10:00:00z", datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ("2024-05-01T10:00:00.1234569+02:00", datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=BERLIN_SUMMER)),
    ("2024-05-01T10:00:00.5-00:30", datetime(2024, 5, 1, 10, 0, 0, 500000, tzinfo=timezone(-timedelta(minutes=30)))),
])
def test_go_rfc3339nano_is_read(text: str, expected: datetime) -> None:
    parsed = parse_rfc3339(text)
    assert parsed == expected and parsed.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize("text", ["2024-05-01 10:00:00Z", "2024-05-01", "2024-05-01T10:00:00", "2024-W18-3T10:00:00Z",
                                  "2024-02-30T00:00:00Z", "2024-05-01T24:00:00Z", "2024-05-01T10:00:00+24:00",
                                  "２０２４-05-01T10:00:00Z", ""])
def test_anything_else_is_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339|valid date-time"):
        parse_rfc3339(text)


def test_written_as_go_writes_it() -> None:
    at = datetime(2024, 5, 1, 10, 0, 0, 120000, tzinfo=BERLIN_SUMMER)
    assert format_rfc3339(at) == "2024-05-01T10:00:00.12+02:00"
    assert format_rfc3339(at, utc=True) == "2024-05-01T08:00:00.12Z"
    assert format_rfc3339(at.replace(microsecond=0), utc=True) == "2024-05-01T08:00:00Z"
    for value in (at, at.replace(microsecond=1), at.astimezone(UTC)):
        assert parse_rfc3339(format_rfc3339(value)) == value
