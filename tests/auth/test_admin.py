"""User administration: staff onboarding with setup tokens, listing, re-role, disable; and who
may call it (admins only)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update

from phivault.audit.models import AuditEvent
from phivault.auth.models import User
from phivault.db.base import utcnow
from phivault.runtime import Runtime
from tests.factories import PASSWORD, TestUser, new_email, sign_in, signed_in

USERS = "/api/v1/users"


async def create_doctor(client: httpx.AsyncClient, admin: TestUser,
                        **extra: object) -> dict[str, object]:
    response = await client.post(USERS, headers=admin.headers, json={
        "email": new_email("doc"), "full_name": "Dr Gregory House", "role": "doctor",
        "specialty": "Diagnostics", **extra})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_onboarding_with_a_one_time_setup_token(client: httpx.AsyncClient,
                                                      runtime: Runtime) -> None:
    admin = await signed_in(runtime, "admin")
    created = await create_doctor(client, admin)
    assert set(created) == {"id", "email", "role", "setup_token", "setup_expires_at"}
    assert created["role"] == "doctor"
    async with runtime.sessions() as session:
        user = await session.get(User, uuid.UUID(str(created["id"])))
    assert user is not None and user.password_hash is None
    assert user.setup_token_hash != str(created["setup_token"]).encode()  # stored hashed
    assert user.setup_expires_at is not None
    assert timedelta(hours=71) < user.setup_expires_at - utcnow() <= timedelta(hours=72)

    weak = await client.post("/api/v1/auth/setup", json={
        "setup_token": created["setup_token"], "password": "short"})
    assert weak.status_code == 422
    done = await client.post("/api/v1/auth/setup", json={
        "setup_token": created["setup_token"], "password": PASSWORD})
    assert done.status_code == 204
    twice = await client.post("/api/v1/auth/setup", json={
        "setup_token": created["setup_token"], "password": PASSWORD + "!"})
    assert twice.status_code == 401 and twice.json()["error"] == "invalid_token"
    login = await client.post("/api/v1/auth/login", json={"email": created["email"],
                                                          "password": PASSWORD})
    assert login.status_code == 200
    doctors = await client.get("/api/v1/doctors", headers={
        "Authorization": f"Bearer {login.json()['access_token']}"})
    assert {"id": created["id"], "full_name": "Dr Gregory House",
            "specialty": "Diagnostics"} in doctors.json()


async def test_expired_setup_token_is_refused(client: httpx.AsyncClient,
                                              runtime: Runtime) -> None:
    admin = await signed_in(runtime, "admin")
    created = await create_doctor(client, admin)
    async with runtime.unit_of_work() as session:
        await session.execute(update(User).where(User.id == uuid.UUID(str(created["id"])))
                              .values(setup_expires_at=utcnow() - timedelta(seconds=1)))
    response = await client.post("/api/v1/auth/setup", json={
        "setup_token": created["setup_token"], "password": PASSWORD})
    assert response.status_code == 401


@pytest.mark.parametrize("role", ["patient", "doctor", "auditor"])
async def test_only_admins_administer_users(client: httpx.AsyncClient, runtime: Runtime,
                                            role: str) -> None:
    caller = await signed_in(runtime, role)
    target = await signed_in(runtime, "doctor")
    attempts = [
        client.get(USERS, headers=caller.headers),
        client.post(USERS, headers=caller.headers, json={
            "email": new_email(), "full_name": "X", "role": "admin"}),
        client.patch(f"{USERS}/{target.id}", headers=caller.headers, json={"status": "disabled"}),
        client.delete(f"{USERS}/{target.id}/sessions", headers=caller.headers),
    ]
    for attempt in attempts:
        response = await attempt
        assert response.status_code == 403
        assert response.json()["error"] == "forbidden"
    async with runtime.sessions() as session:
        denials = (await session.execute(select(AuditEvent.action).where(
            AuditEvent.actor_id == caller.id, AuditEvent.action == "ACCESS_DENIED"))).all()
    assert len(denials) == 4
    assert (await client.get("/api/v1/me", headers=target.headers)).status_code == 200


async def test_list_users_is_paginated_and_has_no_phi(client: httpx.AsyncClient,
                                                      runtime: Runtime) -> None:
    admin = await signed_in(runtime, "admin")
    patient = await signed_in(runtime, "patient", full_name="Secret Patientname")
    first = await client.get(USERS, headers=admin.headers, params={"limit": 2})
    assert first.status_code == 200
    total = int(first.headers["x-total-count"])
    assert len(first.json()) == 2 and total >= 2
    everyone = await client.get(USERS, headers=admin.headers, params={"limit": 500})
    assert len(everyone.json()) == min(total, 500)
    mine = [u for u in everyone.json() if u["id"] == str(patient.id)]
    if mine:
        assert set(mine[0]) == {"id", "email", "role", "status", "created_at"}
        assert mine[0]["email"] == patient.email
    assert "Secret Patientname" not in everyone.text
    for params in ({"limit": 501}, {"limit": 0}, {"offset": -1}, {"limit": "ten"},
                   {"offset": 10**12}):
        assert (await client.get(USERS, headers=admin.headers,
                                 params=params)).status_code == 422


async def test_disable_refuses_tokens_at_once_and_logins(client: httpx.AsyncClient,
                                                         runtime: Runtime) -> None:
    admin, doctor = await signed_in(runtime, "admin"), await signed_in(runtime, "doctor")
    response = await client.patch(f"{USERS}/{doctor.id}", headers=admin.headers,
                                  json={"status": "disabled"})
    assert response.status_code == 200 and response.json()["status"] == "disabled"
    assert (await client.get("/api/v1/me", headers=doctor.headers)).status_code == 401
    assert (await client.post("/api/v1/auth/refresh", json={
        "refresh_token": doctor.refresh_token})).status_code == 401
    login = {"email": doctor.email, "password": PASSWORD}
    assert (await client.post("/api/v1/auth/login", json=login)).status_code == 401
    await client.patch(f"{USERS}/{doctor.id}", headers=admin.headers, json={"status": "active"})
    assert (await client.post("/api/v1/auth/login", json=login)).status_code == 200


async def test_re_role_refuses_old_tokens(client: httpx.AsyncClient, runtime: Runtime) -> None:
    admin, doctor = await signed_in(runtime, "admin"), await signed_in(runtime, "doctor")
    response = await client.patch(f"{USERS}/{doctor.id}", headers=admin.headers,
                                  json={"role": "auditor"})
    assert response.json()["role"] == "auditor"
    assert (await client.get("/api/v1/me", headers=doctor.headers)).status_code == 401
    await sign_in(runtime, doctor)
    me = await client.get("/api/v1/me", headers=doctor.headers)
    assert me.json()["role"] == "auditor"
    async with runtime.sessions() as session:
        event = (await session.execute(select(AuditEvent).where(
            AuditEvent.request_id == response.headers["x-request-id"]))).scalar_one()
    assert event.action == "UPDATE_USER" and event.event_metadata["role"] == "auditor"


@pytest.mark.parametrize("body, status", [
    ({"role": "patient"}, 422), ({"status": "deleted"}, 422), ({"role": "superadmin"}, 422),
    ({"status": "disabled", "email": "x@y.z"}, 422), ({"status": 0}, 422),
])
async def test_bad_updates(client: httpx.AsyncClient, runtime: Runtime,
                           body: dict[str, object], status: int) -> None:
    admin, doctor = await signed_in(runtime, "admin"), await signed_in(runtime, "doctor")
    response = await client.patch(f"{USERS}/{doctor.id}", headers=admin.headers, json=body)
    assert response.status_code == status


async def test_conflicting_updates(client: httpx.AsyncClient, runtime: Runtime) -> None:
    admin, patient = await signed_in(runtime, "admin"), await signed_in(runtime, "patient")
    own = await client.patch(f"{USERS}/{admin.id}", headers=admin.headers,
                             json={"status": "disabled"})
    assert own.status_code == 409
    patient_to_staff = await client.patch(f"{USERS}/{patient.id}", headers=admin.headers,
                                          json={"role": "doctor"})
    assert patient_to_staff.status_code == 409
    missing = await client.patch(f"{USERS}/{uuid.uuid4()}", headers=admin.headers,
                                 json={"status": "disabled"})
    assert missing.status_code == 404


@pytest.mark.parametrize("body", [
    {"full_name": "X", "role": "patient"}, {"full_name": "X", "role": "doctor", "password": "p"},
    {"full_name": "", "role": "admin"}, {"full_name": "X", "role": "admin", "setup_token": "t"},
])
async def test_bad_staff_bodies(client: httpx.AsyncClient, runtime: Runtime,
                                body: dict[str, object]) -> None:
    admin = await signed_in(runtime, "admin")
    response = await client.post(USERS, headers=admin.headers,
                                 json={"email": new_email(), **body})
    assert response.status_code == 422


async def test_staff_email_taken_and_specialty_rules(client: httpx.AsyncClient,
                                                     runtime: Runtime) -> None:
    admin = await signed_in(runtime, "admin")
    created = await create_doctor(client, admin)
    again = await client.post(USERS, headers=admin.headers, json={
        "email": created["email"], "full_name": "Other", "role": "auditor"})
    assert again.status_code == 409 and again.json()["error"] == "email_taken"
    auditor_specialty = await client.post(USERS, headers=admin.headers, json={
        "email": new_email(), "full_name": "A", "role": "auditor", "specialty": "Cardiology"})
    assert auditor_specialty.status_code == 409


async def test_doctor_directory(client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient")
    doctor = await signed_in(runtime, "doctor", full_name="Dr Zed Zulu", specialty="Neurology")
    listed = await client.get("/api/v1/doctors", headers=patient.headers,
                              params={"limit": 500})
    assert listed.status_code == 200
    assert {"id": str(doctor.id), "full_name": "Dr Zed Zulu",
            "specialty": "Neurology"} in listed.json()
    assert all(set(d) == {"id", "full_name", "specialty"} for d in listed.json())
    assert int(listed.headers["x-total-count"]) >= 1
    assert (await client.get("/api/v1/doctors")).status_code == 401


async def test_every_admin_action_is_audited(client: httpx.AsyncClient,
                                             runtime: Runtime) -> None:
    admin, doctor = await signed_in(runtime, "admin"), await signed_in(runtime, "doctor")
    answers = {
        "CREATE_USER": await client.post(USERS, headers=admin.headers, json={
            "email": new_email("aud"), "full_name": "Audited Auditor", "role": "auditor"}),
        "VIEW_USERS": await client.get(USERS, headers=admin.headers),
        "UPDATE_USER": await client.patch(f"{USERS}/{doctor.id}", headers=admin.headers,
                                          json={"status": "disabled"}),
        "SESSION_REVOKED": await client.delete(f"{USERS}/{doctor.id}/sessions",
                                               headers=admin.headers),
    }
    async with runtime.sessions() as session:
        for action, response in answers.items():
            assert response.status_code < 300, (action, response.text)
            events = (await session.execute(select(AuditEvent).where(
                AuditEvent.request_id == response.headers["x-request-id"]))).scalars().all()
            assert [(e.action, e.actor_id, e.actor_role, e.outcome) for e in events] == [
                (action, admin.id, "admin", "success")], action
            assert all("@" not in str(v) for e in events for v in e.event_metadata.values())
