"""Login: tokens of the right shape, identical failures, lock-out, per-IP limits, re-hashing."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import bcrypt
import httpx
import jwt
import pytest
from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.auth.models import User
from phivault.auth.service import email_lookup
from phivault.runtime import Runtime
from tests.conftest import CLIENT_IP, client_for
from tests.factories import PASSWORD, make_user, new_email

LOGIN = "/api/v1/auth/login"


async def _events(rt: Runtime, request_id: str) -> list[AuditEvent]:
    async with rt.sessions() as session:
        return list((await session.execute(select(AuditEvent).where(
            AuditEvent.request_id == request_id).order_by(AuditEvent.seq))).scalars())


async def test_login_answers_a_token_pair(client: httpx.AsyncClient, runtime: Runtime) -> None:
    user = await make_user(runtime, "doctor")
    response = await client.post(LOGIN, json={"email": user.email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    pair = response.json()
    assert set(pair) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert pair["token_type"] == "bearer" and pair["expires_in"] == 900
    assert response.headers["cache-control"] == "no-store"
    header = jwt.get_unverified_header(pair["access_token"])
    assert header["alg"] == "EdDSA" and header["typ"] == "at+jwt"
    assert header["kid"] == runtime.settings.signing_keys[0].kid
    claims = jwt.decode(pair["access_token"], options={"verify_signature": False})
    assert set(claims) == {"sub", "role", "sid", "iat", "exp", "jti", "iss", "aud"}
    assert claims["sub"] == str(user.id) and claims["role"] == "doctor"
    assert claims["iss"] == "phivault" and claims["aud"] == "phivault-api"
    assert claims["exp"] - claims["iat"] == 900
    assert len(pair["refresh_token"]) >= 43  # 256 bits, base64url
    (event,) = await _events(runtime, response.headers["x-request-id"])
    assert (event.action, event.actor_id, event.ip, event.user_agent) == (
        "LOGIN_SUCCESS", user.id, CLIENT_IP, "phivault-tests/1")


async def test_unknown_email_and_wrong_password_answer_alike(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    user = await make_user(runtime)
    wrong = await client.post(LOGIN, json={"email": user.email, "password": PASSWORD + "x"})
    unknown = await client.post(LOGIN, json={"email": new_email(), "password": PASSWORD})
    for response in (wrong, unknown):
        assert response.status_code == 401
        assert response.json() == {"error": "invalid_credentials",
                                   "detail": "The email, password or code is wrong."}
    (event,) = await _events(runtime, wrong.headers["x-request-id"])
    assert (event.action, event.outcome, event.actor_id) == ("LOGIN_FAILURE", "denied", user.id)
    assert event.event_metadata == {"reason": "bad_password"}
    (event,) = await _events(runtime, unknown.headers["x-request-id"])
    assert (event.action, event.actor_id) == ("LOGIN_FAILURE", None)


async def test_email_is_matched_case_insensitively(client: httpx.AsyncClient,
                                                   runtime: Runtime) -> None:
    user = await make_user(runtime)
    response = await client.post(LOGIN, json={"email": f" {user.email.upper()} ",
                                              "password": PASSWORD})
    assert response.status_code == 200


async def test_forged_forwarded_for_does_not_change_the_audited_address(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    user = await make_user(runtime)
    response = await client.post(LOGIN, json={"email": user.email, "password": "nope" * 4},
                                 headers={"X-Forwarded-For": "10.10.10.10"})
    (event,) = await _events(runtime, response.headers["x-request-id"])
    assert event.ip == CLIENT_IP


async def test_sixth_failed_login_is_429_until_the_window_passes(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(lockout="5/15minutes")
    user, other = await make_user(rt), await make_user(rt)
    async with client_for(rt) as c:
        for _ in range(5):
            response = await c.post(LOGIN, json={"email": user.email, "password": "wrong" * 4})
            assert response.status_code == 401
        for password in ("wrong" * 4, PASSWORD):  # even the right password now waits
            locked = await c.post(LOGIN, json={"email": user.email, "password": password})
            assert locked.status_code == 429
            assert locked.json()["error"] == "rate_limited"
            assert 800 <= int(locked.headers["retry-after"]) <= 900
        # Another account is not affected.
        assert (await c.post(LOGIN, json={"email": other.email,
                                          "password": PASSWORD})).status_code == 200


async def test_lockout_applies_to_unknown_emails_too(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(lockout="2/15minutes")
    email = new_email()
    async with client_for(rt) as c:
        codes = [(await c.post(LOGIN, json={"email": email, "password": PASSWORD})).status_code
                 for _ in range(3)]
    assert codes == [401, 401, 429]


async def test_per_ip_limit_on_auth_routes(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(auth_rate_limit="4/minute")
    user = await make_user(rt)
    async with client_for(rt, "198.51.100.1") as c, client_for(rt, "198.51.100.2") as d:
        codes = [(await c.post(LOGIN, json={"email": user.email, "password": PASSWORD})
                  ).status_code for _ in range(3)]
        codes.append((await c.post("/api/v1/auth/refresh",
                                   json={"refresh_token": "x" * 43})).status_code)
        limited = await c.post("/api/v1/auth/register", json={})
        assert codes == [200, 200, 200, 401]
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        # Another address is counted on its own.
        assert (await d.post(LOGIN, json={"email": user.email,
                                          "password": PASSWORD})).status_code == 200


async def test_disabled_account_cannot_log_in(client: httpx.AsyncClient,
                                              runtime: Runtime) -> None:
    user = await make_user(runtime)
    async with runtime.unit_of_work() as session:
        (await session.get(User, user.id)).status = "disabled"  # type: ignore[union-attr]
    response = await client.post(LOGIN, json={"email": user.email, "password": PASSWORD})
    assert response.status_code == 401 and response.json()["error"] == "invalid_credentials"


async def test_staff_without_a_password_yet_cannot_log_in(client: httpx.AsyncClient,
                                                          runtime: Runtime) -> None:
    admin = await make_user(runtime, "admin")
    from tests.factories import sign_in

    await sign_in(runtime, admin)
    email = new_email("doc")
    created = await client.post("/api/v1/users", headers=admin.headers, json={
        "email": email, "full_name": "Dr Who", "role": "doctor"})
    assert created.status_code == 201
    for password in ("", "anything at all, really"):
        response = await client.post(LOGIN, json={"email": email, "password": password or "x"})
        assert response.status_code == 401


async def test_weaker_argon2_hash_is_rehashed_on_login(fresh_runtime: Callable[..., Any]) -> None:
    weak = await fresh_runtime()  # the test default: m=8 KiB, t=1
    user = await make_user(weak)
    strong = await fresh_runtime(database_url=weak.settings.database_url_value,
                                 argon2_memory_kib=1024, argon2_time_cost=2)
    async with client_for(strong) as c:
        assert (await c.post(LOGIN, json={"email": user.email,
                                          "password": PASSWORD})).status_code == 200
    async with strong.sessions() as session:
        stored = (await session.get(User, user.id)).password_hash  # type: ignore[union-attr]
    assert stored is not None and "$m=1024,t=2,p=1$" in stored
    async with client_for(strong) as c:
        assert (await c.post(LOGIN, json={"email": user.email,
                                          "password": PASSWORD})).status_code == 200


async def test_legacy_bcrypt_hash_logs_in_and_moves_to_argon2(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    email = new_email("legacy")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    async with runtime.unit_of_work() as session:
        report = await runtime.accounts.import_users(session, [
            f'{{"email": "{email}", "role": "doctor", "full_name": "Dr Legacy", '
            f'"password_hash": "{hashed}"}}'])
    assert (report.imported, report.skipped) == (1, 0)
    assert (await client.post(LOGIN, json={"email": email,
                                           "password": "not it at all!!!"})).status_code == 401
    assert (await client.post(LOGIN, json={"email": email,
                                           "password": PASSWORD})).status_code == 200
    async with runtime.sessions() as session:
        stored = (await session.execute(select(User.password_hash).where(
            User.email_index == email_lookup(runtime.blind_index, email)))).scalar_one()
    assert stored is not None and stored.startswith("$argon2id$")  # moved on that first login
    assert (await client.post(LOGIN, json={"email": email,
                                           "password": PASSWORD})).status_code == 200


@pytest.mark.parametrize("payload", [
    {"email": "a@b.co"}, {"password": PASSWORD}, {"email": "a@b.co", "password": PASSWORD,
                                                   "totp_code": "12345"},
    {"email": "a@b.co", "password": PASSWORD, "totp_code": 123456},
    {"email": "a@b.co", "password": PASSWORD, "remember_me": True},
])
async def test_bad_login_bodies_are_422(client: httpx.AsyncClient,
                                        payload: dict[str, object]) -> None:
    response = await client.post(LOGIN, json=payload)
    assert response.status_code == 422
    assert PASSWORD not in response.text


async def test_unknown_email_costs_about_as_much_as_a_wrong_password(
        fresh_runtime: Callable[..., Any]) -> None:
    """With real argon2id parameters (OWASP's minimum), the two failures take about the same
    time: an unknown email is verified against a dummy hash."""
    rt = await fresh_runtime(argon2_memory_kib=19456, argon2_time_cost=2, lockout="1000/minute")
    user = await make_user(rt)
    async with client_for(rt) as c:
        async def timed(email: str) -> float:
            start = time.perf_counter()
            response = await c.post(LOGIN, json={"email": email, "password": "wrong" * 4})
            assert response.status_code == 401
            return time.perf_counter() - start

        await timed(new_email())  # warm-up (and the dummy hash)
        unknown, wrong = [], []
        for _ in range(6):
            unknown.append(await timed(new_email()))
            wrong.append(await timed(user.email))
    ratio = statistics.median(unknown) / statistics.median(wrong)
    assert 0.5 <= ratio <= 2.0, (ratio, unknown, wrong)


async def test_sessions_are_distinct_per_login(client: httpx.AsyncClient,
                                               runtime: Runtime) -> None:
    user = await make_user(runtime)
    sids = set()
    for _ in range(2):
        pair = (await client.post(LOGIN, json={"email": user.email,
                                               "password": PASSWORD})).json()
        sids.add(jwt.decode(pair["access_token"], options={"verify_signature": False})["sid"])
    assert len(sids) == 2 and all(uuid.UUID(s) for s in sids)


async def test_parallel_guesses_cannot_outrun_the_lockout(
        fresh_runtime: Callable[..., Any]) -> None:
    """Attempts are counted before the (slow) password check, so a burst of parallel guesses
    gets no more than the lock-out allows."""
    import asyncio

    rt = await fresh_runtime(argon2_memory_kib=4096, argon2_time_cost=2)
    user = await make_user(rt)
    async with client_for(rt) as c:
        answers = await asyncio.gather(*(c.post(LOGIN, json={
            "email": user.email, "password": f"guess number {i:04d}!"}) for i in range(15)))
        codes = sorted(a.status_code for a in answers)
        assert codes.count(401) <= 5 and codes.count(429) >= 10, codes
        locked = await c.post(LOGIN, json={"email": user.email, "password": PASSWORD})
        assert locked.status_code == 429


async def test_password_rechecks_count_toward_the_lockout(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(lockout="3/15minutes")
    from tests.factories import sign_in

    user = await sign_in(rt, await make_user(rt))
    async with client_for(rt) as c:
        codes = [(await c.post("/api/v1/auth/password", headers=user.headers, json={
            "current_password": f"wrong guess {i:04d}!!", "new_password": "x" * 20})
                  ).status_code for i in range(5)]
    assert codes == [401, 401, 401, 429, 429]
