"""A ciphertext that fails authentication yields no data: 500 integrity_failure, audited."""

from __future__ import annotations

import uuid

import httpx
from fastapi import Depends
from sqlalchemy import select

from phivault.access.guards import Allow
from phivault.access.permissions import Role
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.audit.models import AuditEvent
from phivault.keys import service
from phivault.runtime import Runtime
from phivault.web.app import create_app
from phivault.web.dependencies import RuntimeDep, SessionDep
from tests.factories import signed_in


async def test_tampered_ciphertext_is_500_integrity_failure_and_audited(
        runtime: Runtime, captured_logs: object) -> None:
    app = create_app(runtime=runtime)

    @app.get("/test/read-tampered", dependencies=[Depends(Allow(Role.DOCTOR))])
    async def read_tampered(rt: RuntimeDep, session: SessionDep) -> dict[str, str]:
        cipher = service.new_row_cipher(session, rt.envelope, "medical_records", uuid.uuid4())
        sealed = bytearray(cipher.seal("diagnosis", "Canary diagnosis Q7"))
        sealed[-1] ^= 0x01
        audit.record(session, Action.VIEW_MEDICAL_RECORD)  # rolled back with the read
        return {"diagnosis": cipher.open("diagnosis", bytes(sealed))}

    doctor = await signed_in(runtime, "doctor")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://t") as client:
        response = await client.get("/test/read-tampered", headers=doctor.headers)
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "integrity_failure"
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Canary" not in response.text
    assert "Canary" not in captured_logs.getvalue()  # type: ignore[attr-defined]
    async with runtime.sessions() as session:
        events = (await session.execute(select(AuditEvent).where(
            AuditEvent.request_id == body["request_id"]))).scalars().all()
    assert [(e.action, e.outcome, e.actor_id) for e in events] == [
        ("INTEGRITY_FAILURE", "error", doctor.id)]
