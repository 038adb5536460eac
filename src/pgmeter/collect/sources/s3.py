"""S3 source: newline-delimited JSON objects under a prefix, each line once.

Objects are taken in key order (the order ListObjectsV2 returns, page after page by
continuation token), each read line by line (gzip recognised by its magic bytes, so
``.gz`` access logs and ``Content-Encoding: gzip`` uploads both work). The position -
the object being read, its ETag and the lines done, or the last object finished - is
committed to the buffer in the same transaction as the events read up to it, as the
SQL and file sources do: a restart resumes mid-object without skipping or re-reading.

The event id is derived from (bucket, key, ETag, line number), so replicas reading the
same prefix count each line once, and an object overwritten with new content (a new
ETag) is read again from its first line as the new object it is. Like the SQL cursor,
the position moves forward in key order: an object created later with a key before
the last one finished is not read - name objects by time (as log shippers do).

Why boto3: the AWS SDK itself, maintained by AWS, speaks SigV4 and every S3-compatible
store (MinIO, Ceph, R2) through ``url``, and takes credentials the usual ways (env,
profile, IRSA web identity) so none sit in collector.yaml. It is synchronous: its
calls run in a thread, off the event loop the push sources share.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
from typing import IO, Any

from pgmeter.collect.buffer import Rejected
from pgmeter.collect.ids import event_id
from pgmeter.collect.pipeline import Pipeline
from pgmeter.collect.sources.file import MAX_LINE_BYTES, take_line
from pgmeter.config import CollectSourceConfig, ConfigError

log = logging.getLogger("pgmeter.collect.s3")

PAGE_KEYS = 1000  # ListObjectsV2's own maximum


class S3Source:
    def __init__(self, pipeline: Pipeline, config: CollectSourceConfig) -> None:
        if not config.bucket:
            raise ConfigError(f"pipeline {pipeline.name}: an s3 source needs a bucket")
        import boto3
        from botocore.config import Config

        self.pipeline = pipeline
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.state_key = f"s3:{self.bucket}/{self.prefix}"
        # Path-style for S3-compatible endpoints (no bucket DNS names to set up); a
        # connect timeout, and the SDK's own retries for throttling and 5xx.
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=config.url or None, region_name=config.region or "us-east-1",
            config=Config(s3={"addressing_style": "path"} if config.url else {}, connect_timeout=10,
                          read_timeout=60, retries={"mode": "standard"}))

    def position(self) -> dict[str, Any]:
        saved = self.pipeline.buffer.get_state(self.state_key)
        return json.loads(saved) if saved else {"after": "", "key": None, "etag": None, "line": 0}

    async def run(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        interval = self.config.interval.total_seconds()
        while True:
            try:
                await self.read_all()
            except (BotoCoreError, ClientError) as exc:
                log.warning("s3 source cannot read; retrying", extra={"pipeline": self.pipeline.name,
                                                                       "error": str(exc)})
            await asyncio.sleep(interval)

    async def read_all(self) -> int:
        """Read every object past the position into the buffer; how many lines were read."""
        position = await asyncio.to_thread(self.position)
        read = 0
        if position["key"] is not None:  # finish the object a restart interrupted
            read += await self.read_object(position["key"], position["etag"], position["line"])
        after = position["key"] or position["after"]
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix, "MaxKeys": PAGE_KEYS}
            if token:
                args["ContinuationToken"] = token
            elif after:
                args["StartAfter"] = after
            page = await asyncio.to_thread(self.client.list_objects_v2, **args)
            for item in page.get("Contents", []):
                read += await self.read_object(item["Key"], None, 0)
            if not page.get("IsTruncated"):
                return read
            token = page["NextContinuationToken"]

    async def read_object(self, key: str, etag: str | None, done: int) -> int:
        """Read ``key`` from line ``done`` (of the object with ``etag``; another ETag is
        another object: from its first line), committing every ``batch`` lines."""
        answer = await asyncio.to_thread(self.client.get_object, Bucket=self.bucket, Key=key)
        if answer["ETag"] != etag:
            etag, done = answer["ETag"], 0
        stream = await asyncio.to_thread(_lines_of, answer["Body"])
        try:
            line_no = read = 0
            while True:
                lines = await asyncio.to_thread(_take, stream, self.config.batch)
                finished = len(lines) < self.config.batch
                records: list[tuple[Any, str]] = []
                rejects: list[Rejected] = []
                for line in lines:
                    line_no += 1
                    if line_no <= done:
                        continue
                    if len(line) > MAX_LINE_BYTES:
                        rejects.append(Rejected(line[:1024].decode("utf-8", "backslashreplace"),
                                                f"line longer than {MAX_LINE_BYTES} bytes; skipped"))
                        continue
                    take_line(line, event_id(self.pipeline.event_source, "s3", self.bucket, key, etag, line_no),
                              records, rejects)
                if line_no > done or finished:
                    mapped = self.pipeline.map(records)
                    mapped.rejected.extend(rejects)
                    state = {"after": key, "key": None, "etag": None, "line": 0} if finished else \
                        {"after": "", "key": key, "etag": etag, "line": line_no}
                    await self.pipeline.offer(mapped, {self.state_key: json.dumps(state)}, block=True)
                    read += len(records)
                if finished:
                    return read
        finally:
            stream.close()


def _lines_of(body: Any) -> IO[bytes]:
    """The object's bytes as a line reader, gunzipped when they are gzip."""
    stream = io.BufferedReader(_Raw(body), 64 * 1024)
    if stream.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=stream)  # type: ignore[return-value]
    return stream


def _take(stream: IO[bytes], count: int) -> list[bytes]:
    """Up to ``count`` lines (without their newline). A line longer than the limit comes
    back as its first MAX_LINE_BYTES + 1 bytes, the rest of it read past."""
    out: list[bytes] = []
    while len(out) < count:
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            break
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := stream.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
        out.append(line.rstrip(b"\r\n"))
    return out


class _Raw(io.RawIOBase):
    """botocore's streaming body as a raw stream (for a buffered, line-limited reader)."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.body.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()
