"""NATS credentials: pgmeter connects to a nats-server that requires them.

Each test starts its own private nats-server (from the same wheel as the shared
one) with authentication switched on, because the shared server has none: user
and password, a token, or decentralized JWT auth (operator mode), where pgmeter
signs in with a `.creds` file (user JWT + NKey seed) exactly as `nsc` writes it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nkeys
import pytest

from pgmeter.config import ConfigError, NatsConfig, Settings, load_settings
from pgmeter.devstack import binaries
from pgmeter.devstack.process import ManagedProcess, free_port, port_open, wait_until
from pgmeter.runtime import connect_nats
from tests.support.app import AppServer
from tests.support.ingest import make_event, post_events, wait_until_stored

USER = "pgmeter"
PASSWORD = "s3cret-nats-password"
TOKEN = "nats-token-0123456789abcdef"

# Server-side auth flags -> the NatsConfig fields that satisfy them.
AUTH = {
    "user": (["--user", USER, "--pass", PASSWORD], {"user": USER, "password": PASSWORD}),
    "token": (["--auth", TOKEN], {"token": TOKEN}),
}
WRONG = {
    "user": {"user": USER, "password": "not-the-password"},
    "token": {"token": "not-the-token-0123456789"},
}


def _keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(issuer: nkeys.KeyPair, subject: nkeys.KeyPair, name: str, claims: dict[str, object]) -> str:
    """A NATS JWT (v2 claims) signed with the issuer's NKey, as `nsc` would issue it."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = {"jti": secrets.token_hex(16).upper(), "iat": int(time.time()), "iss": issuer.public_key.decode(),
            "sub": subject.public_key.decode(), "name": name, "nats": {**claims, "version": 2}}
    payload = _b64(json.dumps(body).encode())
    return f"{header}.{payload}.{_b64(issuer.sign(f'{header}.{payload}'.encode()))}"


def _creds_file(path: Path, account: nkeys.KeyPair) -> Path:
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    user_jwt = _jwt(account, user, "pgmeter", {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1,
                                               "payload": -1})
    path.write_text(f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
                    f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n")
    return path


def _operator_mode(workdir: Path, port: int) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Server arguments for JWT auth with one JetStream-enabled account, and a creds
    file of a user of that account (right) and of an account the server does not know
    (wrong)."""
    operator, system, account = (_keypair(p) for p in (nkeys.PREFIX_BYTE_OPERATOR, nkeys.PREFIX_BYTE_ACCOUNT,
                                                        nkeys.PREFIX_BYTE_ACCOUNT))
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
                 "conn": -1, "leaf": -1}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    config = workdir / "nats.conf"
    config.write_text(f"""
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{workdir / 'js'}" }}
operator: {_jwt(operator, operator, "op", {"type": "operator"})}
system_account: {system.public_key.decode()}
resolver: MEMORY
resolver_preload: {{
  {account.public_key.decode()}: {_jwt(operator, account, "pgmeter", {"type": "account",
                                                                      "limits": {**unlimited, **jetstream}})}
  {system.public_key.decode()}: {_jwt(operator, system, "SYS", {"type": "account", "limits": unlimited})}
}}
""")
    right = _creds_file(workdir / "pgmeter.creds", account)
    wrong = _creds_file(workdir / "stranger.creds", _keypair(nkeys.PREFIX_BYTE_ACCOUNT))
    return ["-c", str(config)], {"credsFile": str(right)}, {"credsFile": str(wrong)}


@pytest.fixture(params=["user", "token", "creds"])
def secured_nats(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, str], dict[str, str]]]:
    """(url, right credentials, wrong credentials) of a private JetStream server that
    requires credentials of the parametrized kind."""
    kind = request.param
    port = free_port()
    if kind == "creds":
        args, right, wrong = _operator_mode(tmp_path, port)
    else:
        args = ["-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "js"), *AUTH[kind][0]]
        right, wrong = AUTH[kind][1], WRONG[kind]
    proc = ManagedProcess("nats-server", [str(binaries.nats_server()), *args], log_path=tmp_path / "nats.log")
    proc.start()
    try:
        wait_until(lambda: port_open("127.0.0.1", port), timeout=30, what="nats-server", process=proc)
        yield f"nats://127.0.0.1:{port}", right, wrong
    finally:
        proc.stop()


def _with_nats(settings: Settings, url: str, credentials: dict[str, str]) -> Settings:
    settings.nats = NatsConfig(**{**settings.nats.model_dump(by_alias=True), "url": url, **credentials})
    return settings


def test_ingest_works_with_the_right_credentials(settings: Settings,
                                                secured_nats: tuple[str, dict[str, str], dict[str, str]]) -> None:
    url, right, _ = secured_nats
    _with_nats(settings, url, right)
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    with AppServer(settings, {"api", "sink"}) as server, server.client() as client:
        assert client.get("/readyz").status_code == 200
        events = [make_event(subject="tpp-1", time=at) for _ in range(25)]
        assert post_events(client, events).status_code == 204
        assert wait_until_stored(settings.postgres.url, 25) == 25


@pytest.mark.parametrize("credentials", ["wrong", "none"])
def test_wrong_or_missing_credentials_never_connect(settings: Settings,
                                                    secured_nats: tuple[str, dict[str, str], dict[str, str]],
                                                    tmp_path: Path, credentials: str) -> None:
    """The runtime's connection (which every role opens before it serves anything, so
    before /readyz can answer) keeps being refused: the pod never becomes ready."""
    url, _, wrong = secured_nats
    _with_nats(settings, url, wrong if credentials == "wrong" else {})

    log = tmp_path / "nats.log"

    async def attempt() -> None:
        connecting = asyncio.ensure_future(connect_nats(settings.nats.url, **settings.nats.credentials()))
        try:
            # Refused by the server for the credentials (not unreachable)...
            for _ in range(300):
                if "authentication error" in log.read_text():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"nats-server never refused the credentials: {log.read_text()[-500:]}")
            # ...and still not connected: the runtime keeps retrying, the role never starts.
            if connecting.done():
                assert connecting.exception() is not None, "connected with wrong or missing credentials"
        finally:
            connecting.cancel()

    asyncio.run(attempt())


def test_credentials_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("USER", "PASSWORD", "TOKEN", "CREDS_FILE"):
        monkeypatch.delenv(f"PGMETER_NATS_{name}", raising=False)
    config = tmp_path / "pgmeter.yaml"
    config.write_text("nats: {url: 'nats://nats:4222'}\n")

    monkeypatch.setenv("PGMETER_NATS_USER", USER)
    monkeypatch.setenv("PGMETER_NATS_PASSWORD", PASSWORD)
    loaded = load_settings(config)
    assert loaded.nats.credentials() == {"user": USER, "password": PASSWORD}
    assert PASSWORD not in repr(loaded.nats)

    monkeypatch.delenv("PGMETER_NATS_USER")
    monkeypatch.delenv("PGMETER_NATS_PASSWORD")
    monkeypatch.setenv("PGMETER_NATS_TOKEN", TOKEN)
    assert load_settings(config).nats.credentials() == {"token": TOKEN}
    assert TOKEN not in repr(load_settings(config).nats)

    monkeypatch.delenv("PGMETER_NATS_TOKEN")
    monkeypatch.setenv("PGMETER_NATS_CREDS_FILE", "/etc/pgmeter-nats/nats.creds")
    assert load_settings(config).nats.credentials() == {"user_credentials": "/etc/pgmeter-nats/nats.creds"}

    monkeypatch.delenv("PGMETER_NATS_CREDS_FILE")
    assert load_settings(config).nats.credentials() == {}


@pytest.mark.parametrize(("env", "message"), [
    ({"PGMETER_NATS_USER": USER}, "nats.user and nats.password go together"),
    ({"PGMETER_NATS_PASSWORD": PASSWORD}, "nats.user and nats.password go together"),
    ({"PGMETER_NATS_TOKEN": TOKEN, "PGMETER_NATS_CREDS_FILE": "/x.creds"}, "one kind of credentials"),
    ({"PGMETER_NATS_USER": USER, "PGMETER_NATS_PASSWORD": PASSWORD, "PGMETER_NATS_TOKEN": TOKEN},
     "one kind of credentials"),
])
def test_ambiguous_credentials_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           env: dict[str, str], message: str) -> None:
    for name in ("USER", "PASSWORD", "TOKEN", "CREDS_FILE"):
        monkeypatch.delenv(f"PGMETER_NATS_{name}", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "pgmeter.yaml"
    config.write_text("{}\n")
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(config)
    for secret in (PASSWORD, TOKEN):
        assert secret not in str(caught.value)
