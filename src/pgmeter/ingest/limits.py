"""The limits every event must meet, checked at the door and again by the sink.

The api refuses an event that breaks one with 400 problem+json naming the field; the
sink applies the same rules to whatever reaches the stream by other means (a message
published straight to JetStream) and dead-letters the event with the same reason. Both
judge an event's time against the moment the api accepted it (the message's ``at``),
never against the sink's own clock, so a redelivered message is judged the same way
every time.

Why these numbers: every indexed text column stays far below PostgreSQL's btree row
limit (~2.7 KB), and a real producer never comes near them (OpenMeter's SDKs use UUIDs
for ids and short names elsewhere). The time window keeps the number of partitions
bounded whatever a tenant sends; the default reaches back far enough to backfill a
year of history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from pgmeter.config import LimitsConfig, Settings

DAY_MICROS = 86_400_000_000
# The last microsecond Python (and so the api) can represent: 9999-12-31T23:59:59.999999Z.
MAX_MICROS = 253_402_300_799_999_999

# The CloudEvent fields with a byte limit (each stored in an indexed column).
TEXT_FIELDS = ("id", "source", "type", "subject")


@dataclass(frozen=True)
class EventLimits:
    """The event limits in force, resolved once from the settings."""

    id_bytes: int
    source_bytes: int
    type_bytes: int
    subject_bytes: int
    max_age_micros: int
    max_ahead_micros: int

    @classmethod
    def of(cls, settings: Settings) -> EventLimits:
        limits: LimitsConfig = settings.limits
        max_age = limits.event_max_age
        if settings.sink.retention_days:
            # An event older than the raw-event retention would be dropped with its
            # partition anyway (and would make a partition just to be dropped).
            max_age = min(max_age, timedelta(days=settings.sink.retention_days))
        return cls(
            id_bytes=limits.event_id_bytes,
            source_bytes=limits.event_source_bytes,
            type_bytes=limits.event_type_bytes,
            subject_bytes=limits.event_subject_bytes,
            max_age_micros=int(max_age.total_seconds() * 1_000_000),
            max_ahead_micros=int(limits.event_max_ahead.total_seconds() * 1_000_000),
        )

    def window(self, accepted_at: int) -> tuple[int, int]:
        """The accepted event times ``[lo, hi]`` (microseconds) for a request taken at ``accepted_at``.

        The door computes it once per request and compares each event's time with two
        integer comparisons; :meth:`check_time` words the reason when one is outside.
        Clamped to what :meth:`check_time` accepts whatever the window, so the door and
        the sink never disagree (the sink would dead-letter what the door let through).
        """
        return max(1, accepted_at - self.max_age_micros), min(MAX_MICROS, accepted_at + self.max_ahead_micros)

    def byte_limit(self, field: str) -> int:
        return getattr(self, f"{field}_bytes")

    def check_text(self, field: str, value: str) -> str | None:
        """The reason ``value`` is too long for ``field``, or ``None``.

        Characters are counted first: a string of n characters has between n and 4n
        UTF-8 bytes, so only strings near the limit are encoded.
        """
        limit = self.byte_limit(field)
        if len(value) <= limit // 4:
            return None
        if len(value) > limit or len(value.encode("utf-8", "surrogatepass")) > limit:
            return f"must be at most {limit} bytes (UTF-8)"
        return None

    def check_time(self, micros: int, accepted_at: int) -> str | None:
        """The reason an event time is outside the accepted window, or ``None``.

        ``accepted_at`` is when the api took the request (microseconds since the epoch).
        Whatever the window, a time must also be after the Unix epoch (OpenMeter's sink
        drops earlier ones) and representable (at most 9999-12-31T23:59:59.999999Z).
        """
        if micros <= 0:
            return "is at or before 1970-01-01T00:00:00Z"
        if micros > MAX_MICROS:
            return "is after 9999-12-31T23:59:59.999999Z"
        if micros < accepted_at - self.max_age_micros:
            days = self.max_age_micros // DAY_MICROS
            return (f"is more than {days} days before the time it was received "
                    "(limits.eventMaxAge, or sink.retentionDays when shorter)")
        if micros > accepted_at + self.max_ahead_micros:
            hours = self.max_ahead_micros // 3_600_000_000
            return f"is more than {hours} hours after the time it was received (limits.eventMaxAhead)"
        return None

