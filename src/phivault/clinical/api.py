"""Clinical routes: consultations, the patient's care team, the doctor's patients, records,
prescriptions, attachments, payments, break-glass and notifications. Each declares who may call
it; the chart gate (`access/care.py`) decides per patient."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Request, Response
from fastapi.responses import StreamingResponse

from phivault.access import care_team
from phivault.access.break_glass import break_glass
from phivault.access.guards import ANY_ROLE, Allow
from phivault.access.permissions import Role
from phivault.access.schemas import CareTeamMember
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
from phivault.ops.mail import outbox_for
from phivault.web.dependencies import RuntimeDep, SessionDep
from phivault.web.errors import responses
from phivault.web.gates import gate_of
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
    return await consultations.create(session, runtime.envelope, claims, body,
                                      care_days=runtime.settings.care_relationship_days)


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
    `scheduled` → `completed`: the doctor, once its scheduled time has passed (409 `conflict`
    before). Either may cancel an open one, or move it to a time still to come (422 otherwise)."""
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


@router.get("/me/care-team", responses=responses(401, 403, 422), summary="My care team")
async def my_care_team(claims: Patient, runtime: RuntimeDep, session: SessionDep,
                       page: PageDep, response: Response) -> list[CareTeamMember]:
    """The doctors with a care relationship with me now, by name: a consultation `scheduled`
    (`basis: scheduled`, `until: null`), or one `completed` within the last
    `PHIVAULT_CARE_RELATIONSHIP_DAYS` (`basis: completed`, `until`: when it lapses). `since`:
    when today's unbroken relationship began. Each may read my chart while my consent has
    `data_sharing`; `DELETE /me/care-team/{doctor_id}` ends one's access at once."""
    members, total = await care_team.care_team(
        session, claims.user_id, page.limit, page.offset,
        care_days=runtime.settings.care_relationship_days)
    page.answer(response, total)
    return members


@router.delete("/me/care-team/{doctor_id}", status_code=204,
               responses=responses(401, 403, 404, 422), summary="End a doctor's access")
async def end_care_relationship(doctor_id: uuid.UUID, claims: Patient, runtime: RuntimeDep,
                                session: SessionDep) -> Response:
    """Ends that doctor's care relationship with me at once: their consultations with me so
    far (completed ones too) grant nothing any more, and the open ones are cancelled. Only a
    new consultation I book, or a proposal of theirs I accept, restores it. 404 `not_found`
    when that doctor has no care relationship with me."""
    await care_team.end_care(session, claims.user_id, doctor_id,
                             care_days=runtime.settings.care_relationship_days)
    return Response(status_code=204)


@router.get("/patients", responses=responses(401, 403, 422), summary="My patients")
async def my_patients(claims: Doctor, runtime: RuntimeDep, session: SessionDep, page: PageDep,
                      response: Response) -> list[PatientListItem]:
    """The patients with whom the calling doctor has a care relationship now."""
    items, total = await consultations.patients_of(
        session, runtime.envelope, claims.user_id, page.limit, page.offset,
        care_days=runtime.settings.care_relationship_days)
    page.answer(response, total)
    return items


# Records.

@router.post("/patients/{patient_id}/records", status_code=201, responses=CHART,
             summary="Write a medical record")
async def create_record(patient_id: uuid.UUID, body: RecordCreate, claims: Doctor,
                        runtime: RuntimeDep, session: SessionDep) -> RecordView:
    return await records.create_record(session, runtime.envelope, claims, patient_id, body,
                                       care_days=runtime.settings.care_relationship_days)


@router.get("/patients/{patient_id}/records", responses=CHART,
            summary="A patient's records (latest versions)")
async def list_records(patient_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                       session: SessionDep, page: PageDep,
                       response: Response) -> list[RecordView]:
    views, total = await records.list_records(
        session, runtime.envelope, claims, patient_id, page.limit, page.offset,
        care_days=runtime.settings.care_relationship_days)
    page.answer(response, total)
    return views


@router.get("/records/{record_id}", responses=CHART, summary="A record (latest version)")
async def read_record(record_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                      session: SessionDep) -> RecordView:
    return await records.read_record(session, runtime.envelope, claims, record_id,
                                     care_days=runtime.settings.care_relationship_days)


@router.patch("/records/{record_id}", responses=CHART, summary="Amend a record (new version)")
async def amend_record(record_id: uuid.UUID, body: RecordAmend, claims: Doctor,
                       runtime: RuntimeDep, session: SessionDep) -> RecordView:
    """Adds a version; fields not sent carry over. No version is ever overwritten."""
    return await records.amend(session, runtime.envelope, claims, record_id, body,
                               care_days=runtime.settings.care_relationship_days)


@router.get("/records/{record_id}/versions", responses=CHART, summary="Every version")
async def record_versions(record_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                          session: SessionDep) -> list[RecordView]:
    return await records.versions(session, runtime.envelope, claims, record_id,
                                  care_days=runtime.settings.care_relationship_days)


# Prescriptions.

@router.post("/patients/{patient_id}/prescriptions", status_code=201, responses=CHART,
             summary="Prescribe")
async def prescribe(patient_id: uuid.UUID, body: PrescriptionCreate, claims: Doctor,
                    runtime: RuntimeDep, session: SessionDep) -> PrescriptionView:
    return await records.prescribe(session, runtime.envelope, claims, patient_id, body,
                                   care_days=runtime.settings.care_relationship_days)


@router.get("/patients/{patient_id}/prescriptions", responses=CHART,
            summary="A patient's prescriptions")
async def list_prescriptions(patient_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                             session: SessionDep, page: PageDep,
                             response: Response) -> list[PrescriptionView]:
    views, total = await records.list_prescriptions(
        session, runtime.envelope, claims, patient_id, page.limit, page.offset,
        care_days=runtime.settings.care_relationship_days)
    page.answer(response, total)
    return views


# Attachments.

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "PDF, PNG, JPEG or DICOM; at most 25 MiB"}}}}}}}


async def _upload_place(request: Request, claims: Party) -> AsyncIterator[None]:
    """A place in the upload gate for the request's whole life (`web/gates.py`): each upload
    holds its sealed spool until its body is in."""
    with gate_of(request, "upload", attachments.UPLOADS_PER_PROCESS,
                 attachments.UPLOADS_PER_ACCOUNT).held(claims.user_id):
        yield


@router.post("/patients/{patient_id}/attachments", status_code=201,
             responses=responses(401, 403, 404, 413, 415, 422, 429), openapi_extra=UPLOAD_BODY,
             summary="Upload an attachment", dependencies=[Depends(_upload_place)])
async def upload_attachment(patient_id: uuid.UUID, request: Request, claims: Party,
                            runtime: RuntimeDep, session: SessionDep) -> AttachmentView:
    """Multipart, one part named `file`, at most 25 MiB; its type is decided by its content
    (and must match the part's declared type). Encrypted as it streams in, and stored once
    the whole body is in. At most two uploads at once per account (and 64 per server
    process): beyond that, 429 `rate_limited` with `Retry-After`."""
    return await attachments.upload(session, runtime.envelope, claims, patient_id,
                                    request.headers.get("content-type"), request.stream(),
                                    care_days=runtime.settings.care_relationship_days)


@router.get("/patients/{patient_id}/attachments", responses=CHART,
            summary="A patient's attachments (metadata)")
async def list_attachments(patient_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                           session: SessionDep, page: PageDep,
                           response: Response) -> list[AttachmentView]:
    views, total = await attachments.list_attachments(
        session, runtime.envelope, claims, patient_id, page.limit, page.offset,
        care_days=runtime.settings.care_relationship_days)
    page.answer(response, total)
    return views


@router.get("/attachments/{attachment_id}", responses={**CHART, 200: {
    "content": {t: {} for t in attachments.ALLOWED_TYPES},
    "description": "The file, decrypted as it streams."}}, response_class=StreamingResponse,
    summary="Download an attachment")
async def download_attachment(attachment_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                              session: SessionDep) -> StreamingResponse:
    found = await attachments.download(session, runtime.sessions, runtime.envelope, claims,
                                       attachment_id,
                                       care_days=runtime.settings.care_relationship_days)
    return StreamingResponse(found.body, media_type=found.view.content_type, headers={
        "Content-Length": str(found.view.size),
        "Content-Disposition": "attachment",
        "Cache-Control": "no-store"})


# Break-glass.

@router.post("/patients/{patient_id}/break-glass", status_code=201,
             responses=responses(401, 403, 404, 422), summary="Emergency access")
async def emergency_access(patient_id: uuid.UUID, body: BreakGlassRequest, claims: Doctor,
                           runtime: RuntimeDep, session: SessionDep,
                           tasks: BackgroundTasks) -> BreakGlassAnswer:
    """Read access to the patient's chart for 60 minutes, whatever the relationship or
    consent. The reason (20+ characters) is audited; the patient is notified (in the app, and
    by mail when `PHIVAULT_SMTP_URL` is set: when, never why)."""
    grant = await break_glass(session, runtime.envelope,
                              runtime.reason_mac, claims, patient_id,
                              body.reason, outbox=outbox_for(runtime, tasks))
    return BreakGlassAnswer(expires_at=grant.expires_at)

