"""Compact JSON encoding without the per-call setup of ``json.dumps``.

``json.dumps`` (and ``JSONEncoder.encode``) builds a new C encoder object on every
call. For the small objects of ingest (one event's ``data``, one event's wire
fragment) that setup is about 40% of the cost, so the C encoder is built once here
and reused. It is CPython's private ``c_make_encoder``: if it is missing or behaves
differently (another interpreter or version), the stdlib encoder is used instead.

Output: no spaces, non-ASCII kept as is (UTF-8 is encoded by the caller), NaN and
infinities refused with ``ValueError`` (JSON and jsonb have no such numbers).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

_FALLBACK = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _build() -> Callable[[Any], str]:
    try:
        from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]

        if c_make_encoder is None:
            return _FALLBACK.encode
        # markers=None: no circular-reference check (our inputs come from json.loads).
        encoder = c_make_encoder(None, None, encode_basestring, None, ":", ",", False, False, False)

        def encode(value: Any) -> str:
            return "".join(encoder(value, 0))

        # Refuse to use it unless it agrees with the stdlib on a representative value.
        sample = {"a": [1, 2.5, None, True, "é\"\\\n"], "b": {"c": -0.0, "d": 10**30}}
        if encode(sample) != _FALLBACK.encode(sample):
            return _FALLBACK.encode
        try:
            encode({"x": float("nan")})
        except ValueError:
            return encode
        return _FALLBACK.encode
    except Exception:  # any surprise: the slow, sure path
        return _FALLBACK.encode


dumps: Callable[[Any], str] = _build()
