"""Sessions: list and end my own, an admin ends all of a user's, a password change ends all."""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.runtime import Runtime
from tests.factories import PASSWORD, TestUser, sign_in, signed_in

ME = "/api/v1/me"


async def _second_session(rt: Runtime, user: TestUser) -> TestUser:
    other = TestUser(user.id, user.email, user.password, user.role)
    return await sign_in(rt, other)


async def test_list_my_sessions(client: httpx.AsyncClient, runtime: Runtime) -> None:
    user = await signed_in(runtime)
    await _second_session(runtime, user)
    response = await client.get("/api/v1/me/sessions", headers=user.headers)
    assert response.status_code == 200
    sessions = response.json()
    assert len(sessions) == 2
    assert sorted(s["current"] for s in sessions) == [False, True]
    assert set(sessions[0]) == {"id", "created_at", "last_used_at", "expires_at", "ip",
                                "user_agent", "current"}


async def test_end_one_of_my_sessions(client: httpx.AsyncClient, runtime: Runtime) -> None:
    user = await signed_in(runtime)
    phone = await _second_session(runtime, user)
    listed = (await client.get("/api/v1/me/sessions", headers=user.headers)).json()
    (other,) = [s["id"] for s in listed if not s["current"]]
    response = await client.delete(f"/api/v1/me/sessions/{other}", headers=user.headers)
    assert response.status_code == 204
    assert (await client.get(ME, headers=phone.headers)).status_code == 401
    assert (await client.get(ME, headers=user.headers)).status_code == 200


async def test_cannot_end_another_users_session(client: httpx.AsyncClient,
                                                runtime: Runtime) -> None:
    mallory, alice = await signed_in(runtime), await signed_in(runtime)
    alices = (await client.get("/api/v1/me/sessions", headers=alice.headers)).json()
    for target in (alices[0]["id"], str(uuid.uuid4())):
        response = await client.delete(f"/api/v1/me/sessions/{target}",
                                       headers=mallory.headers)
        assert response.status_code == 404 and response.json()["error"] == "not_found"
    assert (await client.get(ME, headers=alice.headers)).status_code == 200
    assert (await client.delete("/api/v1/me/sessions/not-a-uuid",
                                headers=mallory.headers)).status_code == 422


async def test_admin_ends_every_session_of_a_user(client: httpx.AsyncClient,
                                                  runtime: Runtime) -> None:
    admin, doctor = await signed_in(runtime, "admin"), await signed_in(runtime, "doctor")
    laptop = await _second_session(runtime, doctor)
    response = await client.delete(f"/api/v1/users/{doctor.id}/sessions", headers=admin.headers)
    assert response.status_code == 204
    for user in (doctor, laptop):
        assert (await client.get(ME, headers=user.headers)).status_code == 401
    assert (await client.delete(f"/api/v1/users/{uuid.uuid4()}/sessions",
                                headers=admin.headers)).status_code == 404
    forbidden = await client.delete(f"/api/v1/users/{admin.id}/sessions",
                                    headers=doctor.headers)
    assert forbidden.status_code == 401  # the doctor's own token died just above
    other = await signed_in(runtime, "doctor")
    forbidden = await client.delete(f"/api/v1/users/{admin.id}/sessions", headers=other.headers)
    assert forbidden.status_code == 403


async def test_password_change_ends_every_session(client: httpx.AsyncClient,
                                                  runtime: Runtime) -> None:
    user = await signed_in(runtime)
    phone = await _second_session(runtime, user)
    new = "a brand new passphrase 2026"
    wrong = await client.post("/api/v1/auth/password", headers=user.headers, json={
        "current_password": "not my password!", "new_password": new})
    assert wrong.status_code == 401
    weak = await client.post("/api/v1/auth/password", headers=user.headers, json={
        "current_password": PASSWORD, "new_password": "short"})
    assert weak.status_code == 422 and weak.json()["error"] == "weak_password"
    changed = await client.post("/api/v1/auth/password", headers=user.headers, json={
        "current_password": PASSWORD, "new_password": new})
    assert changed.status_code == 204
    for session_user in (user, phone):
        assert (await client.get(ME, headers=session_user.headers)).status_code == 401
    login = "/api/v1/auth/login"
    assert (await client.post(login, json={"email": user.email,
                                           "password": PASSWORD})).status_code == 401
    assert (await client.post(login, json={"email": user.email,
                                           "password": new})).status_code == 200
    async with runtime.sessions() as session:
        actions = (await session.execute(select(AuditEvent.action, AuditEvent.outcome).where(
            AuditEvent.actor_id == user.id, AuditEvent.action == "PASSWORD_CHANGED"))).all()
    assert sorted(actions) == [("PASSWORD_CHANGED", "denied"), ("PASSWORD_CHANGED", "success")]
