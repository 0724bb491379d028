"""Every clinical read and write leaves its audit event (SPEC §8): the right action, actor,
patient and outcome, in the request's own transaction, and no PHI in any column."""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from phivault.audit.models import AuditEvent
from phivault.runtime import Runtime
from tests.clinical.world import (
    API,
    BREAK_GLASS_REASON,
    book,
    break_glass,
    events_of,
    expect,
    set_consent,
    upload,
)
from tests.conftest import CLIENT_IP
from tests.factories import TestUser, signed_in

ANY = object()


@dataclass(frozen=True)
class Ev:
    action: str
    actor: TestUser
    patient: object  # a UUID, None, or ANY
    outcome: str = "success"
    resource_id: object = ANY
    metadata: dict[str, Any] = field(default_factory=dict)  # a subset to find


@dataclass
class Ledger:
    """Requests made, and the events each must have left."""

    rt: Runtime
    steps: list[tuple[str, str, list[Ev]]] = field(default_factory=list)

    def expect(self, label: str, response: httpx.Response, *events: Ev) -> None:
        self.steps.append((label, response.headers["x-request-id"], list(events)))

    async def problems(self, plaintexts: list[str]) -> list[str]:
        found = await events_of(self.rt, [request_id for _, request_id, _ in self.steps])
        wrong = []
        for label, request_id, wanted in self.steps:
            actual = list(found[request_id])
            for event in actual:
                wrong += [f"{label}: {p}" for p in column_problems(event, plaintexts)]
            for want in wanted:
                match = next((e for e in actual if matches(e, want)), None)
                if match is None:
                    wrong.append(f"{label}: no {want.action} by {want.actor.role} with patient "
                                 f"{want.patient} / {want.outcome}; got {describe(actual)}")
                else:
                    actual.remove(match)
            if actual:
                wrong.append(f"{label}: unexpected events {describe(actual)}")
        return wrong


def matches(event: AuditEvent, want: Ev) -> bool:
    return (event.action == want.action and event.actor_id == want.actor.id
            and event.actor_role == want.actor.role and event.outcome == want.outcome
            and (want.patient is ANY or event.patient_id == want.patient)
            and (want.resource_id is ANY or event.resource_id == str(want.resource_id))
            and all(event.event_metadata.get(k) == v for k, v in want.metadata.items()))


def describe(events: list[AuditEvent]) -> list[tuple[object, ...]]:
    return [(e.action, e.actor_role, e.patient_id, e.outcome) for e in events]


def column_problems(event: AuditEvent, plaintexts: list[str]) -> list[str]:
    problems = []
    if event.ip != CLIENT_IP or event.user_agent != "phivault-tests/1":
        problems.append(f"{event.action} has ip {event.ip!r}, user agent {event.user_agent!r}")
    columns = {c.key: getattr(event, c.key) for c in AuditEvent.__mapper__.column_attrs}
    text = json.dumps({k: v.hex() if isinstance(v, bytes) else str(v)
                       for k, v in columns.items()}) + json.dumps(event.event_metadata)
    for value in event.event_metadata.values():
        assert value is None or isinstance(value, str | int | bool)
    leaked = [p for p in plaintexts if p in text or p.lower() in text.lower()]
    if leaked:
        problems.append(f"{event.action} holds PHI {leaked}")
    return problems


async def test_every_clinical_read_and_write_is_audited_without_phi(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    tag = secrets.token_hex(5)
    phi = {"reason": f"Chest pain on exertion {tag}", "notes": f"ECG shows ST changes {tag}",
           "diagnosis": f"Stable angina {tag}", "line": f"Nitroglycerin spray {tag}",
           "record_notes": f"Smoker, 20 a day {tag}", "amended": f"Quit smoking {tag}",
           "medication": f"Bisoprolol {tag}", "dosage": f"5 mg {tag}",
           "instructions": f"Every morning with water {tag}", "filename": f"ecg-{tag}.png"}
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    stranger, rescuer = await signed_in(runtime, "doctor"), await signed_in(runtime, "doctor")
    admin, auditor = await signed_in(runtime, "admin"), await signed_in(runtime, "auditor")
    pid = patient.id
    log = Ledger(runtime)

    response = await client.put(f"{API}/me/consents", headers=patient.headers, json={
        "marketing": False, "data_sharing": True, "analytics": False})
    expect(response, 200)
    log.expect("consent", response, Ev("CONSENT_CHANGED", patient, pid,
                                        metadata={"data_sharing": True}))

    response = await client.post(f"{API}/consultations", headers=patient.headers, json={
        "doctor_id": str(doctor.id), "scheduled_at": "2031-01-02T10:00:00Z",
        "reason": phi["reason"]})
    consultation = expect(response, 201)
    log.expect("book", response, Ev("CREATE_CONSULTATION", patient, pid,
                                     resource_id=consultation["id"]))

    response = await client.patch(f"{API}/consultations/{consultation['id']}",
                                  headers=doctor.headers, json={"notes": phi["notes"]})
    expect(response, 200)
    log.expect("notes", response, Ev("UPDATE_CONSULTATION", doctor, pid,
                                      resource_id=consultation["id"]))

    response = await client.get(f"{API}/consultations", headers=doctor.headers)
    expect(response, 200)
    log.expect("list consultations", response, Ev("VIEW_CONSULTATION", doctor, pid,
                                                   resource_id=consultation["id"]))

    response = await client.post(f"{API}/patients/{pid}/records", headers=doctor.headers, json={
        "diagnosis": phi["diagnosis"], "prescriptions": [phi["line"]],
        "notes": phi["record_notes"]})
    record = expect(response, 201)
    log.expect("write record", response, Ev("CREATE_MEDICAL_RECORD", doctor, pid,
                                             resource_id=record["id"]))

    response = await client.get(f"{API}/records/{record['id']}", headers=doctor.headers)
    expect(response, 200)
    log.expect("read record", response, Ev("VIEW_MEDICAL_RECORD", doctor, pid,
                                            resource_id=record["id"],
                                            metadata={"break_glass": False}))

    response = await client.patch(f"{API}/records/{record['id']}", headers=doctor.headers,
                                  json={"notes": phi["amended"]})
    assert expect(response, 200)["version"] == 2
    log.expect("amend record", response, Ev("UPDATE_MEDICAL_RECORD", doctor, pid,
                                             resource_id=record["id"]))

    response = await client.get(f"{API}/records/{record['id']}/versions",
                                headers=doctor.headers)
    assert len(expect(response, 200)) == 2
    log.expect("versions", response, Ev("VIEW_MEDICAL_RECORD", doctor, pid,
                                         resource_id=record["id"]))

    response = await client.get(f"{API}/patients/{pid}/records", headers=patient.headers)
    expect(response, 200)
    log.expect("own records", response, Ev("VIEW_MEDICAL_RECORD", patient, pid,
                                            resource_id=record["id"]))

    response = await client.post(f"{API}/patients/{pid}/prescriptions", headers=doctor.headers,
                                 json={"medication": phi["medication"], "dosage": phi["dosage"],
                                       "instructions": phi["instructions"]})
    prescription = expect(response, 201)
    log.expect("prescribe", response, Ev("CREATE_PRESCRIPTION", doctor, pid,
                                          resource_id=prescription["id"]))

    response = await client.get(f"{API}/patients/{pid}/prescriptions", headers=patient.headers)
    expect(response, 200)
    log.expect("own prescriptions", response, Ev("VIEW_PRESCRIPTION", patient, pid,
                                                  resource_id=prescription["id"]))

    response = await upload(client, patient, pid, b"\x89PNG\r\n\x1a\n" + bytes(500),
                            filename=phi["filename"])
    attachment = expect(response, 201)
    log.expect("upload", response, Ev("CREATE_ATTACHMENT", patient, pid,
                                       resource_id=attachment["id"]))

    response = await client.get(f"{API}/attachments/{attachment['id']}", headers=doctor.headers)
    assert response.status_code == 200
    log.expect("download", response, Ev("VIEW_ATTACHMENT", doctor, pid,
                                         resource_id=attachment["id"]))

    response = await client.get(f"{API}/patients/{pid}/attachments", headers=doctor.headers)
    expect(response, 200)
    log.expect("list attachments", response, Ev("VIEW_ATTACHMENT", doctor, pid))

    response = await client.post(f"{API}/consultations/{consultation['id']}/payments",
                                 headers=patient.headers, json={
                                     "amount": 9900, "currency": "GBP",
                                     "provider_reference": "ch_1Nq2"})
    payment = expect(response, 201)
    log.expect("pay", response, Ev("CREATE_PAYMENT", patient, pid, resource_id=payment["id"]))

    response = await client.get(f"{API}/me/payments", headers=patient.headers)
    expect(response, 200)
    log.expect("own payments", response, Ev("VIEW_PAYMENT", patient, pid))

    response = await client.get(f"{API}/patients", headers=doctor.headers)
    assert [p["id"] for p in expect(response, 200)] == [str(pid)]
    log.expect("patient list", response, Ev("VIEW_PATIENT_LIST", doctor, ANY))

    # Break-glass: the event names the grant, whose reason is sealed (PHI, issue 8 item 7);
    # reads under it say so.
    response = await break_glass(client, rescuer, pid)
    expect(response, 201)
    log.expect("break-glass", response, Ev("BREAK_GLASS", rescuer, pid))
    response = await client.get(f"{API}/records/{record['id']}", headers=rescuer.headers)
    expect(response, 200)
    log.expect("break-glass read", response, Ev(
        "VIEW_MEDICAL_RECORD", rescuer, pid, resource_id=record["id"],
        metadata={"break_glass": True, "basis": "break_glass"}))

    # Denials: ACCESS_DENIED by the caller, outcome denied, and the denied write left nothing.
    response = await client.get(f"{API}/records/{record['id']}", headers=stranger.headers)
    expect(response, 403, "no_care_relationship")
    log.expect("stranger reads", response, Ev("ACCESS_DENIED", stranger, pid, "denied"))
    response = await client.post(f"{API}/patients/{pid}/records", headers=rescuer.headers,
                                  json={"diagnosis": phi["diagnosis"], "prescriptions": []})
    expect(response, 403, "no_care_relationship")
    log.expect("break-glass write", response, Ev("ACCESS_DENIED", rescuer, pid, "denied"))
    response = await client.get(f"{API}/patients/{pid}/records", headers=admin.headers)
    expect(response, 403, "forbidden")
    log.expect("admin reads", response, Ev("ACCESS_DENIED", admin, ANY, "denied"))
    response = await client.get(f"{API}/attachments/{attachment['id']}",
                                headers=auditor.headers)
    expect(response, 403, "forbidden")
    log.expect("auditor downloads", response, Ev("ACCESS_DENIED", auditor, ANY, "denied"))
    other = await signed_in(runtime, "patient")
    response = await client.get(f"{API}/records/{record['id']}", headers=other.headers)
    expect(response, 404, "not_found")
    log.expect("other patient reads", response, Ev("ACCESS_DENIED", other, ANY, "denied"))
    response = await client.get(f"{API}/records/{uuid.uuid4()}", headers=doctor.headers)
    expect(response, 404, "not_found")
    log.expect("no such record", response, Ev("ACCESS_DENIED", doctor, None, "denied"))

    problems = await log.problems([*phi.values(), BREAK_GLASS_REASON])
    assert problems == [], "\n".join(problems)


async def test_a_denied_write_leaves_only_its_denial(client: httpx.AsyncClient,
                                                     runtime: Runtime) -> None:
    """The work of a refused request rolls back; the ACCESS_DENIED event stays (durable)."""
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    await book(client, patient, doctor)  # a care relationship, but no consent yet
    await set_consent(client, patient, False)
    response = await client.post(f"{API}/patients/{patient.id}/prescriptions",
                                 headers=doctor.headers, json={
                                     "medication": "Aspirin", "dosage": "75 mg",
                                     "instructions": "Daily"})
    expect(response, 403, "no_consent")
    request_id = response.headers["x-request-id"]
    events = (await events_of(runtime, [request_id]))[request_id]
    assert [(e.action, e.outcome, e.actor_id, e.patient_id, e.event_metadata.get("reason"))
            for e in events] == [("ACCESS_DENIED", "denied", doctor.id, patient.id,
                                  "no_consent")]


async def test_reading_notifications_is_audited_as_the_patients_data(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    """A notification's text is PHI (SPEC §4): reading it is a VIEW_NOTIFICATION whose
    patient_id ("whose data", SPEC §8) is the patient's, so it shows in their access log."""
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    expect(await break_glass(client, doctor, patient.id), 201)
    response = await client.get(f"{API}/me/notifications", headers=patient.headers)
    assert [n["kind"] for n in expect(response, 200)] == ["break_glass"]
    log = Ledger(runtime)
    log.expect("notifications", response, Ev("VIEW_NOTIFICATION", patient, patient.id))
    problems = await log.problems([])
    assert problems == [], "\n".join(problems)
