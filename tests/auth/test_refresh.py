"""Refresh tokens: rotation, family revocation on reuse, absolute session end, logout, and
immediate refusal of the access tokens of a revoked session."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import timedelta

import httpx
import jwt
from sqlalchemy import select, update

from phivault.audit.models import AuditEvent
from phivault.auth.models import AuthSession, RefreshToken
from phivault.db.base import utcnow
from phivault.runtime import Runtime
from tests.factories import TestUser, signed_in

REFRESH = "/api/v1/auth/refresh"
ME = "/api/v1/me"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_rotation_returns_a_new_pair_and_uses_up_the_old(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    user = await signed_in(runtime)
    first = await client.post(REFRESH, json={"refresh_token": user.refresh_token})
    assert first.status_code == 200
    pair = first.json()
    assert pair["refresh_token"] != user.refresh_token
    assert (await client.get(ME, headers=auth(pair["access_token"]))).status_code == 200
    second = await client.post(REFRESH, json={"refresh_token": pair["refresh_token"]})
    assert second.status_code == 200
    async with runtime.sessions() as session:
        stored = (await session.execute(select(RefreshToken.token_hash).where(
            RefreshToken.user_id == user.id))).scalars().all()
    # Only SHA-256 digests are stored, never the tokens.
    assert hashlib.sha256(user.refresh_token.encode()).digest() in stored
    assert all(len(h) == 32 for h in stored)


async def test_reused_refresh_token_kills_the_family(client: httpx.AsyncClient,
                                                     runtime: Runtime) -> None:
    user = await signed_in(runtime)
    rotated = (await client.post(REFRESH, json={"refresh_token": user.refresh_token})).json()
    # An attacker replays the stolen, already used token.
    replay = await client.post(REFRESH, json={"refresh_token": user.refresh_token})
    assert replay.status_code == 401 and replay.json()["error"] == "invalid_token"
    # Every token of the family is dead now: the rotated refresh token, and both access tokens.
    again = await client.post(REFRESH, json={"refresh_token": rotated["refresh_token"]})
    assert again.status_code == 401
    for token in (user.access_token, rotated["access_token"]):
        assert (await client.get(ME, headers=auth(token))).status_code == 401
    async with runtime.sessions() as session:
        event = (await session.execute(select(AuditEvent).where(
            AuditEvent.request_id == replay.headers["x-request-id"]))).scalar_one()
    assert (event.action, event.outcome, event.actor_id) == (
        "REFRESH_TOKEN_REUSE", "denied", user.id)


async def test_other_sessions_survive_a_reuse(client: httpx.AsyncClient,
                                              runtime: Runtime) -> None:
    user = await signed_in(runtime)
    phone = TestUser(user.id, user.email, user.password, user.role)
    from tests.factories import sign_in

    await sign_in(runtime, phone)
    await client.post(REFRESH, json={"refresh_token": user.refresh_token})
    await client.post(REFRESH, json={"refresh_token": user.refresh_token})
    assert (await client.get(ME, headers=phone.headers)).status_code == 200


async def test_concurrent_uses_of_one_token_cannot_both_win(client: httpx.AsyncClient,
                                                            runtime: Runtime) -> None:
    user = await signed_in(runtime)
    answers = await asyncio.gather(*(client.post(REFRESH, json={
        "refresh_token": user.refresh_token}) for _ in range(4)))
    winners = [a for a in answers if a.status_code == 200]
    assert len(winners) == 1
    assert all(a.status_code == 401 for a in answers if a.status_code != 200)


async def test_rotation_never_extends_the_session(client: httpx.AsyncClient,
                                                  runtime: Runtime) -> None:
    user = await signed_in(runtime)
    sid = jwt.decode(user.access_token, options={"verify_signature": False})["sid"]
    async with runtime.sessions() as session:
        login = (await session.execute(select(AuthSession).where(
            AuthSession.user_id == user.id))).scalar_one()
    assert abs((login.expires_at - login.created_at) - timedelta(days=7)) < timedelta(seconds=1)
    token = user.refresh_token
    for _ in range(3):
        token = (await client.post(REFRESH, json={"refresh_token": token})).json()[
            "refresh_token"]
    async with runtime.sessions() as session:
        ends = (await session.execute(select(RefreshToken.expires_at).where(
            RefreshToken.user_id == user.id))).scalars().all()
        same = (await session.execute(select(AuthSession.expires_at).where(
            AuthSession.id == login.id))).scalar_one()
    assert same == login.expires_at and set(ends) == {login.expires_at}
    assert str(login.id) == sid

    # When the session's end has passed, neither its refresh nor its access tokens work.
    async with runtime.unit_of_work() as session:
        await session.execute(update(AuthSession).where(AuthSession.id == login.id)
                              .values(expires_at=utcnow() - timedelta(seconds=1)))
    assert (await client.post(REFRESH, json={"refresh_token": token})).status_code == 401


async def test_access_token_never_outlives_its_session(runtime: Runtime) -> None:
    end = utcnow() + timedelta(seconds=120)
    token = runtime.access_tokens.issue(uuid.uuid4(), "patient", uuid.uuid4(), not_after=end)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] <= int(end.timestamp())


async def test_logout_revokes_at_once(client: httpx.AsyncClient, runtime: Runtime) -> None:
    user = await signed_in(runtime)
    assert (await client.get(ME, headers=user.headers)).status_code == 200
    out = await client.post("/api/v1/auth/logout", json={"refresh_token": user.refresh_token})
    assert out.status_code == 204 and out.content == b""
    assert (await client.get(ME, headers=user.headers)).status_code == 401
    assert (await client.post(REFRESH, json={
        "refresh_token": user.refresh_token})).status_code == 401
    # Logging out twice, or with a token nobody issued, is a quiet 204.
    for token in (user.refresh_token, "A" * 43):
        assert (await client.post("/api/v1/auth/logout", json={
            "refresh_token": token})).status_code == 204


async def test_garbage_refresh_tokens(client: httpx.AsyncClient) -> None:
    for token in ("A" * 43, "short"):
        response = await client.post(REFRESH, json={"refresh_token": token})
        assert response.status_code in (401, 422)
    assert (await client.post(REFRESH, json={"refresh_token": "x" * 500})).status_code == 422


async def test_refresh_failures_talk_about_the_refresh_token(client: httpx.AsyncClient,
                                                             runtime: Runtime) -> None:
    """An unknown, used (reused: its family ends) or revoked refresh token is the same 401
    `invalid_token`, whose sentence names the refresh token, not the access token; a bad access
    token still says "access token"."""
    user = await signed_in(runtime)
    rotated = (await client.post(REFRESH, json={"refresh_token": user.refresh_token})).json()
    unknown = await client.post(REFRESH, json={"refresh_token": "A" * 43})
    reused = await client.post(REFRESH, json={"refresh_token": user.refresh_token})
    revoked = await client.post(REFRESH, json={"refresh_token": rotated["refresh_token"]})
    for answer in (unknown, reused, revoked):
        body = answer.json()
        assert answer.status_code == 401 and body["error"] == "invalid_token"
        assert "refresh token" in body["detail"] and "access token" not in body["detail"]
    bad_access = await client.get(ME, headers=auth("not-a-token"))
    assert bad_access.status_code == 401 and "access token" in bad_access.json()["detail"]
