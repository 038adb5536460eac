"""Structured JSON logs on stdout, one object per line.

Request ids are attached by the api middleware through a context variable, so
every line logged while serving a request carries the id that request answered with.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class RepeatFilter(logging.Filter):
    """Lets one record per message through every ``interval`` seconds.

    For loggers whose warnings a client controls: uvicorn warns once per request that
    exceeds ``limitConcurrency`` and once per malformed request, so an overload or a
    hostile client would otherwise write a line per request. Repeats are counted on
    the next line that passes (``repeated``).
    """

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            return True  # errors carry their own traceback: never hidden
        key = str(record.msg)
        last, suppressed = self._last.get(key, (0.0, 0))
        if record.created - last < self.interval:
            self._last[key] = (last, suppressed + 1)
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = (record.created, 0)
        if suppressed:
            record.repeated = suppressed
        return True


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log repeats what our middleware logs, without the request id.
    logging.getLogger("uvicorn.access").disabled = True
    # The scheduler announces every run of every job at INFO: chatter every 2 s forever.
    if root.level > logging.DEBUG:
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    server_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, RepeatFilter) for f in server_log.filters):
        server_log.addFilter(RepeatFilter())
