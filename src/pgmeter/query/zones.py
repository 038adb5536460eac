"""Which UTC offsets an IANA zone uses over a time range.

The planner may answer a window from a rollup level only if every window boundary
falls on that level's grid: HOUR/DAY/MONTH boundaries are local whole hours, so
they sit on the 15-minute grid exactly when the zone's offset is a multiple of 15
minutes, and on the UTC-day grid when it is zero. That holds for every zone today
but not always historically (Africa/Monrovia was UTC-0:44:30 until 1972; local
mean times before ~1900 have offsets in seconds), so the planner checks the
offsets of the actual range instead of assuming.

``zoneinfo`` does not expose transitions, so this reads the zone's TZif file
(RFC 8536) from the same places ``zoneinfo`` looks: ``zoneinfo.TZPATH``, then the
``tzdata`` package. Offsets after the last listed transition come from the file's
footer rule (the POSIX TZ string), both its standard and its daylight offset.
"""

from __future__ import annotations

import bisect
import re
import struct
import zoneinfo
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class OffsetTable:
    transitions: tuple[int, ...]  # UTC seconds at which an offset starts
    offsets: tuple[int, ...]      # the offset (seconds east of UTC) from each transition on
    initial: int                  # the offset before the first transition
    after_last: tuple[int, ...]   # offsets the footer rule can use after the last transition

    def offsets_between(self, start: datetime | None, end: datetime | None) -> set[int]:
        """Every offset in effect at some instant of ``[start, end)`` (None: unbounded)."""
        lo = None if start is None else start.timestamp()
        hi = None if end is None else end.timestamp()
        first = 0 if lo is None else bisect.bisect_right(self.transitions, lo)
        found = {self.initial if first == 0 else self.offsets[first - 1]}
        if lo is None:
            found.add(self.initial)
        for index in range(first, len(self.transitions)):
            if hi is not None and self.transitions[index] >= hi:
                break
            found.add(self.offsets[index])
        last = self.transitions[-1] if self.transitions else None
        if self.after_last and (hi is None or last is None or hi > last):
            found.update(self.after_last)
        return found


def _zone_file(key: str) -> bytes:
    for base in zoneinfo.TZPATH:
        candidate = Path(base) / key
        if candidate.is_file():
            return candidate.read_bytes()
    package = resources.files("tzdata").joinpath("zoneinfo", *key.split("/"))
    return package.read_bytes()


_OFFSET = r"([+-]?\d{1,3}(?::\d{1,2}){0,2})"
_NAME = r"(<[^>]*>|[A-Za-z]{3,})"
# std name, std offset, then optionally dst name, dst offset, rules.
_TZ_STRING = re.compile(rf"^{_NAME}{_OFFSET}(?:{_NAME}{_OFFSET}?)?(?:,.*)?$")


def _posix_offset(text: str) -> int:
    """POSIX offsets count hours west of UTC: "5" is UTC-5, "-5:45" is UTC+5:45."""
    sign = -1 if text.startswith("-") else 1
    parts = [int(p) for p in text.lstrip("+-").split(":")] + [0, 0]
    return -sign * (parts[0] * 3600 + parts[1] * 60 + parts[2])


def _footer_offsets(footer: str) -> tuple[int, ...]:
    if not footer:
        return ()
    match = _TZ_STRING.match(footer)
    if not match:
        raise ValueError(f"unreadable TZ rule {footer!r}")
    std = _posix_offset(match[2])
    if match[3] is None:
        return (std,)
    # Daylight time defaults to one hour ahead of standard time.
    return (std, _posix_offset(match[4]) if match[4] else std + 3600)


def _parse(data: bytes) -> OffsetTable:
    if data[:4] != b"TZif":
        raise ValueError("not a TZif file")
    version = data[4:5]

    def header(at: int) -> tuple[int, ...]:
        return struct.unpack(">6l", data[at + 20:at + 44])

    isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt = header(0)
    pos, time_size = 44, 4
    if version >= b"2":
        # Skip the 32-bit block; the 64-bit one after it covers all of time.
        pos += timecnt * 5 + typecnt * 6 + charcnt + leapcnt * 8 + isstdcnt + isutcnt
        isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt = header(pos)
        pos, time_size = pos + 44, 8
    times = struct.unpack(f">{timecnt}{'q' if time_size == 8 else 'l'}", data[pos:pos + timecnt * time_size])
    pos += timecnt * time_size
    indices = data[pos:pos + timecnt]
    pos += timecnt
    utoffs = [struct.unpack(">l", data[pos + 6 * i:pos + 6 * i + 4])[0] for i in range(typecnt)]
    pos += typecnt * 6 + charcnt + leapcnt * (time_size + 4) + isstdcnt + isutcnt
    footer = ""
    if version >= b"2":
        footer = data[pos:].strip(b"\n").split(b"\n")[0].decode()
    return OffsetTable(transitions=tuple(times), offsets=tuple(utoffs[i] for i in indices),
                       initial=utoffs[0] if utoffs else 0, after_last=_footer_offsets(footer))


@lru_cache(maxsize=512)
def offset_table(key: str) -> OffsetTable | None:
    """The zone's offsets, or None if its TZif file cannot be read (the planner then
    falls back to what is exact without any assumption: raw events)."""
    try:
        return _parse(_zone_file(key))
    except (OSError, ValueError, ModuleNotFoundError, struct.error):
        return None
