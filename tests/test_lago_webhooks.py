"""Lago's wallet webhooks in (pgmeter.credits.webhooks): signed both ways, replayed, tampered, duplicated.

The RSA key pair and the HMAC token are made here; payloads follow Lago's shapes
(reference: collector-and-lago-billing.md B3: ``{webhook_type, object_type,
organization_id, wallet_transaction: {..., wallet: {...}}}``). Grants land on the
customer's entitlement and, through the quota worker, in the Valkey balance.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import jwt
import psycopg
import pytest
import valkey
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pgmeter.config import LagoCredits, LagoWebhooksConfig, Settings
from pgmeter.quota import layout
from tests.support.app import AppServer
from tests.support.ingest import make_event, post_events, wait_until_stored

METER = {"slug": "api_calls", "aggregation": "SUM", "eventType": "api.call", "valueProperty": "$.n"}
HMAC_KEY = "hmac-token-" + uuid.uuid4().hex
ISSUER = "https://lago.example.test"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture
def server(settings: Settings, rsa_key: rsa.RSAPrivateKey) -> Iterator[tuple[httpx.Client, Settings]]:
    # The key as Lago's GET /api/v1/webhooks/public_key serves it: base64 of the PEM.
    hooks = LagoWebhooksConfig.model_validate({
        "publicKey": base64.b64encode(public_pem(rsa_key).encode()).decode(), "hmacKey": HMAC_KEY,
        "issuer": ISSUER, "credits": [{"feature": "calls", "creditsPerUnit": "0.5"}]})
    assert hooks.credits == [LagoCredits(feature="calls", creditsPerUnit=Decimal("0.5"))]
    lago = settings.lago.model_copy(update={"webhooks": hooks})
    built = settings.model_copy(update={"meters": [METER], "lago": lago})
    with AppServer(built, {"api", "sink"}) as app, app.client() as client:
        assert client.post("/api/v1/features", json={"key": "calls", "name": "calls",
                                                     "meterSlug": "api_calls"}).status_code == 201
        assert client.post("/api/v1/customers", json={"name": "TPP", "key": "tpp-9",
                                                      "usageAttribution": {"subjectKeys": ["tpp-9"]}}).status_code == 201
        assert client.post("/api/v2/customers/tpp-9/entitlements", json={
            "type": "metered", "featureKey": "calls", "usagePeriod": {"interval": "MONTH"}}).status_code == 201
        yield client, built


def wallet_transaction(kind: str, tx_id: str, *, status: str = "settled", credits: str = "21.0",
                       reason: str = "purchased", direction: str = "inbound") -> bytes:
    payload = {
        "webhook_type": kind, "object_type": "wallet_transaction", "organization_id": str(uuid.uuid4()),
        "wallet_transaction": {
            "lago_id": tx_id, "lago_wallet_id": "w-1", "status": status, "transaction_status": reason,
            "transaction_type": direction, "source": "manual", "amount": credits, "credit_amount": credits,
            "settled_at": datetime.now(UTC).isoformat() if status == "settled" else None,
            "failed_at": datetime.now(UTC).isoformat() if status == "failed" else None,
            "created_at": datetime.now(UTC).isoformat(),
            "wallet": {"lago_id": "w-1", "code": "prepaid", "external_customer_id": "tpp-9", "rate_amount": "1.0",
                       "currency": "EUR", "credits_ongoing_balance": "21.0"}}}
    return json.dumps(payload).encode()


def jwt_headers(key: rsa.RSAPrivateKey, body: bytes, unique: str, issuer: str = ISSUER) -> dict[str, str]:
    token = jwt.encode({"data": body.decode(), "iss": issuer}, key, algorithm="RS256")
    return {"X-Lago-Signature": token, "X-Lago-Signature-Algorithm": "jwt", "X-Lago-Unique-Key": unique,
            "content-type": "application/json"}


def hmac_headers(body: bytes, unique: str, secret: str = HMAC_KEY) -> dict[str, str]:
    signature = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return {"X-Lago-Signature": signature, "X-Lago-Signature-Algorithm": "hmac", "X-Lago-Unique-Key": unique,
            "content-type": "application/json"}


def grants(url: str) -> list[tuple[Decimal, Any]]:
    with psycopg.connect(url) as conn:
        return [(row[0], row[1]) for row in conn.execute(
            "SELECT amount, metadata->>'lagoWalletTransactionId' FROM grants ORDER BY created_at").fetchall()]


def deliveries(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM lago_webhooks").fetchone()
    assert row is not None
    return int(row[0])


def valkey_quota_when(settings: Settings, ready: Callable[[layout.Quota], bool]) -> layout.Quota:
    """tpp-9's hash in Valkey once ``ready`` holds for it (the quota worker follows grants)."""
    vk = valkey.Valkey.from_url(settings.valkey.url)
    try:
        key = layout.subject_key(settings.valkey.key_prefix, "default", "tpp-9", "calls")
        deadline = time.monotonic() + 30
        while ((q := layout.Quota.parse(vk.hgetall(key))) is None or not ready(q)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert q is not None and ready(q), q
        return q
    finally:
        vk.close()


def test_signed_credits_become_one_grant_each(server: tuple[httpx.Client, Settings],
                                              rsa_key: rsa.RSAPrivateKey) -> None:
    client, settings = server
    url = settings.postgres.url

    # JWT (Lago's default): 21 credits at 0.5 credits per call = 42 calls.
    body = wallet_transaction("wallet_transaction.created", "tx-1")
    response = client.post("/lago/webhooks", content=body, headers=jwt_headers(rsa_key, body, "u-1"))
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "granted"
    assert grants(url) == [(Decimal(42), "tx-1")]

    # Replayed (same unique key): 200, nothing new.
    again = client.post("/lago/webhooks", content=body, headers=jwt_headers(rsa_key, body, "u-1"))
    assert again.status_code == 200 and again.json() == {"duplicate": True, "outcome": "granted"}
    # The same transaction again under another unique key (its .updated webhook): no second grant.
    updated = wallet_transaction("wallet_transaction.updated", "tx-1")
    response = client.post("/lago/webhooks", content=updated, headers=hmac_headers(updated, "u-2"))
    assert response.status_code == 200 and response.json()["outcome"] == "already granted"
    assert len(grants(url)) == 1

    # A pending purchase grants nothing; its settlement (HMAC-signed) does.
    pending = wallet_transaction("wallet_transaction.created", "tx-2", status="pending", credits="5")
    assert client.post("/lago/webhooks", content=pending,
                       headers=hmac_headers(pending, "u-3")).json()["outcome"].startswith("not a settled")
    settled = wallet_transaction("wallet_transaction.updated", "tx-2", credits="5")
    response = client.post("/lago/webhooks", content=settled, headers=hmac_headers(settled, "u-4"))
    assert response.status_code == 200 and response.json()["outcome"] == "granted"
    assert grants(url) == [(Decimal(42), "tx-1"), (Decimal(10), "tx-2")]

    # A depleted ongoing balance is acknowledged and recorded.
    depleted = json.dumps({"webhook_type": "wallet.depleted_ongoing_balance", "object_type": "wallet",
                           "wallet": {"lago_id": "w-1", "external_customer_id": "tpp-9"}}).encode()
    assert client.post("/lago/webhooks", content=depleted, headers=hmac_headers(depleted, "u-5")).status_code == 200

    # The credits reach the Valkey balance through the quota worker.
    q = valkey_quota_when(settings, lambda q: q.balance == 52)
    assert q.has_access


def test_bad_signatures_are_401_and_change_nothing(server: tuple[httpx.Client, Settings],
                                                   rsa_key: rsa.RSAPrivateKey) -> None:
    client, settings = server
    url = settings.postgres.url
    body = wallet_transaction("wallet_transaction.created", "tx-9")
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tampered = body.replace(b'"credit_amount": "21.0"', b'"credit_amount": "2100.0"')
    assert tampered != body
    refused = [
        # tampered body under the original signatures
        (tampered, jwt_headers(rsa_key, body, "b-1")),
        (tampered, hmac_headers(body, "b-2")),
        # signed by someone else / with another token / for another issuer
        (body, jwt_headers(other_key, body, "b-3")),
        (body, hmac_headers(body, "b-4", secret="not-the-token")),
        (body, jwt_headers(rsa_key, body, "b-5", issuer="https://evil.test")),
        # no signature, an unknown algorithm, an HS256 token
        (body, {"X-Lago-Unique-Key": "b-6"}),
        (body, {**hmac_headers(body, "b-7"), "X-Lago-Signature-Algorithm": "md5"}),
        (body, {**jwt_headers(rsa_key, body, "b-8"),
                "X-Lago-Signature": jwt.encode({"data": body.decode(), "iss": ISSUER}, HMAC_KEY, algorithm="HS256")}),
    ]
    for content, headers in refused:
        response = client.post("/lago/webhooks", content=content, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    assert grants(url) == [] and deliveries(url) == 0
    # The genuine one still applies after all of that (and only once).
    ok = client.post("/lago/webhooks", content=body, headers=jwt_headers(rsa_key, body, "b-1"))
    assert ok.status_code == 200 and ok.json()["outcome"] == "granted"
    assert grants(url) == [(Decimal(42), "tx-9")] and deliveries(url) == 1
    # A signed request without a unique key is refused at the door, naming the header.
    missing = client.post("/lago/webhooks", content=body, headers={
        k: v for k, v in hmac_headers(body, "x").items() if k != "X-Lago-Unique-Key"})
    assert missing.status_code == 400 and "X-Lago-Unique-Key" in missing.text


def value_now(client: httpx.Client) -> dict[str, Any]:
    """The engine's exact value (a value at a time never comes from Valkey)."""
    response = client.get("/api/v2/customers/tpp-9/entitlements/calls/value",
                          params={"time": datetime.now(UTC).isoformat()})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def left_of(url: str, value: dict[str, Any], tx_id: str) -> Decimal:
    """What is left of the grants one wallet transaction became (the value's grantBalances)."""
    with psycopg.connect(url) as conn:
        ids = {row[0] for row in conn.execute(
            "SELECT id FROM grants WHERE metadata->>'lagoWalletTransactionId' = %s", (tx_id,)).fetchall()}
    return sum((Decimal(str(v)) for k, v in value["grantBalances"].items() if k in ids), Decimal(0))


def test_voided_and_failed_credits_take_back_their_grants(server: tuple[httpx.Client, Settings],
                                                         rsa_key: rsa.RSAPrivateKey) -> None:
    """Lago voids credits with a settled outbound ``voided`` transaction of the wallet (an
    amount, not a top-up); a paid top-up whose payment fails is ``failed``."""
    client, settings = server
    url = settings.postgres.url

    def send(body: bytes, unique: str, signed: str = "jwt") -> dict[str, Any]:
        headers = jwt_headers(rsa_key, body, unique) if signed == "jwt" else hmac_headers(body, unique)
        response = client.post("/lago/webhooks", content=body, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    # 21 + 5 credits at 0.5 per call: 42 + 10 calls; 12 of them used.
    assert send(wallet_transaction("wallet_transaction.created", "tx-1"), "v-1")["outcome"] == "granted"
    assert send(wallet_transaction("wallet_transaction.created", "tx-2", credits="5", reason="granted"), "v-2",
                "hmac")["outcome"] == "granted"
    assert post_events(client, [make_event(subject="tpp-9", data={"n": 3}) for _ in range(4)]).status_code == 204
    wait_until_stored(url, 4)
    before = value_now(client)
    assert before["balance"] == 40 and before["usage"] == 12

    # Voiding 10 credits (20 calls) takes 20 from what is left, exactly, whichever grants hold it.
    void = wallet_transaction("wallet_transaction.created", "tx-void-1", credits="10", reason="voided",
                              direction="outbound")
    outcome = send(void, "v-3")
    assert outcome["outcome"].startswith("voided") and len(outcome["grants"]) <= 1
    after = value_now(client)
    assert after["balance"] == before["balance"] - 20 and after["usage"] == 12
    # Replayed, or the same void under another unique key: applied once.
    assert send(void, "v-3")["duplicate"] is True
    updated = wallet_transaction("wallet_transaction.updated", "tx-void-1", credits="10", reason="voided",
                                 direction="outbound")
    assert send(updated, "v-4", "hmac")["outcome"] == "already voided"
    assert value_now(client)["balance"] == 20

    # A top-up that failed after it was granted: what is left of its grants goes, whole.
    current = value_now(client)
    tx2_left = left_of(url, current, "tx-2")
    failed = wallet_transaction("wallet_transaction.updated", "tx-2", status="failed", credits="5")
    assert send(failed, "v-5")["outcome"].startswith("failed")
    assert value_now(client)["balance"] == current["balance"] - tx2_left
    assert send(failed, "v-6", "hmac")["outcome"].startswith("failed")  # again: nothing more to take
    assert value_now(client)["balance"] == current["balance"] - tx2_left
    # A failed pending purchase was never granted, and its settlement would not be either.
    assert send(wallet_transaction("wallet_transaction.updated", "tx-3", status="failed", credits="8"),
                "v-7")["outcome"] == "failed: 0 units of its grants voided"
    assert send(wallet_transaction("wallet_transaction.updated", "tx-3", credits="8"), "v-8")["outcome"] == \
        "failed before; not granted"

    # Voiding more than is left leaves nothing (and never a negative grant).
    rest = value_now(client)["balance"]
    big = wallet_transaction("wallet_transaction.created", "tx-void-2", credits="1000", reason="voided",
                             direction="outbound")
    assert send(big, "v-9")["outcome"] == f"voided: calls {Decimal(rest)}"
    final = value_now(client)
    assert final["balance"] == 0 and not final["hasAccess"] and final["usage"] == 12

    # The Valkey balance follows (the grant triggers notify the quota worker).
    assert not valkey_quota_when(settings, lambda q: q.balance == 0).has_access


def test_expired_is_not_required_but_times_are_bounded() -> None:
    """Lago's JWTs carry no exp: the receiver must not require one (PyJWT does not by default)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    config = LagoWebhooksConfig.model_validate({"publicKey": public_pem(key)})
    from pgmeter.credits.webhooks import BadSignature, verify

    body = b'{"webhook_type": "wallet.updated"}'
    verify(config, body, None, jwt.encode({"data": body.decode(), "iss": "x"}, key, algorithm="RS256"))
    expired = jwt.encode({"data": body.decode(), "exp": datetime.now(UTC) - timedelta(minutes=1)}, key,
                         algorithm="RS256")
    with pytest.raises(BadSignature):
        verify(config, body, "jwt", expired)
