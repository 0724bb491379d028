"""Notifications: a doctor's proposal says who proposed what; the owner marks one read
(`POST /notifications/{id}/read`), nobody else can (404, and an `ACCESS_DENIED` event)."""

from __future__ import annotations

import io
import json
import uuid

import httpx
from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.runtime import Runtime
from tests.clinical.world import API, WHEN, events_of, expect
from tests.factories import TestUser, signed_in


async def _proposed(client: httpx.AsyncClient, runtime: Runtime) -> tuple[
        TestUser, TestUser, dict[str, str]]:
    doctor = await signed_in(runtime, "doctor", full_name="Dr Imogen Quill",
                             specialty="Cardiology")
    patient = await signed_in(runtime, "patient")
    consultation = expect(await client.post(f"{API}/consultations", headers=doctor.headers,
                                            json={"patient_id": str(patient.id),
                                                  "scheduled_at": WHEN,
                                                  "reason": "Palpitations follow-up"}), 201)
    assert consultation["status"] == "proposed"
    return doctor, patient, consultation


async def _mine(client: httpx.AsyncClient, user: TestUser) -> list[dict[str, str]]:
    listed: list[dict[str, str]] = expect(await client.get(f"{API}/me/notifications",
                                                           headers=user.headers), 200)
    return listed


async def test_a_proposal_says_who_proposed_what(client: httpx.AsyncClient,
                                                 runtime: Runtime,
                                                 captured_logs: io.StringIO) -> None:
    _, patient, consultation = await _proposed(client, runtime)
    (notice,) = await _mine(client, patient)
    assert notice["kind"] == "consultation_proposed" and notice["read_at"] is None
    text = notice["text"]
    assert "Dr Imogen Quill (doctor, Cardiology) proposed a consultation" in text
    assert "2031-05-04 10:00 UTC" in text and consultation["id"] in text
    assert "accept" in text.lower() and "cancel" in text.lower()
    # The text is sealed at rest and written nowhere else: no log line, no audit metadata.
    async with runtime.sessions() as session:
        metadata = (await session.execute(select(AuditEvent.event_metadata).where(
            AuditEvent.patient_id == patient.id))).scalars().all()
    assert metadata
    written = captured_logs.getvalue() + json.dumps(metadata, default=str)
    # (The doctor's name itself is staff directory data, stored in clear on purpose.)
    assert "proposed a consultation" not in written and "Palpitations" not in written


async def test_the_owner_marks_a_notification_read_once(client: httpx.AsyncClient,
                                                        runtime: Runtime) -> None:
    _, patient, _ = await _proposed(client, runtime)
    (notice,) = await _mine(client, patient)
    marked = await client.post(f"{API}/notifications/{notice['id']}/read",
                               headers=patient.headers)
    read = expect(marked, 200)
    assert read["id"] == notice["id"] and read["text"] == notice["text"]
    assert read["read_at"] is not None
    assert marked.headers["cache-control"] == "no-store"
    again = expect(await client.post(f"{API}/notifications/{notice['id']}/read",
                                     headers=patient.headers), 200)
    assert again["read_at"] == read["read_at"]  # the first time stays
    assert [n["read_at"] for n in await _mine(client, patient)] == [read["read_at"]]
    events = (await events_of(runtime, [marked.headers["x-request-id"]]))[
        marked.headers["x-request-id"]]
    assert [(e.action, e.outcome, e.resource_id, e.patient_id) for e in events] == [
        ("UPDATE_NOTIFICATION", "success", notice["id"], patient.id)]


async def test_another_users_notification_is_404(client: httpx.AsyncClient,
                                                 runtime: Runtime) -> None:
    doctor, patient, _ = await _proposed(client, runtime)
    (notice,) = await _mine(client, patient)
    for intruder in (doctor, await signed_in(runtime, "patient"),
                     await signed_in(runtime, "admin")):
        refused = await client.post(f"{API}/notifications/{notice['id']}/read",
                                    headers=intruder.headers)
        expect(refused, 404, "not_found")
        events = (await events_of(runtime, [refused.headers["x-request-id"]]))[
            refused.headers["x-request-id"]]
        assert [(e.action, e.outcome, e.actor_id) for e in events] == [
            ("ACCESS_DENIED", "denied", intruder.id)]
    expect(await client.post(f"{API}/notifications/{uuid.uuid4()}/read",
                             headers=patient.headers), 404, "not_found")
    expect(await client.post(f"{API}/notifications/not-an-id/read", headers=patient.headers),
           422)
    expect(await client.post(f"{API}/notifications/{notice['id']}/read"), 401)
    # Still unread: nobody but its owner touched it.
    assert [n["read_at"] for n in await _mine(client, patient)] == [None]


def test_marking_read_is_a_fhir_update_of_the_patient_record() -> None:
    from phivault.audit.actions import Action
    from phivault.audit.fhir import action_code, event_type

    assert action_code(Action.UPDATE_NOTIFICATION) == "U"
    assert event_type(Action.UPDATE_NOTIFICATION) == ("110110", "Patient Record")
