"""Lago's webhooks in: settled prepaid credits become grants (``POST /lago/webhooks``).

Signatures, as Lago sends them (``X-Lago-Signature-Algorithm``, ``jwt`` when absent):

- ``jwt``: ``X-Lago-Signature`` is an RS256 JWT of ``{data: <the body>, iss: LAGO_API_URL}``
  signed with Lago's private key; verified with ``lago.webhooks.publicKey`` (and ``iss``
  when ``lago.webhooks.issuer`` is set), and ``data`` must be the body.
- ``hmac``: ``X-Lago-Signature`` is ``base64(HMAC-SHA256(hmacKey, raw body))``,
  compared in constant time.

A request whose signature does not verify is 401 and changes nothing. A verified one
is recorded under its ``X-Lago-Unique-Key`` (table ``lago_webhooks``) in the same
transaction as its effect, so a redelivery or a replay is answered 200 and applied
once. The route lives outside ``/api/`` (Lago sends no bearer token: the signature is
the authentication).

What is applied: ``wallet_transaction.created`` / ``.updated`` of an *inbound*,
*settled* transaction (purchased or granted credits) becomes a grant of
``credit_amount / creditsPerUnit`` on the entitlement of each configured feature of the
wallet's customer (customer key = Lago ``external_customer_id``), effective now (or
at settlement, if that is later than the current period start), rolling its remainder
over at resets. One grant per transaction whichever webhook brings it. A settled
*outbound* ``voided`` transaction (Lago's void of credits from the wallet) takes as many
units from what is left of that wallet's grants; a ``failed`` one voids the grants its
transaction became. Everything
else (``wallet.depleted_ongoing_balance`` included: pgmeter's own balance is the
real-time one) is recorded and acknowledged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgmeter.api.meters import runtime_of
from pgmeter.api.problems import Problem, bad_request
from pgmeter.config import LagoCredits, LagoWebhooksConfig
from pgmeter.entitlements import service, store
from pgmeter.entitlements.api.shapes import storable
from pgmeter.entitlements.balance import Timeline
from pgmeter.entitlements.periods import floor_minute

log = logging.getLogger(__name__)

MAX_UNIQUE_KEY = 255
VOIDED = "voided"  # the outcome of an applied void begins with it (what makes a void apply once)


class BadSignature(Exception):
    pass


def _public_key(text: str) -> str:
    """PEM as given, or the base64 of a PEM (Lago's ``/webhooks/public_key`` answer)."""
    if "BEGIN" in text:
        return text
    try:
        return base64.b64decode(text, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise BadSignature("lago.webhooks.publicKey is neither PEM nor base64 PEM") from None


def verify(config: LagoWebhooksConfig, body: bytes, algorithm: str | None, signature: str | None) -> None:
    """Raise :class:`BadSignature` unless ``signature`` is Lago's for ``body``."""
    if not signature:
        raise BadSignature("X-Lago-Signature is missing")
    algorithm = (algorithm or "jwt").lower()
    if algorithm == "hmac":
        if not config.hmac_key:
            raise BadSignature("hmac signatures are not configured (lago.webhooks.hmacKey)")
        expected = base64.b64encode(hmac.new(config.hmac_key.encode(), body, hashlib.sha256).digest()).decode()
        if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
            raise BadSignature("the HMAC signature does not match the body")
        return
    if algorithm != "jwt":
        raise BadSignature(f"unknown X-Lago-Signature-Algorithm {algorithm[:20]!r}")
    if not config.public_key:
        raise BadSignature("jwt signatures are not configured (lago.webhooks.publicKey)")
    try:
        claims = jwt.decode(signature.strip(), _public_key(config.public_key), algorithms=["RS256"],
                            issuer=config.issuer, options={"require": ["data"], "verify_iss": config.issuer is not None})
    except jwt.PyJWTError as exc:
        raise BadSignature(f"the JWT signature does not verify: {exc}") from None
    data = claims.get("data")
    try:
        same = isinstance(data, str) and (data.encode() == body or json.loads(data) == json.loads(body))
    except ValueError:
        same = False
    if not same:
        raise BadSignature("the JWT's data is not the body")


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"body larger than {limit} bytes (lago.webhooks.maxBodyBytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _decimal(value: Any, field: str) -> Decimal:
    try:
        found = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise bad_request(f"{field} is not a number", field=field) from None
    if not found.is_finite() or found < 0 or found > Decimal("1e15"):
        raise bad_request(f"{field} must be a number between 0 and 1e15", field=field)
    return found


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo else None


async def _targets(conn: Any, config: LagoWebhooksConfig, tx: dict[str, Any],
                   ) -> tuple[str | None, list[tuple[LagoCredits, store.Entitlement]]]:
    """The metered entitlements a wallet transaction's credits map to, or why there are none."""
    found = tx.get("wallet")
    wallet: dict[str, Any] = found if isinstance(found, dict) else {}
    customer_key = wallet.get("external_customer_id") or tx.get("external_customer_id")
    if not isinstance(customer_key, str) or not customer_key or not storable(customer_key):
        raise bad_request("wallet_transaction.wallet.external_customer_id is missing or not text",
                          field="external_customer_id")
    customer = await store.customer_by_key(conn, config.namespace, customer_key[:256])
    if customer is None:
        return f"no customer with key {customer_key[:256]!r}", []
    now = datetime.now(UTC)
    targets = []
    for mapping in config.credits:
        if mapping.wallet_code is not None and wallet.get("code") != mapping.wallet_code:
            continue
        ent = await store.entitlement_for_feature_at(conn, config.namespace, customer.id, mapping.feature, now)
        if ent is not None and ent.type == "metered":
            targets.append((mapping, ent))
    return (None if targets else "no entitlement of a mapped feature"), targets


def _wallet_id(tx: dict[str, Any]) -> str:
    wallet = tx.get("wallet")
    return str(tx.get("lago_wallet_id") or (wallet.get("lago_id") if isinstance(wallet, dict) else None))[:64]


async def _grant_credits(conn: Any, config: LagoWebhooksConfig, tx: dict[str, Any]) -> tuple[str, list[str]]:
    """Grants for one settled inbound transaction; (outcome, grant ids)."""
    credits = _decimal(tx.get("credit_amount"), "wallet_transaction.credit_amount")
    problem, targets = await _targets(conn, config, tx)
    if problem is not None:
        return problem, []
    now = datetime.now(UTC)
    settled = _time(tx.get("settled_at")) or now
    grants = []
    for mapping, ent in targets:
        amount = credits / mapping.credits_per_unit
        period_start = Timeline.of(ent, await store.resets_of(conn, ent.id)).period_at(now)[0]
        effective = max(floor_minute(min(settled, now)), period_start)
        grant = await service.create_grant(conn, ent, service.GrantInput(
            amount=amount, priority=1, effective_at=effective, expiration_duration=None, expiration_count=None,
            min_rollover=Decimal(0), max_rollover=amount, recurrence_interval=None, recurrence_anchor=None,
            metadata={k: v for k, v in (("lagoWalletTransactionId", str(tx.get("lago_id"))[:64]),
                                        ("lagoWalletId", _wallet_id(tx))) if storable(v)}))
        grants.append(grant.id)
    return "granted", grants


async def _void_credits(conn: Any, config: LagoWebhooksConfig, tx: dict[str, Any]) -> tuple[str, list[str]]:
    """A settled outbound ``voided`` transaction: Lago took ``credit_amount`` credits out of the
    wallet (not out of one top-up), so as many units go from what is left of the grants that
    wallet's credits became, newest first (:func:`service.void_units`)."""
    credits = _decimal(tx.get("credit_amount"), "wallet_transaction.credit_amount")
    problem, targets = await _targets(conn, config, tx)
    if problem is not None:
        return problem, []
    wallet_id = _wallet_id(tx)
    taken, replacements = [], []
    for mapping, ent in targets:
        units, kept = await service.void_units(
            conn, ent, lambda g: (g.metadata or {}).get("lagoWalletId") == wallet_id, credits / mapping.credits_per_unit)
        taken.append(f"{mapping.feature} {units}")
        replacements.extend(kept)
    return f"{VOIDED}: {', '.join(taken)}", replacements


async def _void_failed(conn: Any, config: LagoWebhooksConfig, tx: dict[str, Any], object_id: str) -> str:
    """A failed transaction: the grants it became (if it had settled before) are voided whole."""
    problem, targets = await _targets(conn, config, tx)
    if problem is not None:
        return problem
    units = Decimal(0)
    for _mapping, ent in targets:
        taken, _ = await service.void_units(
            conn, ent, lambda g: (g.metadata or {}).get("lagoWalletTransactionId") == object_id, Decimal("Infinity"))
        units += taken
    return f"failed: {units} units of its grants voided"


async def _seen(conn: Any, namespace: str, object_id: str, outcome_like: str) -> bool:
    """Whether a webhook of this transaction was already applied with such an outcome."""
    return bool(await conn.fetchval(
        "SELECT 1 FROM lago_webhooks WHERE namespace = $1 AND object_id = $2 AND outcome LIKE $3",
        namespace, object_id, outcome_like))


async def receive(request: Request) -> Response:
    runtime = runtime_of(request)
    config = runtime.settings.lago.webhooks
    if not config.enabled:
        raise Problem(404, "the Lago webhook receiver is not configured (lago.webhooks)")
    body = await _read_body(request, config.max_body_bytes)
    try:
        verify(config, body, request.headers.get("x-lago-signature-algorithm"),
               request.headers.get("x-lago-signature"))
    except BadSignature as exc:
        log.warning("lago webhook refused", extra={"reason": str(exc)})
        raise Problem(401, str(exc)) from None
    unique_key = request.headers.get("x-lago-unique-key")
    if not unique_key or len(unique_key) > MAX_UNIQUE_KEY or "\x00" in unique_key:
        raise bad_request(f"X-Lago-Unique-Key must be 1 to {MAX_UNIQUE_KEY} characters", field="X-Lago-Unique-Key")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise bad_request("body is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("webhook_type"), str) \
            or not storable(payload["webhook_type"]):
        raise bad_request("body must be an object with webhook_type", field="webhook_type")
    kind = payload["webhook_type"][:64]
    tx = payload.get("wallet_transaction")
    object_id = str(tx.get("lago_id"))[:64] if isinstance(tx, dict) and tx.get("lago_id") else None
    if object_id is not None and not storable(object_id):
        raise bad_request("wallet_transaction.lago_id is not text", field="wallet_transaction.lago_id")
    async with runtime.api_pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"pgmeter.lago-webhook:{config.namespace}")
        seen = await conn.fetchval("SELECT outcome FROM lago_webhooks WHERE namespace = $1 AND unique_key = $2",
                                   config.namespace, unique_key)
        if seen is not None:
            return JSONResponse({"duplicate": True, "outcome": seen})
        outcome, grants = "ignored", list[str]()
        if kind in ("wallet_transaction.created", "wallet_transaction.updated") and isinstance(tx, dict):
            status, direction, reason = tx.get("status"), tx.get("transaction_type"), tx.get("transaction_status")
            try:
                if status == "settled" and direction == "outbound" and reason == "voided":
                    if object_id is not None and await _seen(conn, config.namespace, object_id, f"{VOIDED}%"):
                        outcome = "already voided"
                    else:
                        outcome, grants = await _void_credits(conn, config, tx)
                elif status == "failed" and direction == "inbound" and object_id is not None:
                    outcome = await _void_failed(conn, config, tx, object_id)
                elif status != "settled" or direction != "inbound" or reason not in ("purchased", "granted"):
                    outcome = f"not a settled inbound credit ({status!s:.20}/{direction!s:.20}/{reason!s:.20})"
                elif object_id is not None and await conn.fetchval(
                        "SELECT 1 FROM lago_webhooks WHERE namespace = $1 AND object_id = $2 AND grant_id IS NOT NULL",
                        config.namespace, object_id):
                    outcome = "already granted"
                elif object_id is not None and await _seen(conn, config.namespace, object_id, "failed%"):
                    outcome = "failed before; not granted"
                else:
                    outcome, grants = await _grant_credits(conn, config, tx)
            except service.Refused as exc:
                outcome = f"refused: {exc.detail}"
        elif kind == "wallet.depleted_ongoing_balance":
            outcome = "noted (pgmeter's balance is the real-time one)"
        await conn.execute(
            "INSERT INTO lago_webhooks (namespace, unique_key, webhook_type, object_id, grant_id, outcome) "
            "VALUES ($1, $2, $3, $4, $5, $6)", config.namespace, unique_key, kind, object_id,
            grants[0] if grants else None, outcome)
    return JSONResponse({"duplicate": False, "outcome": outcome, "grants": grants})


routes = [Route("/lago/webhooks", receive, methods=["POST"])]
