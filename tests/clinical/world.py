"""Helpers of the clinical tests: HTTP shorthands, multipart bodies, files of each allowed type,
audit look-ups, and `build_world`, the cast of the authorization matrix (SPEC §7)."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select, update

from phivault.audit.models import AuditEvent
from phivault.clinical.models import BreakGlassGrant, Consultation
from phivault.db.base import utcnow
from phivault.runtime import Runtime
from tests.factories import TestUser, signed_in

API = "/api/v1"
WHEN = "2031-05-04T10:00:00+00:00"
LATER = "2031-06-01T09:30:00+00:00"
BREAK_GLASS_REASON = "Unconscious in the emergency room, allergies unknown"
BOUNDARY = "phivault-test-boundary-Qx7Rm2Lk9"

MAGIC = {
    "application/pdf": b"%PDF-1.7\n",
    "image/png": b"\x89PNG\r\n\x1a\n",
    "image/jpeg": b"\xff\xd8\xff\xe0",
    "application/dicom": bytes(128) + b"DICM",
}


def file_of(content_type: str, size: int, *, seed: int = 0) -> bytes:
    """`size` bytes that start with the magic bytes of `content_type`, then random filler."""
    head = MAGIC[content_type]
    assert size >= len(head)
    return head + random.Random(f"{seed}/{size}").randbytes(size - len(head))


def multipart(data: bytes, *, filename: str = "scan.png", content_type: str = "image/png",
              name: str = "file") -> tuple[str, bytes]:
    """A multipart/form-data body with one file part: (Content-Type header, body)."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n").encode()
    return (f"multipart/form-data; boundary={BOUNDARY}",
            head + data + f"\r\n--{BOUNDARY}--\r\n".encode())


async def _pieces(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


async def upload(client: httpx.AsyncClient, user: TestUser | None, patient_id: uuid.UUID,
                 data: bytes, *, filename: str = "scan.png", content_type: str = "image/png",
                 chunk: int | None = None) -> httpx.Response:
    """Upload one file. With `chunk`, the body streams in pieces of that size, without a
    Content-Length (chunked transfer encoding); otherwise it is sent whole, with one."""
    kind, body = multipart(data, filename=filename, content_type=content_type)
    headers = {"Content-Type": kind, **(user.headers if user else {})}
    content: bytes | AsyncIterator[bytes] = _pieces(body, chunk) if chunk else body
    return await client.post(f"{API}/patients/{patient_id}/attachments", headers=headers,
                             content=content)


def expect(response: httpx.Response, status: int, error: str | None = None) -> Any:
    """Assert the status (and error code); return the JSON body, if any."""
    assert response.status_code == status, (response.request.method, response.request.url.path,
                                            response.status_code, response.text[:500])
    if error is not None:
        assert response.json()["error"] == error, response.text[:500]
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return None


async def set_consent(client: httpx.AsyncClient, patient: TestUser, data_sharing: bool) -> None:
    expect(await client.put(f"{API}/me/consents", headers=patient.headers, json={
        "marketing": False, "data_sharing": data_sharing, "analytics": False}), 200)


async def book(client: httpx.AsyncClient, patient: TestUser, doctor: TestUser,
               reason: str = "Persistent cough") -> dict[str, Any]:
    """The patient books the doctor: `scheduled` at once."""
    body = expect(await client.post(f"{API}/consultations", headers=patient.headers, json={
        "doctor_id": str(doctor.id), "scheduled_at": WHEN, "reason": reason}), 201)
    assert body["status"] == "scheduled"
    return dict(body)


async def propose(client: httpx.AsyncClient, doctor: TestUser, patient: TestUser,
                  reason: str = "Follow-up of your test results") -> dict[str, Any]:
    return dict(expect(await client.post(f"{API}/consultations", headers=doctor.headers, json={
        "patient_id": str(patient.id), "scheduled_at": WHEN, "reason": reason}), 201))


async def set_status(client: httpx.AsyncClient, user: TestUser, consultation_id: object,
                     status: str) -> dict[str, Any]:
    return dict(expect(await client.patch(f"{API}/consultations/{consultation_id}",
                                          headers=user.headers, json={"status": status}), 200))


async def write_record(client: httpx.AsyncClient, doctor: TestUser, patient_id: uuid.UUID,
                       diagnosis: str = "Acute bronchitis") -> dict[str, Any]:
    return dict(expect(await client.post(
        f"{API}/patients/{patient_id}/records", headers=doctor.headers,
        json={"diagnosis": diagnosis, "prescriptions": ["Rest"], "notes": "Review in a week"}),
        201))


async def prescribe(client: httpx.AsyncClient, doctor: TestUser,
                    patient_id: uuid.UUID) -> dict[str, Any]:
    return dict(expect(await client.post(
        f"{API}/patients/{patient_id}/prescriptions", headers=doctor.headers,
        json={"medication": "Amoxicillin", "dosage": "500 mg", "instructions": "Three a day"}),
        201))


async def break_glass(client: httpx.AsyncClient, doctor: TestUser,
                      patient_id: uuid.UUID) -> httpx.Response:
    return await client.post(f"{API}/patients/{patient_id}/break-glass", headers=doctor.headers,
                             json={"reason": BREAK_GLASS_REASON})


async def expire_break_glass(rt: Runtime, doctor_id: uuid.UUID, patient_id: uuid.UUID) -> None:
    """Move the doctor's grants for the patient into the past (as if 61 minutes had gone)."""
    async with rt.unit_of_work() as session:
        await session.execute(update(BreakGlassGrant).where(
            BreakGlassGrant.doctor_id == doctor_id, BreakGlassGrant.patient_id == patient_id)
            .values(expires_at=utcnow() - timedelta(seconds=1)))


async def move_consultation(rt: Runtime, consultation_id: object, *,
                            ago: timedelta = timedelta(hours=1)) -> None:
    """Move a consultation's scheduled time into the past (`ago` before now), as if its time
    had come: only then may the doctor complete it."""
    async with rt.unit_of_work() as session:
        await session.execute(update(Consultation).where(
            Consultation.id == uuid.UUID(str(consultation_id)))
            .values(scheduled_at=utcnow() - ago))


async def complete(rt: Runtime, client: httpx.AsyncClient, doctor: TestUser,
                   consultation_id: object, *,
                   ago: timedelta = timedelta(hours=1)) -> dict[str, Any]:
    """The consultation took place `ago` before now, and the doctor marks it completed."""
    await move_consultation(rt, consultation_id, ago=ago)
    return await set_status(client, doctor, consultation_id, "completed")


async def events_of(rt: Runtime, request_ids: Iterable[str]) -> dict[str, list[AuditEvent]]:
    """The audit events of each request id, in chain order."""
    ids = list(request_ids)
    found: dict[str, list[AuditEvent]] = {i: [] for i in ids}
    async with rt.sessions() as session:
        for start in range(0, len(ids), 500):
            rows = (await session.execute(select(AuditEvent).where(
                AuditEvent.request_id.in_(ids[start:start + 500]))
                .order_by(AuditEvent.seq))).scalars().all()
            for row in rows:
                found[str(row.request_id)].append(row)
    return found


# The cast of the authorization matrix.

@dataclass
class Chart:
    """A patient and one of each kind of their data, all written by `doctor_care`."""

    patient: TestUser
    doctor: TestUser  # doctor_care
    consultation_id: str  # the consultation with doctor_care (scheduled)
    record_id: str
    prescription_id: str
    attachment_id: str
    notification_id: str = ""  # the patient's notice of the break-glass read


@dataclass
class Caller:
    user: TestUser | None  # None: no token at all
    chart: Chart  # whose data the caller asks for


@dataclass
class World:
    users: dict[str, TestUser]
    charts: dict[str, Chart]
    callers: dict[str, Caller] = field(default_factory=dict)


CALLERS = (
    "anonymous",
    "self",                    # the patient themself
    "other_patient",           # another patient
    "doctor_care",             # a scheduled consultation; the patient consents
    "doctor_completed",        # a completed consultation; the patient consents
    "doctor_none",             # no consultation at all
    "doctor_proposed",         # proposed by the doctor, never accepted
    "doctor_cancelled",        # the only consultation was cancelled
    "doctor_no_consent",       # a scheduled consultation; the patient withdrew data_sharing
    "break_glass",             # no relationship, an active break-glass grant
    "break_glass_no_consent",  # the same, for a patient who does not consent
    "break_glass_expired",     # no relationship, a break-glass grant 61 minutes old
    "admin",
    "auditor",
)


async def build_world(rt: Runtime, client: httpx.AsyncClient) -> World:
    """Patients P (consents) and Q (withdrew consent), another patient O, a doctor per caller
    kind, an admin and an auditor, all signed in; P and Q each have a consultation with
    doctor_care, a record, a prescription and an attachment."""
    users = {"P": await signed_in(rt, "patient"), "Q": await signed_in(rt, "patient"),
             "O": await signed_in(rt, "patient")}
    for name in ("care", "completed", "none", "proposed", "cancelled", "bg", "bg_expired"):
        users[name] = await signed_in(rt, "doctor", full_name=f"Dr {name.title()}",
                                      specialty="General practice")
    users["admin"] = await signed_in(rt, "admin")
    users["auditor"] = await signed_in(rt, "auditor")
    p, q = users["P"], users["Q"]

    charts = {}
    for key, patient in (("P", p), ("Q", q)):
        await set_consent(client, patient, True)
        consultation = await book(client, patient, users["care"])
        record = await write_record(client, users["care"], patient.id)
        prescription = await prescribe(client, users["care"], patient.id)
        attachment = expect(await upload(client, patient, patient.id,
                                         file_of("image/png", 300)), 201)
        charts[key] = Chart(patient, users["care"], consultation["id"], record["id"],
                            prescription["id"], attachment["id"])
    await set_consent(client, q, False)  # the newest consent is what counts

    done = await book(client, p, users["completed"])
    await complete(rt, client, users["completed"], done["id"])
    proposal = await propose(client, users["proposed"], p)
    assert proposal["status"] == "proposed"
    cancelled = await book(client, p, users["cancelled"])
    await set_status(client, p, cancelled["id"], "cancelled")
    for key, patient in (("P", p), ("Q", q)):
        expect(await break_glass(client, users["bg"], patient.id), 201)
        notices = expect(await client.get(f"{API}/me/notifications", headers=patient.headers),
                         200)
        charts[key].notification_id = next(n["id"] for n in notices if n["kind"] == "break_glass")
    expect(await break_glass(client, users["bg_expired"], p.id), 201)
    await expire_break_glass(rt, users["bg_expired"].id, p.id)

    on_p, on_q = charts["P"], charts["Q"]
    world = World(users, charts)
    world.callers = {
        "anonymous": Caller(None, on_p),
        "self": Caller(p, on_p),
        "other_patient": Caller(users["O"], on_p),
        "doctor_care": Caller(users["care"], on_p),
        "doctor_completed": Caller(users["completed"], on_p),
        "doctor_none": Caller(users["none"], on_p),
        "doctor_proposed": Caller(users["proposed"], on_p),
        "doctor_cancelled": Caller(users["cancelled"], on_p),
        "doctor_no_consent": Caller(users["care"], on_q),
        "break_glass": Caller(users["bg"], on_p),
        "break_glass_no_consent": Caller(users["bg"], on_q),
        "break_glass_expired": Caller(users["bg_expired"], on_p),
        "admin": Caller(users["admin"], on_p),
        "auditor": Caller(users["auditor"], on_p),
    }
    assert set(world.callers) == set(CALLERS)
    return world
