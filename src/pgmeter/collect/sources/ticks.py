"""Scheduled instants: every multiple of ``interval`` since the Unix epoch.

The Prometheus and Kubernetes sources read the world at these instants. They are the
same on every replica and across restarts, so an event derived from (instant, series)
or (instant, pod) has the same id wherever and however often it is produced, and the
endpoint counts it once. The last instant done is a source's committed position;
after a restart the missed instants are done in order, at most ``max_catch_up``.
"""

from __future__ import annotations

import asyncio
import time


class Ticks:
    def __init__(self, interval_seconds: float, offset_seconds: float, max_catch_up: int) -> None:
        self.interval_ms = max(1, int(interval_seconds * 1000))
        self.offset_ms = int(offset_seconds * 1000)
        self.max_catch_up = max_catch_up

    def due(self, now_ms: int | None = None) -> int:
        """The latest instant whose offset has passed (milliseconds)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return (now_ms - self.offset_ms) // self.interval_ms * self.interval_ms

    def pending(self, last: int | None) -> tuple[list[int], int]:
        """The instants to do after ``last`` (None: a first start does only the latest
        due one, not all of history), and how many were skipped past ``max_catch_up``."""
        due = self.due()
        if last is None:
            return [due], 0
        first = last + self.interval_ms
        earliest = due - (self.max_catch_up - 1) * self.interval_ms
        skipped = max(0, (earliest - first) // self.interval_ms)
        return list(range(max(first, earliest), due + 1, self.interval_ms)), skipped

    async def sleep(self) -> None:
        """Until the next instant is due."""
        now_ms = int(time.time() * 1000)
        next_due = self.due(now_ms) + self.interval_ms + self.offset_ms
        await asyncio.sleep(max(0.01, (next_due - now_ms) / 1000))
