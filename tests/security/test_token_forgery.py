"""Forged, edited, expired and misdirected access tokens are refused with 401 invalid_token."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.runtime import Runtime
from tests.factories import signed_in

URL = "/api/v1/audit/verify"


# The genuine claims of a signed-in auditor, so that each forgery below is refused for what it
# changes and not because its user or session does not exist.
GENUINE: dict[str, object] = {}


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": "phivault", "aud": "phivault-api", "sub": GENUINE["sub"], "role": "auditor",
        "sid": GENUINE["sid"], "iat": now, "exp": now + 600, "jti": "j" * 22,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.fixture(autouse=True)
async def genuine_auditor(runtime: Runtime) -> None:
    auditor = await signed_in(runtime, "auditor")
    GENUINE.update(jwt.decode(auditor.access_token, options={"verify_signature": False}))


def _sign(runtime: Runtime, claims: dict[str, object], **header: str) -> str:
    key = runtime.settings.signing_keys[0]
    headers = {"kid": key.kid, "typ": "at+jwt", **header}
    return jwt.encode(claims, key.private_key, algorithm="EdDSA", headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(runtime: Runtime) -> str:
    header = {"alg": "none", "typ": "at+jwt", "kid": runtime.settings.signing_keys[0].kid}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}."


def _hs256_with_public_key(runtime: Runtime) -> str:
    """The classic algorithm-confusion attack: HMAC keyed with the server's public key."""
    public = runtime.settings.signing_keys[0].public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    header = {"alg": "HS256", "typ": "at+jwt", "kid": runtime.settings.signing_keys[0].kid}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    import hashlib
    import hmac

    signature = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _other_key(runtime: Runtime) -> str:
    other = ed25519.Ed25519PrivateKey.generate()
    return jwt.encode(_claims(), other, algorithm="EdDSA",
                      headers={"kid": runtime.settings.signing_keys[0].kid, "typ": "at+jwt"})


def _edited(runtime: Runtime) -> str:
    token = _sign(runtime, _claims(role="patient"))
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["role"] = "auditor"
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


def _bad_signature(runtime: Runtime) -> str:
    token = _sign(runtime, _claims())
    header, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[0] ^= 1
    return f"{header}.{payload}.{_b64(bytes(raw))}"


FORGERIES: dict[str, Callable[[Runtime], str]] = {
    "alg none": _unsigned,
    "HS256 keyed with the public key": _hs256_with_public_key,
    "another key": _other_key,
    "edited claims": _edited,
    "bad signature": _bad_signature,
    "wrong audience": lambda rt: _sign(rt, _claims(aud="another-api")),
    "wrong issuer": lambda rt: _sign(rt, _claims(iss="someone-else")),
    "expired": lambda rt: _sign(rt, _claims(iat=int(time.time()) - 2000,
                                            exp=int(time.time()) - 60)),
    "no exp": lambda rt: _sign(rt, _claims(exp=None)),
    "no sid": lambda rt: _sign(rt, _claims(sid=None)),
    "unknown role": lambda rt: _sign(rt, _claims(role="superuser")),
    "sub not a uuid": lambda rt: _sign(rt, _claims(sub="admin")),
    "wrong typ": lambda rt: _sign(rt, _claims(), typ="JWT"),
    "unknown kid": lambda rt: _sign(rt, _claims(), kid="nope"),
    "unknown session": lambda rt: _sign(rt, _claims(sid=str(uuid.uuid4()))),
    "another user's session": lambda rt: _sign(rt, _claims(sub=str(uuid.uuid4()))),
    "role not the user's": lambda rt: _sign(rt, _claims(role="admin")),
    "garbage": lambda rt: "not-a-token",
    "empty segments": lambda rt: "..",
    "huge": lambda rt: "a" * 10_000,
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
async def test_forged_tokens_are_refused(client: httpx.AsyncClient, runtime: Runtime,
                                         name: str) -> None:
    token = FORGERIES[name](runtime)
    response = await client.get(URL, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401, name
    assert response.json()["error"] == "invalid_token"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_genuine_token_is_accepted(client: httpx.AsyncClient, runtime: Runtime) -> None:
    response = await client.get(URL, headers={
        "Authorization": f"Bearer {_sign(runtime, _claims())}"})
    assert response.status_code == 200
    assert response.json()["ok"] is True


async def test_missing_or_non_bearer_credentials(client: httpx.AsyncClient) -> None:
    assert (await client.get(URL)).json()["error"] == "unauthenticated"
    response = await client.get(URL, headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
    assert response.status_code == 401


@pytest.mark.parametrize("role", ["patient", "doctor", "admin"])
async def test_wrong_role_is_403_and_audited(client: httpx.AsyncClient, runtime: Runtime,
                                             role: str) -> None:
    user = await signed_in(runtime, role)
    response = await client.get(URL, headers=user.headers)
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"
    async with runtime.sessions() as session:
        event = (await session.execute(select(AuditEvent).where(
            AuditEvent.request_id == response.headers["x-request-id"]))).scalar_one()
    assert (event.action, event.outcome, event.actor_id, event.actor_role) == (
        "ACCESS_DENIED", "denied", user.id, role)


async def test_auditor_verify_is_audited(client: httpx.AsyncClient, runtime: Runtime) -> None:
    user = await signed_in(runtime, "auditor")
    response = await client.get(URL, headers=user.headers)
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True and body["first_bad_seq"] is None and body["events"] >= 0
    async with runtime.sessions() as session:
        event = (await session.execute(select(AuditEvent).where(
            AuditEvent.request_id == response.headers["x-request-id"]))).scalar_one()
    assert (event.action, event.actor_id, event.ip) == ("VERIFY_AUDIT_CHAIN", user.id,
                                                        "203.0.113.7")
