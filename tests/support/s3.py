"""A small S3 server for the S3 source's tests, following S3's real behaviour where a
client depends on it:

- ListObjectsV2 (``GET /bucket?list-type=2``): keys in UTF-8 binary order, ``prefix``,
  ``start-after``, ``max-keys``, and pages of at most ``page_keys`` keys (S3 returns at
  most 1000 whatever max-keys says; fewer here, so clients must follow
  ``IsTruncated`` / ``NextContinuationToken``, an opaque token);
- GetObject (``GET /bucket/key``): the bytes, ``ETag`` (quoted MD5, as S3 gives for a
  single-part upload), ``NoSuchKey`` / ``NoSuchBucket`` XML errors;
- Signature Version 4, checked from the specification (canonical request, string to
  sign, HMAC signing key) against the one known key pair: an unknown key id answers
  403 ``InvalidAccessKeyId``, a wrong signature 403 ``SignatureDoesNotMatch``.

Path-style addressing only. Objects are put from the test (``put``), not over HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote
from xml.sax.saxutils import escape

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pgmeter.devstack.process import free_port
from tests.support.app import ThreadedServer

ACCESS_KEY = "AKIAPGMETERTEST00001"
SECRET_KEY = "pgmeter-test-secret-key-0123456789abcdef"


class S3Server:
    def __init__(self, page_keys: int = 2) -> None:
        self.page_keys = page_keys
        self.buckets: dict[str, dict[str, tuple[bytes, str, datetime]]] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path?query, status)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedServer(Starlette(routes=[
            Route("/{bucket}", self._bucket, methods=["GET"]),
            Route("/{bucket}/{key:path}", self._object, methods=["GET"])]), "127.0.0.1", self.port)

    def put(self, bucket: str, key: str, body: bytes) -> str:
        etag = f'"{hashlib.md5(body).hexdigest()}"'  # noqa: S324 (S3's ETag is MD5)
        self.buckets.setdefault(bucket, {})[key] = (body, etag, datetime.now(UTC))
        return etag

    def __enter__(self) -> S3Server:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    # -- the API -------------------------------------------------------------------

    async def _bucket(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused:
            return refused
        bucket = request.path_params["bucket"]
        if bucket not in self.buckets:
            return self._error(request, 404, "NoSuchBucket", "The specified bucket does not exist")
        q = request.query_params
        if q.get("list-type") != "2":
            return self._error(request, 400, "InvalidArgument", "only ListObjectsV2 here")
        prefix = q.get("prefix", "")
        max_keys = min(int(q.get("max-keys", "1000")), 1000, self.page_keys)
        token = q.get("continuation-token")
        after = base64.urlsafe_b64decode(token.encode()).decode() if token else q.get("start-after", "")
        keys = sorted((k for k in self.buckets[bucket] if k.startswith(prefix) and k > after),
                      key=lambda k: k.encode())
        page, truncated = keys[:max_keys], len(keys) > max_keys
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><LastModified>{self.buckets[bucket][k][2].isoformat()}</LastModified>"
            f"<ETag>{escape(self.buckets[bucket][k][1])}</ETag><Size>{len(self.buckets[bucket][k][0])}</Size>"
            f"<StorageClass>STANDARD</StorageClass></Contents>" for k in page)
        extra = ""
        if token:
            extra += f"<ContinuationToken>{escape(token)}</ContinuationToken>"
        if truncated:
            extra += f"<NextContinuationToken>{base64.urlsafe_b64encode(page[-1].encode()).decode()}" \
                     "</NextContinuationToken>"
        body = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                f'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>{escape(bucket)}</Name>'
                f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>"
                f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{extra}{contents}</ListBucketResult>")
        return self._answer(request, Response(body, media_type="application/xml"))

    async def _object(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused:
            return refused
        bucket, key = request.path_params["bucket"], request.path_params["key"]
        found = self.buckets.get(bucket, {}).get(key)
        if found is None:
            return self._error(request, 404, "NoSuchKey", "The specified key does not exist.")
        body, etag, modified = found
        return self._answer(request, Response(body, media_type="application/octet-stream", headers={
            "ETag": etag, "Last-Modified": modified.strftime("%a, %d %b %Y %H:%M:%S GMT")}))

    # -- SigV4 ---------------------------------------------------------------------

    def _refused(self, request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        if not header.startswith("AWS4-HMAC-SHA256 "):
            return self._error(request, 403, "AccessDenied", "Access Denied")
        fields = dict(part.strip().split("=", 1) for part in header[len("AWS4-HMAC-SHA256 "):].split(","))
        key_id, date, region, service, _ = fields["Credential"].split("/")
        if key_id != ACCESS_KEY:
            return self._error(request, 403, "InvalidAccessKeyId",
                               "The AWS Access Key Id you provided does not exist in our records.")
        signed = fields["SignedHeaders"].split(";")
        query = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~"))
                       for k, v in parse_qsl(request.url.query, keep_blank_values=True))
        canonical = "\n".join([
            request.method, request.scope["raw_path"].decode(), "&".join(f"{k}={v}" for k, v in query),
            "".join(f"{h}:{' '.join(request.headers.get(h, '').split())}\n" for h in signed),
            fields["SignedHeaders"], request.headers.get("x-amz-content-sha256", "")])
        scope = f"{date}/{region}/{service}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", request.headers.get("x-amz-date", ""), scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + SECRET_KEY).encode()
        for part in (date, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, fields["Signature"]):
            return self._error(request, 403, "SignatureDoesNotMatch",
                               "The request signature we calculated does not match the signature you provided.")
        return None

    def _error(self, request: Request, status: int, code: str, message: str) -> Response:
        body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
        return self._answer(request, Response(body, status_code=status, media_type="application/xml"))

    def _answer(self, request: Request, response: Response) -> Response:
        query = f"?{request.url.query}" if request.url.query else ""
        self.requests.append((request.method, request.url.path + query, response.status_code))
        return response
