"""Separation of duties (SPEC §6): with PHIVAULT_STAFF_APPROVAL on, a staff account an admin
creates is `pending` until a second admin approves it, and its setup secret never reaches its
creator: it is mailed to the new member (a real SMTP server here), or, with no mail configured,
handed to the approving admin. Break-glass notices reach the patient by mail, without the
reason. A mail server that is down fails no request."""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.auth.models import AuthSession, User
from phivault.db.base import utcnow
from phivault.runtime import Runtime
from tests.clinical.world import API, BREAK_GLASS_REASON, events_of, expect
from tests.conftest import Backend, client_for
from tests.factories import PASSWORD, TestUser, make_user, new_email, signed_in
from tests.helpers import free_port
from tests.smtp_server import Inbox, SmtpServer, smtp_server

SENDER = "phivault@clinic.example"
TOKEN_LINE = re.compile(r"^ {4}([A-Za-z0-9_-]{16,128})\r?$", re.MULTILINE)


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with smtp_server() as server:
        yield server


Factory = Callable[..., Any]


async def served(fresh_runtime: Factory, backend: Backend, **settings: Any) -> Runtime:
    """The test's shared database, served with staff approval on (and `settings`)."""
    rt: Runtime = await fresh_runtime(database_url=backend.url, staff_approval=True,
                                      mail_from=SENDER, **settings)
    return rt


@pytest.fixture
async def with_mail(runtime: Runtime, fresh_runtime: Factory, backend: Backend,
                    smtp: SmtpServer) -> Runtime:
    return await served(fresh_runtime, backend, smtp_url=smtp.url())


@pytest.fixture
async def without_mail(runtime: Runtime, fresh_runtime: Factory, backend: Backend) -> Runtime:
    return await served(fresh_runtime, backend)


@pytest.fixture
async def mail_down(runtime: Runtime, fresh_runtime: Factory, backend: Backend) -> Runtime:
    return await served(fresh_runtime, backend, smtp_url=f"smtp://127.0.0.1:{free_port()}")


async def create_doctor(client: httpx.AsyncClient, admin: TestUser,
                        email: str | None = None) -> dict[str, Any]:
    response = await client.post(f"{API}/users", headers=admin.headers, json={
        "email": email or new_email("doc"), "full_name": "Dr Nora New", "role": "doctor",
        "specialty": "Emergency medicine"})
    created: dict[str, Any] = expect(response, 201)
    return created


async def approve(client: httpx.AsyncClient, admin: TestUser, user_id: object) -> httpx.Response:
    return await client.post(f"{API}/users/{user_id}/approve", headers=admin.headers)


def token_of(inbox: Inbox, email: str) -> str:
    (received,) = inbox.to(email)
    found = TOKEN_LINE.search(received.text)
    assert found is not None, received.text
    return found.group(1)


async def login(client: httpx.AsyncClient, email: str, password: str = PASSWORD) -> httpx.Response:
    return await client.post(f"{API}/auth/login", json={"email": email, "password": password})


async def account(rt: Runtime, user_id: object) -> User:
    async with rt.sessions() as session:
        user = await session.get(User, uuid.UUID(str(user_id)))
    assert user is not None
    return user


async def test_invitation_reaches_the_new_doctor_and_never_the_creator(
        with_mail: Runtime, smtp: SmtpServer) -> None:
    rt, inbox = with_mail, smtp.inbox
    creator, approver = await signed_in(rt, "admin"), await signed_in(rt, "admin")
    async with client_for(rt) as client:
        created = await create_doctor(client, creator)
        assert created["setup_token"] is None and created["setup_expires_at"] is None
        pending = await account(rt, created["id"])
        assert pending.status == "pending" and pending.created_by == creator.id
        assert pending.setup_token_hash is None and pending.password_hash is None
        listed = expect(await client.get(f"{API}/users", headers=approver.headers,
                                         params={"limit": 500}), 200)
        assert {"id": created["id"], "status": "pending"}.items() <= next(
            u for u in listed if u["id"] == created["id"]).items()
        assert inbox.received == []  # nothing leaves before a second admin vouches

        approved = await approve(client, approver, created["id"])
        assert approved.status_code == 204 and approved.content == b""
        token = token_of(inbox, created["email"])
        (mail,) = inbox.received
        assert mail.message["From"] == SENDER and mail.message["To"] == created["email"]
        assert mail.rcpt_tos == [created["email"]]
        assert "Dr Nora New" not in mail.text and "Emergency" not in mail.text
        assert (await account(rt, created["id"])).status == "active"

        expect(await client.post(f"{API}/auth/setup", json={
            "setup_token": token, "password": PASSWORD}), 204)
        tokens = expect(await login(client, created["email"]), 200)
        me = expect(await client.get(f"{API}/me", headers={
            "Authorization": f"Bearer {tokens['access_token']}"}), 200)
        assert me["role"] == "doctor" and me["status"] == "active"

    found = await events_of(rt, [approved.headers["x-request-id"]])
    (event,) = found[approved.headers["x-request-id"]]
    assert (event.action, event.actor_id, event.outcome, event.resource_id) == (
        "APPROVE_USER", approver.id, "success", created["id"])
    assert event.event_metadata == {"role": "doctor", "delivery": "mail"}
    async with rt.sessions() as session:
        made = (await session.execute(select(AuditEvent).where(
            AuditEvent.action == "CREATE_USER", AuditEvent.resource_id == created["id"])
        )).scalar_one()
    assert made.actor_id == creator.id
    assert made.event_metadata == {"role": "doctor", "status": "pending"}


async def test_the_creator_cannot_approve(with_mail: Runtime, smtp: SmtpServer) -> None:
    rt = with_mail
    creator, other = await signed_in(rt, "admin"), await signed_in(rt, "admin")
    async with client_for(rt) as client:
        created = await create_doctor(client, creator)
        refused = await approve(client, creator, created["id"])
        expect(refused, 403, "forbidden")
        assert (await account(rt, created["id"])).status == "pending"
        # Nobody else but an admin approves; an unknown account is 404.
        doctor = await signed_in(rt, "doctor")
        expect(await approve(client, doctor, created["id"]), 403, "forbidden")
        expect(await approve(client, other, uuid.uuid4()), 404, "not_found")
        expect(await approve(client, other, created["id"]), 204)
        # Approved once; not again, and an account that was never pending neither.
        expect(await approve(client, other, created["id"]), 409, "conflict")
        expect(await approve(client, other, doctor.id), 409, "conflict")
    assert len(smtp.inbox.received) == 1

    found = await events_of(rt, [refused.headers["x-request-id"]])
    assert [(e.action, e.outcome, e.actor_id, e.resource_id, e.event_metadata)
            for e in found[refused.headers["x-request-id"]]] == [
        ("ACCESS_DENIED", "denied", creator.id, created["id"],
         {"reason": "creator_cannot_approve"})]


async def test_a_pending_account_can_do_nothing(without_mail: Runtime) -> None:
    rt = without_mail
    creator = await signed_in(rt, "admin")
    patient = await make_user(rt, "patient")
    async with client_for(rt) as client:
        created = await create_doctor(client, creator)
        user_id = uuid.UUID(created["id"])
        expect(await login(client, created["email"]), 401, "invalid_credentials")
        expect(await client.post(f"{API}/auth/setup", json={
            "setup_token": "A" * 43, "password": PASSWORD}), 401, "invalid_token")
        # No status change makes it active (or parks it to be re-enabled later).
        for status in ("active", "disabled"):
            expect(await client.patch(f"{API}/users/{user_id}", headers=creator.headers,
                                      json={"status": status}), 409, "conflict")
        directory = expect(await client.get(f"{API}/doctors", headers=creator.headers,
                                            params={"limit": 500}), 200)
        assert created["id"] not in {d["id"] for d in directory}
        # Even a token forged for it past login (as if a key had leaked) is refused, so it
        # can break no glass: the account is not active.
        async with rt.unit_of_work() as session:
            now = utcnow()
            session.add(AuthSession(id=(sid := uuid.uuid4()), user_id=user_id, kind="login",
                                    created_at=now, expires_at=now + timedelta(hours=1),
                                    last_used_at=now))
        forged = {"Authorization": "Bearer " + rt.access_tokens.issue(user_id, "doctor", sid)}
        expect(await client.post(f"{API}/patients/{patient.id}/break-glass", headers=forged,
                                 json={"reason": BREAK_GLASS_REASON}), 401, "invalid_token")


async def test_the_lone_admins_attack_fails(with_mail: Runtime, smtp: SmtpServer) -> None:
    """The issue's attack: an admin creates a doctor, redeems the setup token the answer gave,
    breaks the glass and reads the chart. Alone, they get no token, no login, no chart; and
    an admin they create to approve for them is pending too."""
    rt = with_mail
    mallory = await signed_in(rt, "admin")
    patient = await make_user(rt, "patient")
    async with client_for(rt) as client:
        created = await create_doctor(client, mallory, email=new_email("mallory-alias"))
        assert created["setup_token"] is None
        # Nothing to redeem: the account has no token at all until a second admin approves.
        expect(await client.post(f"{API}/auth/setup", json={
            "setup_token": "A" * 43, "password": PASSWORD}), 401, "invalid_token")
        expect(await approve(client, mallory, created["id"]), 403, "forbidden")
        expect(await client.post(f"{API}/users/{created['id']}/invitation",
                                 headers=mallory.headers), 403, "forbidden")
        expect(await client.patch(f"{API}/users/{created['id']}", headers=mallory.headers,
                                  json={"status": "active"}), 409)
        expect(await login(client, created["email"]), 401)
        accomplice = expect(await client.post(f"{API}/users", headers=mallory.headers, json={
            "email": new_email("accomplice"), "full_name": "Sock Puppet", "role": "admin"}), 201)
        assert accomplice["setup_token"] is None
        expect(await approve(client, mallory, accomplice["id"]), 403, "forbidden")
        # Her own token reaches no chart either.
        expect(await client.post(f"{API}/patients/{patient.id}/break-glass",
                                 headers=mallory.headers, json={"reason": BREAK_GLASS_REASON}),
               403, "forbidden")
        expect(await client.get(f"{API}/patients/{patient.id}/records",
                                headers=mallory.headers), 403, "forbidden")
    assert smtp.inbox.received == []
    async with rt.sessions() as session:
        grants = (await session.execute(select(AuditEvent).where(
            AuditEvent.action == "BREAK_GLASS", AuditEvent.patient_id == patient.id))).all()
    assert grants == []


async def test_without_mail_the_approving_admin_is_handed_the_token(
        without_mail: Runtime) -> None:
    rt = without_mail
    creator, approver = await signed_in(rt, "admin"), await signed_in(rt, "admin")
    async with client_for(rt) as client:
        created = await create_doctor(client, creator)
        response = await approve(client, approver, created["id"])
        handed = expect(response, 200)
        assert set(handed) == {"setup_token", "setup_expires_at"}
        user = await account(rt, created["id"])
        assert user.setup_expires_at is not None
        assert timedelta(hours=71) < user.setup_expires_at - utcnow() <= timedelta(hours=72)
        expect(await client.post(f"{API}/auth/setup", json={
            "setup_token": handed["setup_token"], "password": PASSWORD}), 204)
        expect(await login(client, created["email"]), 200)
    found = await events_of(rt, [response.headers["x-request-id"]])
    (event,) = found[response.headers["x-request-id"]]
    assert event.event_metadata == {"role": "doctor", "delivery": "answer"}
    assert handed["setup_token"] not in json.dumps(event.event_metadata)


async def test_one_approval_wins_a_race(without_mail: Runtime) -> None:
    rt = without_mail
    creator = await signed_in(rt, "admin")
    first, second = await signed_in(rt, "admin"), await signed_in(rt, "admin")
    async with client_for(rt) as client:
        created = await create_doctor(client, creator)
        answers = await asyncio.gather(approve(client, first, created["id"]),
                                       approve(client, second, created["id"]))
    assert sorted(a.status_code for a in answers) == [200, 409]


async def test_break_glass_mail_reaches_the_patient_without_the_reason(
        with_mail: Runtime, smtp: SmtpServer) -> None:
    rt = with_mail
    patient = await signed_in(rt, "patient", full_name="Paula Patient")
    rescuer = await signed_in(rt, "doctor", full_name="Dr Rita Rescue")
    async with client_for(rt) as client:
        expect(await client.post(f"{API}/patients/{patient.id}/break-glass",
                                 headers=rescuer.headers, json={"reason": BREAK_GLASS_REASON}),
               201)
        notifications = expect(await client.get(f"{API}/me/notifications",
                                                headers=patient.headers), 200)
    assert [n["kind"] for n in notifications] == ["break_glass"]  # in the app as before
    (mail,) = smtp.inbox.to(patient.email)
    assert mail.rcpt_tos == [patient.email]
    assert mail.message["Subject"] == "Emergency access to your medical records"
    assert "emergency" in mail.text and "access log" in mail.text
    assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", mail.text)
    whole = mail.message.as_string()
    for secret in (BREAK_GLASS_REASON, "Unconscious", "allergies", "Dr Rita Rescue",
                   rescuer.email, "Paula Patient"):
        assert secret not in whole


async def test_no_mail_for_work_that_rolled_back(with_mail: Runtime, smtp: SmtpServer) -> None:
    rt = with_mail
    creator, rescuer = await signed_in(rt, "admin"), await signed_in(rt, "doctor")
    async with client_for(rt) as client:
        created = await create_doctor(client, creator)
        expect(await approve(client, creator, created["id"]), 403)
        expect(await client.post(f"{API}/patients/{uuid.uuid4()}/break-glass",
                                 headers=rescuer.headers, json={"reason": BREAK_GLASS_REASON}),
               404)
    assert smtp.inbox.received == []


async def test_a_mail_server_that_is_down_fails_no_request(
        mail_down: Runtime, captured_logs: io.StringIO) -> None:
    rt = mail_down
    creator, approver = await signed_in(rt, "admin"), await signed_in(rt, "admin")
    patient, rescuer = await make_user(rt, "patient"), await signed_in(rt, "doctor")
    async with client_for(rt) as client:
        created = await create_doctor(client, creator)
        expect(await approve(client, approver, created["id"]), 204)
        expect(await client.post(f"{API}/patients/{patient.id}/break-glass",
                                 headers=rescuer.headers, json={"reason": BREAK_GLASS_REASON}),
               201)
    assert (await account(rt, created["id"])).status == "active"
    logged = captured_logs.getvalue()
    warnings = [line for line in map(json.loads, logged.splitlines())
                if line["event"] == "mail_not_sent"]
    assert [(w["level"], w["kind"], w["failure"]) for w in warnings] == [
        ("warning", "invitation", "unreachable"), ("warning", "break_glass", "unreachable")]
    assert created["email"] not in logged and patient.email not in logged
    async with rt.sessions() as session:
        failures = (await session.execute(select(AuditEvent).where(
            AuditEvent.action == "MAIL_FAILURE",
            AuditEvent.resource_id.in_([created["id"], str(patient.id)]))
            .order_by(AuditEvent.seq))).scalars().all()
    assert [(e.resource_id, e.outcome, e.actor_role, e.event_metadata) for e in failures] == [
        (created["id"], "error", "system", {"kind": "invitation", "reason": "unreachable"}),
        (str(patient.id), "error", "system", {"kind": "break_glass", "reason": "unreachable"})]


async def renew(client: httpx.AsyncClient, admin: TestUser, user_id: object) -> httpx.Response:
    return await client.post(f"{API}/users/{user_id}/invitation", headers=admin.headers)


async def test_a_failed_invitation_is_renewed_by_another_admin(
        mail_down: Runtime, fresh_runtime: Factory, backend: Backend, smtp: SmtpServer) -> None:
    """The mail server was down at the approval: the token is lost, the account waits. Once
    mail works, an admin other than the creator renews the invitation: a new token goes to the
    new member, the old one is dead, and no renewal reopens an account once it has a
    password."""
    creator, approver = await signed_in(mail_down, "admin"), await signed_in(mail_down, "admin")
    async with client_for(mail_down) as client:
        created = await create_doctor(client, creator)
        expect(await renew(client, approver, created["id"]), 409, "conflict")  # pending
        expect(await approve(client, approver, created["id"]), 204)
    lost = await account(mail_down, created["id"])
    assert lost.setup_token_hash is not None

    mended = await served(fresh_runtime, backend, smtp_url=smtp.url())
    async with client_for(mended) as client:
        expect(await renew(client, creator, created["id"]), 403, "forbidden")
        expect(await renew(client, approver, uuid.uuid4()), 404, "not_found")
        response = await renew(client, approver, created["id"])
        assert response.status_code == 204
        token = token_of(smtp.inbox, created["email"])
        renewed = await account(mended, created["id"])
        assert renewed.setup_token_hash not in (None, lost.setup_token_hash)
        expect(await client.post(f"{API}/auth/setup", json={
            "setup_token": token, "password": PASSWORD}), 204)
        expect(await login(client, created["email"]), 200)
        # The account is its owner's now: a renewal would hand it to whoever reads the token.
        expect(await renew(client, approver, created["id"]), 409, "conflict")
    found = await events_of(mended, [response.headers["x-request-id"]])
    assert [(e.action, e.actor_id, e.event_metadata)
            for e in found[response.headers["x-request-id"]]] == [
        ("RENEW_SETUP_TOKEN", approver.id, {"role": "doctor", "delivery": "mail"})]


async def test_with_approval_off_the_creator_gets_the_token(client: httpx.AsyncClient,
                                                            runtime: Runtime) -> None:
    """The dev default: the original onboarding, the creator recorded all the same."""
    assert runtime.settings.staff_approval_required is False
    admin = await signed_in(runtime, "admin")
    created = await create_doctor(client, admin)
    assert isinstance(created["setup_token"], str) and created["setup_expires_at"]
    user = await account(runtime, created["id"])
    assert user.status == "active" and user.created_by == admin.id
    expect(await approve(client, await signed_in(runtime, "admin"), created["id"]), 409)
    # A renewal by the creator is fine too: the token would come to them anyway.
    renewed = expect(await client.post(f"{API}/users/{created['id']}/invitation",
                                       headers=admin.headers), 200)
    expect(await client.post(f"{API}/auth/setup", json={
        "setup_token": created["setup_token"], "password": PASSWORD}), 401)  # replaced
    expect(await client.post(f"{API}/auth/setup", json={
        "setup_token": renewed["setup_token"], "password": PASSWORD}), 204)
    expect(await login(client, created["email"]), 200)


async def test_the_cli_makes_the_first_admin_without_approval(without_mail: Runtime) -> None:
    """`phivault users create` (shell access to the server and its keys) needs no second
    admin: there may be none yet. Its accounts have no creator on record."""
    first = await make_user(without_mail, "admin")
    user = await account(without_mail, first.id)
    assert (user.status, user.created_by) == ("active", None)
