"""Clinical routes: consultations, the doctor's patients, records, prescriptions, attachments,
payments, break-glass and notifications. Each declares who may call it; the chart gate
(`access/care.py`) decides per patient."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from phivault.access.break_glass import break_glass
from phivault.access.guards import ANY_ROLE, Allow
from phivault.access.permissions import Role
from phivault.auth.tokens import AccessClaims
from phivault.clinical import attachments, consultations, notifications, records
from phivault.clinical.schemas import (
    AttachmentView,
    BreakGlassAnswer,
    BreakGlassRequest,
    ConsultationUpdate,
    ConsultationView,
    DoctorProposal,
    NotificationView,
    PatientBooking,
    PatientListItem,
    PaymentCreate,
    PaymentView,
    PrescriptionCreate,
    PrescriptionView,
    RecordAmend,
    RecordCreate,
    RecordView,
)
from phivault.errors import InvalidRequest
from phivault.web.dependencies import RuntimeDep, SessionDep
from phivault.web.errors import responses
from phivault.web.pagination import PageDep

router = APIRouter(tags=["clinical"])

Patient = Annotated[AccessClaims, Depends(Allow(Role.PATIENT))]
Doctor = Annotated[AccessClaims, Depends(Allow(Role.DOCTOR))]
Party = Annotated[AccessClaims, Depends(Allow(Role.PATIENT, Role.DOCTOR))]
Anyone = Annotated[AccessClaims, Depends(Allow(*ANY_ROLE))]
CHART = responses(401, 403, 404, 422)
"""Chart routes answer 403 `forbidden` (role), `no_care_relationship` or `no_consent`, and 404
`not_found` for a patient or resource the caller may not know of."""


# Consultations.

@router.post("/consultations", status_code=201, responses=responses(401, 403, 404, 422),
             summary="Book or propose a consultation")
async def create_consultation(body: PatientBooking | DoctorProposal, claims: Party,
                              runtime: RuntimeDep, session: SessionDep) -> ConsultationView:
    """A patient sends `{doctor_id, scheduled_at, reason}`: `scheduled` at once. A doctor sends
    `{patient_id, scheduled_at, reason}`: `scheduled` for a patient they already care for,
    otherwise `proposed` until the patient accepts it."""
    expected = PatientBooking if claims.role == Role.PATIENT else DoctorProposal
    if not isinstance(body, expected):
        raise InvalidRequest("Patients send doctor_id; doctors send patient_id.")
    return await consultations.create(session, runtime.envelope, claims, body)


@router.get("/consultations", responses=responses(401, 403, 422), summary="My consultations")
async def list_consultations(claims: Party, runtime: RuntimeDep, session: SessionDep,
                             page: PageDep, response: Response) -> list[ConsultationView]:
    views, total = await consultations.list_own(session, runtime.envelope, claims, page.limit,
                                                page.offset)
    page.answer(response, total)
    return views


@router.patch("/consultations/{consultation_id}", responses=responses(401, 403, 404, 409, 422),
              summary="Accept, reschedule, complete, cancel, or write notes")
async def update_consultation(consultation_id: uuid.UUID, body: ConsultationUpdate,
                              claims: Party, runtime: RuntimeDep,
                              session: SessionDep) -> ConsultationView:
    """Parties only. `notes`: the doctor. `proposed` → `scheduled`: the patient (accepting).
    `scheduled` → `completed`: the doctor. Either may cancel or reschedule an open one."""
    return await consultations.update(session, runtime.envelope, claims, consultation_id, body)


@router.post("/consultations/{consultation_id}/payments", status_code=201,
             responses=responses(401, 403, 404, 422), summary="Pay for my consultation")
async def pay(consultation_id: uuid.UUID, body: PaymentCreate, claims: Patient,
              session: SessionDep) -> PaymentView:
    """`{amount, currency, provider_reference}`: amount in minor units; card data is never
    accepted (any other field is a 422)."""
    return await consultations.pay(session, claims, consultation_id, body)


@router.get("/me/payments", responses=responses(401, 403, 422), summary="My payments")
async def my_payments(claims: Patient, session: SessionDep, page: PageDep,
                      response: Response) -> list[PaymentView]:
    views, total = await consultations.my_payments(session, claims, page.limit, page.offset)
    page.answer(response, total)
    return views


@router.get("/me/notifications", responses=responses(401, 422), summary="My notifications")
async def my_notifications(claims: Anyone, runtime: RuntimeDep, session: SessionDep,
                           page: PageDep, response: Response) -> list[NotificationView]:
    views, total = await notifications.list_mine(session, runtime.envelope, claims.user_id,
                                                 claims.role == Role.PATIENT, page.limit,
                                                 page.offset)
    page.answer(response, total)
    return views


@router.get("/patients", responses=responses(401, 403, 422), summary="My patients")
async def my_patients(claims: Doctor, runtime: RuntimeDep, session: SessionDep, page: PageDep,
                      response: Response) -> list[PatientListItem]:
    """The patients with whom the calling doctor has a care relationship."""
    items, total = await consultations.patients_of(session, runtime.envelope, claims.user_id,
                                                   page.limit, page.offset)
    page.answer(response, total)
    return items


# Records.

@router.post("/patients/{patient_id}/records", status_code=201, responses=CHART,
             summary="Write a medical record")
async def create_record(patient_id: uuid.UUID, body: RecordCreate, claims: Doctor,
                        runtime: RuntimeDep, session: SessionDep) -> RecordView:
    return await records.create_record(session, runtime.envelope, claims, patient_id, body)


@router.get("/patients/{patient_id}/records", responses=CHART,
            summary="A patient's records (latest versions)")
async def list_records(patient_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                       session: SessionDep, page: PageDep,
                       response: Response) -> list[RecordView]:
    views, total = await records.list_records(session, runtime.envelope, claims, patient_id,
                                              page.limit, page.offset)
    page.answer(response, total)
    return views


@router.get("/records/{record_id}", responses=CHART, summary="A record (latest version)")
async def read_record(record_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                      session: SessionDep) -> RecordView:
    return await records.read_record(session, runtime.envelope, claims, record_id)


@router.patch("/records/{record_id}", responses=CHART, summary="Amend a record (new version)")
async def amend_record(record_id: uuid.UUID, body: RecordAmend, claims: Doctor,
                       runtime: RuntimeDep, session: SessionDep) -> RecordView:
    """Adds a version; fields not sent carry over. No version is ever overwritten."""
    return await records.amend(session, runtime.envelope, claims, record_id, body)


@router.get("/records/{record_id}/versions", responses=CHART, summary="Every version")
async def record_versions(record_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                          session: SessionDep) -> list[RecordView]:
    return await records.versions(session, runtime.envelope, claims, record_id)


# Prescriptions.

@router.post("/patients/{patient_id}/prescriptions", status_code=201, responses=CHART,
             summary="Prescribe")
async def prescribe(patient_id: uuid.UUID, body: PrescriptionCreate, claims: Doctor,
                    runtime: RuntimeDep, session: SessionDep) -> PrescriptionView:
    return await records.prescribe(session, runtime.envelope, claims, patient_id, body)


@router.get("/patients/{patient_id}/prescriptions", responses=CHART,
            summary="A patient's prescriptions")
async def list_prescriptions(patient_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                             session: SessionDep, page: PageDep,
                             response: Response) -> list[PrescriptionView]:
    views, total = await records.list_prescriptions(session, runtime.envelope, claims,
                                                    patient_id, page.limit, page.offset)
    page.answer(response, total)
    return views


# Attachments.

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "PDF, PNG, JPEG or DICOM; at most 25 MiB"}}}}}}}


@router.post("/patients/{patient_id}/attachments", status_code=201,
             responses=responses(401, 403, 404, 413, 415, 422), openapi_extra=UPLOAD_BODY,
             summary="Upload an attachment")
async def upload_attachment(patient_id: uuid.UUID, request: Request, claims: Party,
                            runtime: RuntimeDep, session: SessionDep) -> AttachmentView:
    """Multipart, one part named `file`, at most 25 MiB; its type is decided by its content
    (and must match the part's declared type). Encrypted as it streams in."""
    return await attachments.upload(session, runtime.envelope, claims, patient_id,
                                    request.headers.get("content-type"), request.stream())


@router.get("/patients/{patient_id}/attachments", responses=CHART,
            summary="A patient's attachments (metadata)")
async def list_attachments(patient_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                           session: SessionDep, page: PageDep,
                           response: Response) -> list[AttachmentView]:
    views, total = await attachments.list_attachments(session, runtime.envelope, claims,
                                                      patient_id, page.limit, page.offset)
    page.answer(response, total)
    return views


@router.get("/attachments/{attachment_id}", responses={**CHART, 200: {
    "content": {t: {} for t in attachments.ALLOWED_TYPES},
    "description": "The file, decrypted as it streams."}}, response_class=StreamingResponse,
    summary="Download an attachment")
async def download_attachment(attachment_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                              session: SessionDep) -> StreamingResponse:
    found = await attachments.download(session, runtime.sessions, runtime.envelope, claims,
                                       attachment_id)
    return StreamingResponse(found.body, media_type=found.view.content_type, headers={
        "Content-Length": str(found.view.size),
        "Content-Disposition": "attachment",
        "Cache-Control": "no-store"})


# Break-glass.

@router.post("/patients/{patient_id}/break-glass", status_code=201,
             responses=responses(401, 403, 404, 422), summary="Emergency access")
async def emergency_access(patient_id: uuid.UUID, body: BreakGlassRequest, claims: Doctor,
                           runtime: RuntimeDep, session: SessionDep) -> BreakGlassAnswer:
    """Read access to the patient's chart for 60 minutes, whatever the relationship or
    consent. The reason (20+ characters) is audited; the patient is notified."""
    grant = await break_glass(session, runtime.envelope,
                              runtime.reason_mac, claims, patient_id,
                              body.reason)
    return BreakGlassAnswer(expires_at=grant.expires_at)

