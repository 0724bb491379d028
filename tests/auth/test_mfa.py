"""TOTP: set-up needs the password, each code works once, logins need it; roles that must
enrol get an enrolment token instead of tokens."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pyotp
from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.runtime import Runtime
from tests.conftest import client_for
from tests.factories import PASSWORD, TestUser, make_user, signed_in

LOGIN = "/api/v1/auth/login"


async def enrol(client: httpx.AsyncClient, user: TestUser, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else user.headers
    setup = await client.post("/api/v1/auth/mfa/setup", headers=headers,
                              json={"password": PASSWORD})
    assert setup.status_code == 200, setup.text
    secret = setup.json()["secret"]
    assert setup.json()["otpauth_uri"].startswith("otpauth://totp/phivault:")
    assert "secret=" + secret in setup.json()["otpauth_uri"]
    enable = await client.post("/api/v1/auth/mfa/enable", headers=headers,
                               json={"code": pyotp.TOTP(secret).now()})
    assert enable.status_code == 204, enable.text
    return secret


def later_code(secret: str, steps: int) -> str:
    return pyotp.TOTP(secret).at(time.time() + 30 * steps)


async def test_setup_needs_the_password(client: httpx.AsyncClient, runtime: Runtime) -> None:
    user = await signed_in(runtime)
    response = await client.post("/api/v1/auth/mfa/setup", headers=user.headers,
                                 json={"password": "a stolen token only"})
    assert response.status_code == 401 and response.json()["error"] == "invalid_credentials"
    assert (await client.post("/api/v1/auth/mfa/setup",
                              json={"password": PASSWORD})).status_code == 401


async def test_login_with_totp(client: httpx.AsyncClient, runtime: Runtime) -> None:
    user = await signed_in(runtime)
    secret = await enrol(client, user)
    # Enabling ended the sessions opened without the second factor.
    assert (await client.get("/api/v1/me", headers=user.headers)).status_code == 401

    missing = await client.post(LOGIN, json={"email": user.email, "password": PASSWORD})
    assert missing.status_code == 401 and missing.json()["error"] == "mfa_required"
    bad = await client.post(LOGIN, json={"email": user.email, "password": PASSWORD,
                                         "totp_code": "000000" if pyotp.TOTP(secret).now()
                                         != "000000" else "111111"})
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_credentials"
    # A wrong password with no code is still just invalid_credentials (no MFA hint).
    wrong = await client.post(LOGIN, json={"email": user.email, "password": "wrong" * 4})
    assert wrong.json()["error"] == "invalid_credentials"

    code = later_code(secret, 1)  # one step of drift is accepted
    good = await client.post(LOGIN, json={"email": user.email, "password": PASSWORD,
                                          "totp_code": code})
    assert good.status_code == 200, good.text
    me = await client.get("/api/v1/me", headers={
        "Authorization": f"Bearer {good.json()['access_token']}"})
    assert me.json()["mfa_enabled"] is True

    # The same code again (a replay inside its window) fails, and so does an older one.
    for used in (code, pyotp.TOTP(secret).now()):
        replay = await client.post(LOGIN, json={"email": user.email, "password": PASSWORD,
                                                "totp_code": used})
        assert replay.status_code == 401 and replay.json()["error"] == "invalid_credentials"
    async with runtime.sessions() as session:
        events = (await session.execute(select(AuditEvent.action).where(
            AuditEvent.actor_id == user.id, AuditEvent.action == "MFA_ENABLED"))).all()
    assert len(events) == 1


async def test_codes_two_steps_away_are_refused(client: httpx.AsyncClient,
                                                runtime: Runtime) -> None:
    user = await signed_in(runtime)
    secret = await enrol(client, user)
    for steps in (3, -3):
        response = await client.post(LOGIN, json={"email": user.email, "password": PASSWORD,
                                                  "totp_code": later_code(secret, steps)})
        assert response.status_code == 401


async def test_setup_cannot_replace_an_enabled_secret(client: httpx.AsyncClient,
                                                      runtime: Runtime) -> None:
    user = await signed_in(runtime)
    secret = await enrol(client, user)
    relogin = await client.post(LOGIN, json={"email": user.email, "password": PASSWORD,
                                             "totp_code": later_code(secret, 1)})
    token = relogin.json()["access_token"]
    again = await client.post("/api/v1/auth/mfa/setup", headers={
        "Authorization": f"Bearer {token}"}, json={"password": PASSWORD})
    assert again.status_code == 401


async def test_required_roles_must_enrol_before_getting_tokens(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(mfa_required_roles="doctor,admin,auditor")
    doctor = await make_user(rt, "doctor")
    patient = await make_user(rt, "patient")
    async with client_for(rt) as c:
        assert (await c.post(LOGIN, json={"email": patient.email,
                                          "password": PASSWORD})).status_code == 200
        first = await c.post(LOGIN, json={"email": doctor.email, "password": PASSWORD})
        assert first.status_code == 403
        body = first.json()
        assert body["error"] == "mfa_enrollment_required" and "access_token" not in body
        enrolment = body["enrollment_token"]
        # The enrolment token opens the TOTP set-up and nothing else.
        for path in ("/api/v1/me", "/api/v1/doctors", "/api/v1/me/sessions"):
            response = await c.get(path, headers={"Authorization": f"Bearer {enrolment}"})
            assert response.status_code == 401, path
        secret = await enrol(c, doctor, enrolment)
        # Enabling ended the enrolment session.
        assert (await c.post("/api/v1/auth/mfa/setup", headers={
            "Authorization": f"Bearer {enrolment}"}, json={"password": PASSWORD})
                ).status_code == 401
        done = await c.post(LOGIN, json={"email": doctor.email, "password": PASSWORD,
                                         "totp_code": later_code(secret, 1)})
        assert done.status_code == 200
