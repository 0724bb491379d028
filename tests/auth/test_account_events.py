"""Account actions that were once unaudited: starting TOTP set-up (the event never holds the
secret), a wrong code at enable, and a `PATCH /users/{id}` that changes nothing but still answers
the account (an `UPDATE_USER` marked `changed: false`)."""

from __future__ import annotations

import httpx
import pyotp
from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.runtime import Runtime
from tests.factories import PASSWORD, signed_in


def as_text(event: AuditEvent) -> str:
    """Every column of the event, as text, to search for what must not be there."""
    return " ".join(str(getattr(event, c.key)) for c in AuditEvent.__mapper__.column_attrs)


async def events_of(rt: Runtime, response: httpx.Response) -> list[AuditEvent]:
    async with rt.sessions() as session:
        return list((await session.execute(select(AuditEvent).where(
            AuditEvent.request_id == response.headers["x-request-id"])
            .order_by(AuditEvent.seq))).scalars().all())


async def test_starting_totp_set_up_is_audited_without_the_secret(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    user = await signed_in(runtime)
    response = await client.post("/api/v1/auth/mfa/setup", headers=user.headers,
                                 json={"password": PASSWORD})
    assert response.status_code == 200
    secret, uri = response.json()["secret"], response.json()["otpauth_uri"]
    events = await events_of(runtime, response)
    assert [(e.action, e.outcome, e.actor_id, e.resource_type, e.resource_id, e.event_metadata)
            for e in events] == [("MFA_SETUP_STARTED", "success", user.id, "user",
                                  str(user.id), {})]
    assert secret not in as_text(events[0]) and uri not in as_text(events[0])

    wrong = "000000" if pyotp.TOTP(secret).now() != "000000" else "111111"
    refused = await client.post("/api/v1/auth/mfa/enable", headers=user.headers,
                                json={"code": wrong})
    assert refused.status_code == 401
    assert [(e.action, e.outcome, e.actor_id, e.event_metadata)
            for e in await events_of(runtime, refused)] == [
        ("MFA_ENABLED", "denied", user.id, {"reason": "bad_totp"})]


async def test_a_patch_that_changes_nothing_is_audited_as_an_update_marked_unchanged(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    admin, doctor = await signed_in(runtime, "admin"), await signed_in(runtime, "doctor")
    for body in ({"status": "active"}, {"role": "doctor"}, {}):
        response = await client.patch(f"/api/v1/users/{doctor.id}", headers=admin.headers,
                                      json=body)
        assert response.status_code == 200 and response.json()["email"] == doctor.email
        assert [(e.action, e.outcome, e.actor_id, e.resource_type, e.resource_id,
                 e.event_metadata) for e in await events_of(runtime, response)] == [
            ("UPDATE_USER", "success", admin.id, "user", str(doctor.id), {"changed": False})]
    # Nothing changed, so no session ended.
    assert (await client.get("/api/v1/me", headers=doctor.headers)).status_code == 200
