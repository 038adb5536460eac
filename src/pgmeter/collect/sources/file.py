"""File source: follow a JSON-lines file (gateway access logs) across rotation.

The position - the file's inode and the byte offset after the last complete line
read - is committed to the buffer with the events of the lines read up to it, so a
restart resumes exactly there. Only complete lines (ending in a newline) are read;
a line being written is read when it is finished.

Rotation: when the path names a new file (another inode), the rest of the old one
is read first - from the handle still open, or after a restart from ``<path>.1``
when that is the old inode (logrotate's default) - and then the new file from its
start. A file that shrank below the offset was truncated in place (copytruncate):
it is read again from its start.

The event id is derived from (inode, offset, line): a line read again after a crash
gets the same id, and a truncated file's new first line (same inode, same offset)
still gets a new one because its content differs. A line that is not a JSON object
is dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from pgmeter.collect.buffer import Rejected
from pgmeter.collect.ids import event_id
from pgmeter.collect.mapping import Mapped
from pgmeter.collect.pipeline import Pipeline
from pgmeter.config import CollectSourceConfig, ConfigError

log = logging.getLogger("pgmeter.collect.file")

MAX_LINE_BYTES = 1024 * 1024


class FileSource:
    def __init__(self, pipeline: Pipeline, config: CollectSourceConfig) -> None:
        if not config.file:
            raise ConfigError(f"pipeline {pipeline.name}: a file source needs file")
        self.pipeline = pipeline
        self.config = config
        self.path = Path(config.file)
        self.state_key = f"file:{self.path}"
        self._handle: IO[bytes] | None = None
        self._inode = 0
        self._offset = 0

    def _restore(self) -> None:
        saved = self.pipeline.buffer.get_state(self.state_key)
        if saved:
            state = json.loads(saved)
            self._inode, self._offset = int(state["inode"]), int(state["offset"])

    def _open(self, path: Path) -> IO[bytes] | None:
        try:
            handle = open(path, "rb")  # noqa: SIM115 - held open across reads to survive a rename
        except FileNotFoundError:
            return None
        return handle

    async def run(self) -> None:
        self._restore()
        interval = self.config.interval.total_seconds()
        while True:
            read = await self.read_once()
            if not read:
                await asyncio.sleep(interval)

    async def read_once(self) -> int:
        """Read what is complete; how many lines were read."""
        if self._handle is None:
            self._handle = self._reopen()
            if self._handle is None:
                return 0
        current = _inode(self.path)
        read = await self._read(self._handle)
        if read:
            return read
        if current is not None and current != self._inode:
            # Rotated and the old file is drained: move to the new one, from its start.
            self._handle.close()
            self._handle = self._open(self.path)
            if self._handle is not None:
                self._inode, self._offset = os.fstat(self._handle.fileno()).st_ino, 0
                await self.pipeline.offer(Mapped([], []), self._state(), block=True)
            return 0
        if current == self._inode and os.fstat(self._handle.fileno()).st_size < self._offset:
            log.warning("file truncated; reading it from the start", extra={"pipeline": self.pipeline.name,
                                                                            "file": str(self.path)})
            self._offset = 0
            await self.pipeline.offer(Mapped([], []), self._state(), block=True)
        return 0

    def _reopen(self) -> IO[bytes] | None:
        """After a (re)start: the file holding the saved position, or the current file from its start."""
        if self._inode:
            for candidate in (self.path, self.path.with_name(self.path.name + ".1")):
                if _inode(candidate) == self._inode:
                    return self._open(candidate)
        handle = self._open(self.path)
        if handle is not None:
            inode = os.fstat(handle.fileno()).st_ino
            if inode != self._inode:
                self._inode, self._offset = inode, 0
        return handle

    async def _read(self, handle: IO[bytes]) -> int:
        handle.seek(self._offset)
        chunk = handle.read(MAX_LINE_BYTES * 4)
        end = chunk.rfind(b"\n")
        if end < 0:
            if len(chunk) >= MAX_LINE_BYTES * 4:  # a line too long to ever be an event: skip it
                await self._skip_long_line(chunk)
            return 0
        records: list[tuple[Any, str]] = []
        rejects: list[Rejected] = []
        offset = self._offset
        for line in chunk[:end + 1].split(b"\n")[:-1]:
            identity = event_id(self.pipeline.event_source, "file", self._inode, offset,
                                hashlib.sha256(line).hexdigest())
            offset += len(line) + 1
            take_line(line, identity, records, rejects)
            if len(records) >= self.config.batch:
                break
        mapped = self.pipeline.map(records)
        mapped.rejected.extend(rejects)
        self._offset = offset
        await self.pipeline.offer(mapped, self._state(), block=True)
        return max(1, len(records))

    async def _skip_long_line(self, chunk: bytes) -> None:
        # Never blocks the file: the oversized line is dead-lettered (its start) and skipped.
        self._offset += len(chunk)
        reject = Rejected(chunk[:1024].decode("utf-8", "backslashreplace"),
                          f"line longer than {len(chunk)} bytes; skipped")
        await self.pipeline.offer(Mapped([], [reject]), self._state(), block=True)

    def _state(self) -> dict[str, str]:
        return {self.state_key: json.dumps({"inode": self._inode, "offset": self._offset})}


def take_line(line: bytes, identity: str, records: list[tuple[Any, str]], rejects: list[Rejected]) -> None:
    """One line of a JSON-lines source (the file and S3 sources): a record with its id,
    a dead letter when it is not JSON, nothing when it is blank."""
    if not line.strip():
        return
    try:
        records.append((json.loads(line), identity))
    except (ValueError, RecursionError) as exc:
        rejects.append(Rejected(line.decode("utf-8", "backslashreplace"), f"not a JSON line: {exc}"))


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None
