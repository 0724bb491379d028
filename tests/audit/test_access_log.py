"""`GET /api/v1/me/access-log` (SPEC §8): a patient sees every access to their data by someone
else, with who, what, when and whether it was break-glass, and nothing else."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from phivault.audit import search
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.request_context import SYSTEM
from phivault.runtime import Runtime
from phivault.web.app import create_app
from tests.clinical.world import (
    API,
    book,
    break_glass,
    events_of,
    expect,
    set_consent,
    write_record,
)
from tests.factories import TestUser, signed_in


async def access_log(client: httpx.AsyncClient, patient: TestUser,
                     **params: Any) -> tuple[list[dict[str, Any]], httpx.Response]:
    response = await client.get(f"{API}/me/access-log", headers=patient.headers, params=params)
    return expect(response, 200), response


async def test_a_patient_sees_a_doctors_read_and_a_break_glass_read_marked(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient, other = await signed_in(runtime, "patient"), await signed_in(runtime, "patient")
    doctor = await signed_in(runtime, "doctor", full_name="Dr Ada Care")
    rescuer = await signed_in(runtime, "doctor", full_name="Dr Rex Rescue")
    stranger = await signed_in(runtime, "doctor", full_name="Dr Nemo Stranger")
    for who in (patient, other):
        await set_consent(client, who, True)
        await book(client, who, doctor)
    record = await write_record(client, doctor, patient.id)
    await write_record(client, doctor, other.id)  # another patient's data: not in this log
    expect(await client.get(f"{API}/records/{record['id']}", headers=doctor.headers), 200)
    expect(await break_glass(client, rescuer, patient.id), 201)
    expect(await client.get(f"{API}/records/{record['id']}", headers=rescuer.headers), 200)
    expect(await client.get(f"{API}/records/{record['id']}", headers=stranger.headers), 403,
           "no_care_relationship")
    expect(await client.get(f"{API}/records/{record['id']}", headers=patient.headers), 200)
    async with runtime.unit_of_work() as session:  # a job of the system's, on the patient's data
        audit.record(session, Action.DATA_EXPORT, actor=SYSTEM, patient_id=patient.id)

    entries, response = await access_log(client, patient)
    assert response.headers["x-total-count"] == str(len(entries))
    assert set(entries[0]) == {"at", "actor_role", "actor_name", "action", "outcome",
                               "break_glass"}
    seen = [(e["actor_role"], e["actor_name"], e["action"], e["outcome"], e["break_glass"])
            for e in entries]
    # Newest first; the patient's own actions (consent, booking, own read) are not listed.
    assert seen == [
        ("system", None, "DATA_EXPORT", "success", False),
        ("doctor", "Dr Nemo Stranger", "ACCESS_DENIED", "denied", False),
        ("doctor", "Dr Rex Rescue", "VIEW_MEDICAL_RECORD", "success", True),
        ("doctor", "Dr Rex Rescue", "BREAK_GLASS", "success", True),
        ("doctor", "Dr Ada Care", "VIEW_MEDICAL_RECORD", "success", False),
        ("doctor", "Dr Ada Care", "CREATE_MEDICAL_RECORD", "success", False),
    ]
    times = [e["at"] for e in entries]
    assert times == sorted(times, reverse=True)

    # The other patient's log holds only what was done to their data.
    theirs, _ = await access_log(client, other)
    assert [(e["actor_name"], e["action"]) for e in theirs] == [
        ("Dr Ada Care", "CREATE_MEDICAL_RECORD")]


async def test_reading_the_log_is_audited_and_paged(client: httpx.AsyncClient,
                                                   runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    await set_consent(client, patient, True)
    await book(client, patient, doctor)
    record = await write_record(client, doctor, patient.id)
    for _ in range(3):
        expect(await client.get(f"{API}/records/{record['id']}", headers=doctor.headers), 200)

    everything, response = await access_log(client, patient)
    assert len(everything) == 4 and response.headers["x-total-count"] == "4"
    page, response = await access_log(client, patient, limit=2, offset=1)
    assert page == everything[1:3] and response.headers["x-total-count"] == "4"
    request_id = response.headers["x-request-id"]
    (event,) = (await events_of(runtime, [request_id]))[request_id]
    assert (event.action, event.actor_id, event.patient_id, event.event_metadata) == (
        "VIEW_ACCESS_LOG", patient.id, patient.id, {"count": 2, "offset": 1})
    # Reading one's own log is one's own action: it does not show in the log.
    again, _ = await access_log(client, patient)
    assert again == everything
    expect(await client.get(f"{API}/me/access-log?limit=0", headers=patient.headers), 422)


async def test_the_total_is_capped_like_the_audit_search(
        client: httpx.AsyncClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting a million entries for a total would cost more than the page: the total is
    exact up to the cap, and beyond it the cap with `X-Total-Count-Exact: false`."""
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    await set_consent(client, patient, True)
    await book(client, patient, doctor)
    record = await write_record(client, doctor, patient.id)
    for _ in range(3):
        expect(await client.get(f"{API}/records/{record['id']}", headers=doctor.headers), 200)
    monkeypatch.setattr(search, "COUNT_CAP", 4)
    everything, response = await access_log(client, patient)
    assert len(everything) == 4
    assert (response.headers["x-total-count"], response.headers["x-total-count-exact"]) == (
        "4", "true")
    monkeypatch.setattr(search, "COUNT_CAP", 3)
    page, response = await access_log(client, patient, limit=2)
    assert page == everything[:2]
    assert (response.headers["x-total-count"], response.headers["x-total-count-exact"]) == (
        "3", "false")


async def test_an_auditor_reading_a_break_glass_reason_shows_in_the_log(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient, rescuer = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    auditor = await signed_in(runtime, "auditor", full_name="Ann Auditor")
    expect(await break_glass(client, rescuer, patient.id), 201)
    expect(await client.get(f"{API}/audit", headers=auditor.headers, params={
        "patient_id": str(patient.id), "action": "BREAK_GLASS"}), 200)
    entries, _ = await access_log(client, patient)
    assert [(e["actor_role"], e["actor_name"], e["action"]) for e in entries][0] == (
        "auditor", "Ann Auditor", "VIEW_BREAK_GLASS_REASON")


async def test_the_log_carries_no_phi(client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    reason, diagnosis = f"Fainted twice {uuid.uuid4()}", f"Syncope {uuid.uuid4()}"
    await set_consent(client, patient, True)
    await book(client, patient, doctor, reason=reason)
    await write_record(client, doctor, patient.id, diagnosis=diagnosis)
    expect(await break_glass(client, await signed_in(runtime, "doctor"), patient.id), 201)
    _, response = await access_log(client, patient)
    assert reason not in response.text and diagnosis not in response.text
    assert "emergency room" not in response.text  # the break-glass reason


@pytest.mark.parametrize("role", ["doctor", "admin", "auditor"])
async def test_only_patients_have_an_access_log(client: httpx.AsyncClient, runtime: Runtime,
                                                role: str) -> None:
    caller = await signed_in(runtime, role)
    response = await client.get(f"{API}/me/access-log", headers=caller.headers)
    expect(response, 403, "forbidden")
    request_id = response.headers["x-request-id"]
    events = (await events_of(runtime, [request_id]))[request_id]
    assert [(e.action, e.outcome, e.actor_id) for e in events] == [
        ("ACCESS_DENIED", "denied", caller.id)]
    expect(await client.get(f"{API}/me/access-log"), 401)


async def test_the_patient_index_carries_the_actor(runtime: Runtime) -> None:
    """On PostgreSQL the access log's total is an index-only count (migration 0004); Alembic's
    drift check does not compare INCLUDE columns, so this does."""
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no INCLUDE")
    async with runtime.sessions() as session:
        definition = (await session.execute(text(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_audit_events_patient_seq'"))
        ).scalar_one()
    assert definition.endswith("(patient_id, seq) INCLUDE (actor_id)"), definition


async def test_openapi_lists_the_error_answers(runtime: Runtime) -> None:
    route = create_app(runtime=runtime).openapi()["paths"]["/api/v1/me/access-log"]["get"]
    assert {"401", "403", "422"} <= set(route["responses"])
    assert {p["name"] for p in route["parameters"]} == {"limit", "offset"}
