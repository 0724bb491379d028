"""Clinical routes: consultations, the patient's care team, the doctor's patients, records,
prescriptions, attachments, payments, break-glass and notifications. Each declares who may call
it; the chart gate (`access/care.py`) decides per patient."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Body, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

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
from phivault.ops.mail import outbox_for
from phivault.web.dependencies import RuntimeDep, SessionDep, runtime_of
from phivault.web.downloads import attachment_disposition
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


# Records. The chart routes come first: a request is matched against the routes in order,
# and these are the ones a clinic calls most.

@router.post("/patients/{patient_id}/records", status_code=201, responses=CHART,
             summary="Write a medical record")
async def create_record(patient_id: uuid.UUID, body: RecordCreate, claims: Doctor,
                        request: Request) -> RecordView:
    """Doctors only, with a care relationship with the patient (403 `no_care_relationship`)
    and the patient's consent to share (403 `no_consent`); break-glass does not allow writing.
    `{diagnosis, prescriptions, notes?}` becomes version 1. An unknown or erased patient is
    404 `not_found`. Audited as `CREATE_MEDICAL_RECORD`."""
    runtime = runtime_of(request)  # a hot route: by the direct path on PostgreSQL
    care_days = runtime.settings.care_relationship_days
    return await runtime.direct_first(
        "create_record",
        lambda work: records.create_record_direct(work, runtime.envelope, claims, patient_id,
                                                  body, care_days=care_days),
        lambda session: records.create_record(session, runtime.envelope, claims, patient_id,
                                              body, care_days=care_days))


@router.get("/patients/{patient_id}/records", responses=CHART,
            summary="A patient's records (latest versions)")
async def list_records(patient_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                       session: SessionDep, page: PageDep,
                       response: Response) -> list[RecordView]:
    """The patient themselves, or a doctor with a care relationship and the patient's consent
    (or a break-glass grant): the latest version of each record, newest first, paged (the
    total in `X-Total-Count`). Another patient's chart is 404 `not_found` for a patient; a
    doctor without access gets 403 `no_care_relationship` or `no_consent`. Audited as
    `VIEW_MEDICAL_RECORD`."""
    views, total = await records.list_records(
        session, runtime.envelope, claims, patient_id, page.limit, page.offset,
        care_days=runtime.settings.care_relationship_days)
    page.answer(response, total)
    return views


@router.get("/records/{record_id}", responses=CHART, summary="A record (latest version)")
async def read_record(record_id: uuid.UUID, claims: Party, request: Request) -> RecordView:
    """The record's patient, or a doctor with access to that patient's chart (as for the
    list), or the doctor who wrote it: its latest version. A record the caller may not know
    of is 404 `not_found`. Audited as `VIEW_MEDICAL_RECORD`."""
    runtime = runtime_of(request)  # a hot route: by the direct path on PostgreSQL
    care_days = runtime.settings.care_relationship_days
    return await runtime.direct_first(
        "read_record",
        lambda work: records.read_record_direct(work, runtime.envelope, claims, record_id,
                                                care_days=care_days),
        lambda session: records.read_record(session, runtime.envelope, claims, record_id,
                                            care_days=care_days))


@router.patch("/records/{record_id}", responses=CHART, summary="Amend a record (new version)")
async def amend_record(record_id: uuid.UUID, body: RecordAmend, claims: Doctor,
                       runtime: RuntimeDep, session: SessionDep) -> RecordView:
    """Doctors only, with write access to the patient's chart (as for writing a record).
    Adds a version; fields not sent carry over. No version is ever overwritten or deleted.
    Audited as `UPDATE_MEDICAL_RECORD`."""
    return await records.amend(session, runtime.envelope, claims, record_id, body,
                               care_days=runtime.settings.care_relationship_days)


@router.get("/records/{record_id}/versions", responses=CHART, summary="Every version")
async def record_versions(record_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                          session: SessionDep) -> list[RecordView]:
    """The record's patient, or a doctor with access to the chart (as for reading the
    record): every version of the record, oldest first (the history of its amendments).
    Audited as `VIEW_MEDICAL_RECORD`."""
    return await records.versions(session, runtime.envelope, claims, record_id,
                                  care_days=runtime.settings.care_relationship_days)


# Prescriptions.

@router.post("/patients/{patient_id}/prescriptions", status_code=201, responses=CHART,
             summary="Prescribe")
async def prescribe(patient_id: uuid.UUID, body: PrescriptionCreate, claims: Doctor,
                    runtime: RuntimeDep, session: SessionDep) -> PrescriptionView:
    """Doctors only, with write access to the patient's chart (a care relationship and the
    patient's consent: 403 `no_care_relationship` or `no_consent` otherwise).
    `{medication, dosage, instructions}`. Audited as `CREATE_PRESCRIPTION`."""
    return await records.prescribe(session, runtime.envelope, claims, patient_id, body,
                                   care_days=runtime.settings.care_relationship_days)


@router.get("/patients/{patient_id}/prescriptions", responses=CHART,
            summary="A patient's prescriptions")
async def list_prescriptions(patient_id: uuid.UUID, claims: Party, runtime: RuntimeDep,
                             session: SessionDep, page: PageDep,
                             response: Response) -> list[PrescriptionView]:
    """The patient themselves, or a doctor with access to the chart (as for records): the
    patient's prescriptions, newest first, paged (the total in `X-Total-Count`). Audited as
    `VIEW_PRESCRIPTION`."""
    views, total = await records.list_prescriptions(
        session, runtime.envelope, claims, patient_id, page.limit, page.offset,
        care_days=runtime.settings.care_relationship_days)
    page.answer(response, total)
    return views


# Consultations.

# The body of `POST /consultations` depends on the caller's role, which the body does not say:
# it arrives as a JSON object and is validated by the caller's model alone (`_booking`), so a
# patient's 422 names a patient's fields, never the doctor's. The document shows both models.
def _booking_schema(schema: dict[str, Any]) -> None:
    schema.clear()
    schema.update({
        "title": "Booking", "type": "object",
        "description": "A patient sends `PatientBooking`; a doctor sends `DoctorProposal`.",
        "oneOf": [PatientBooking.model_json_schema(), DoctorProposal.model_json_schema()]})


BOOKING_BODY = Body(json_schema_extra=_booking_schema)


def _booking(claims: AccessClaims, body: dict[str, Any]) -> PatientBooking | DoctorProposal:
    model: type[PatientBooking | DoctorProposal] = (
        PatientBooking if claims.role == Role.PATIENT else DoctorProposal)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        # As FastAPI reports a body's problems: under `body`, and never with the input.
        raise RequestValidationError([
            {**error, "loc": ("body", *error["loc"])}
            for error in exc.errors(include_url=False, include_input=False)]) from None


@router.post("/consultations", status_code=201, responses=responses(401, 403, 404, 422),
             summary="Book or propose a consultation")
async def create_consultation(body: Annotated[dict[str, Any], BOOKING_BODY], claims: Party,
                              runtime: RuntimeDep, session: SessionDep) -> ConsultationView:
    """Patients and doctors. A patient sends `{doctor_id, scheduled_at, reason}`: `scheduled`
    at once. A doctor sends `{patient_id, scheduled_at, reason}`: `scheduled` for a patient
    they already care for, otherwise `proposed` until the patient accepts it (the patient is
    notified). `scheduled_at` is an ISO 8601 time with an offset, not in the past. The body is
    checked against the caller's own model: a 422 names only its fields. 404 `not_found` for a
    doctor or patient the caller may not book (unknown, inactive, erased)."""
    booking = _booking(claims, body)
    return await consultations.create(session, runtime.envelope, claims, booking,
                                      care_days=runtime.settings.care_relationship_days)


@router.get("/consultations", responses=responses(401, 403, 422), summary="My consultations")
async def list_consultations(claims: Party, runtime: RuntimeDep, session: SessionDep,
                             page: PageDep, response: Response) -> list[ConsultationView]:
    """Patients and doctors: the caller's own consultations (a patient's with every doctor, a
    doctor's with every patient not erased), latest scheduled first, paged (`limit`, `offset`;
    the total in `X-Total-Count`). Each one read is audited as `VIEW_CONSULTATION`."""
    views, total = await consultations.list_own(session, runtime.envelope, claims, page.limit,
                                                page.offset)
    page.answer(response, total)
    return views


@router.patch("/consultations/{consultation_id}", responses=responses(401, 403, 404, 409, 422),
              summary="Accept, reschedule, complete, cancel, or write notes")
async def update_consultation(consultation_id: uuid.UUID, body: ConsultationUpdate,
                              claims: Party, runtime: RuntimeDep,
                              session: SessionDep) -> ConsultationView:
    """The consultation's patient and doctor only (404 `not_found` for anyone else). `notes`:
    the doctor. `proposed` → `scheduled`: the patient (accepting). `scheduled` → `completed`:
    the doctor, once its scheduled time has passed (409 `conflict` before). Either may cancel an
    open one, or move it to a time still to come (422 otherwise). Audited as
    `UPDATE_CONSULTATION`."""
    return await consultations.update(session, runtime.envelope, claims, consultation_id, body)


@router.post("/consultations/{consultation_id}/payments", status_code=201,
             responses=responses(401, 403, 404, 422), summary="Pay for my consultation")
async def pay(consultation_id: uuid.UUID, body: PaymentCreate, claims: Patient,
              session: SessionDep) -> PaymentView:
    """Patients only, for their own consultation (404 `not_found` otherwise).
    `{amount, currency, provider_reference}`: amount in minor units (1 to 100,000,000),
    currency an ISO 4217 code; card data is never accepted (any other field is a 422).
    Audited as `CREATE_PAYMENT`."""
    return await consultations.pay(session, claims, consultation_id, body)


@router.get("/me/payments", responses=responses(401, 403, 422), summary="My payments")
async def my_payments(claims: Patient, session: SessionDep, page: PageDep,
                      response: Response) -> list[PaymentView]:
    """Patients only: their own payments, newest first, paged (the total in
    `X-Total-Count`). Audited as `VIEW_PAYMENT`."""
    views, total = await consultations.my_payments(session, claims, page.limit, page.offset)
    page.answer(response, total)
    return views


@router.get("/me/notifications", responses=responses(401, 422), summary="My notifications")
async def my_notifications(claims: Anyone, runtime: RuntimeDep, session: SessionDep,
                           page: PageDep, response: Response) -> list[NotificationView]:
    """Any signed-in user: their own notifications (a doctor's proposal, a break-glass read
    of their chart), newest first, paged (the total in `X-Total-Count`); `read_at` is null
    until `POST /notifications/{id}/read`. Audited as `VIEW_NOTIFICATION`."""
    views, total = await notifications.list_mine(session, runtime.envelope, claims.user_id,
                                                 claims.role == Role.PATIENT, page.limit,
                                                 page.offset)
    page.answer(response, total)
    return views


@router.post("/notifications/{notification_id}/read", responses=responses(401, 404, 422),
             summary="Mark a notification read")
async def mark_notification_read(notification_id: uuid.UUID, claims: Anyone,
                                 runtime: RuntimeDep, session: SessionDep) -> NotificationView:
    """Any signed-in user, for their own notifications only: sets `read_at` (marking it again
    keeps the first time) and answers the notification. No body. Another user's notification,
    or an unknown id, is 404 `not_found` (and an `ACCESS_DENIED` event). Audited as
    `UPDATE_NOTIFICATION`."""
    return await notifications.mark_read(session, runtime.envelope, claims.user_id,
                                         claims.role == Role.PATIENT, notification_id)


@router.get("/me/care-team", responses=responses(401, 403, 422), summary="My care team")
async def my_care_team(claims: Patient, runtime: RuntimeDep, session: SessionDep,
                       page: PageDep, response: Response) -> list[CareTeamMember]:
    """Patients only. The doctors with a care relationship with me now, by name: a consultation
    `scheduled` (`basis: scheduled`, `until: null`), or one `completed` within the last
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
    """Patients only. Ends that doctor's care relationship with me at once: their consultations
    with me so far (completed ones too) grant nothing any more, and the open ones are cancelled.
    Only a new consultation I book, or a proposal of theirs I accept, restores it. 404
    `not_found` when that doctor has no care relationship with me."""
    await care_team.end_care(session, claims.user_id, doctor_id,
                             care_days=runtime.settings.care_relationship_days)
    return Response(status_code=204)


@router.get("/patients", responses=responses(401, 403, 422), summary="My patients")
async def my_patients(claims: Doctor, runtime: RuntimeDep, session: SessionDep, page: PageDep,
                      response: Response) -> list[PatientListItem]:
    """Doctors only: the patients with whom the caller has a care relationship now (id, full
    name, birth year; an erased patient shows no name), paged (the total in `X-Total-Count`).
    Audited as `VIEW_PATIENT_LIST`, one event per patient listed."""
    items, total = await consultations.patients_of(
        session, runtime.envelope, claims.user_id, page.limit, page.offset,
        care_days=runtime.settings.care_relationship_days)
    page.answer(response, total)
    return items


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
    """The patient themselves, or a doctor with write access to the chart (a care
    relationship and the patient's consent). Multipart, one part named `file`, at most 25 MiB
    (413 beyond); PDF, PNG, JPEG or DICOM (415 otherwise); its type is decided by its content
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
    """The patient themselves, or a doctor with access to the chart (as for records): the
    attachments' metadata (name, type, size, uploader, date), newest first, paged; never the
    files. Audited as `VIEW_ATTACHMENT`."""
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
    """The attachment's patient, or a doctor with access to the chart (as for records): the
    file, decrypted as it streams, with its type and a `Content-Disposition` naming it (an
    ASCII `filename` and the exact name as `filename*`). Every stored segment is checked
    before the first byte is sent: a damaged file is 500 `integrity_failure`, never partial
    data. An attachment the caller may not know of is 404 `not_found`. Audited as
    `VIEW_ATTACHMENT`."""
    found = await attachments.download(session, runtime.sessions, runtime.envelope, claims,
                                       attachment_id,
                                       care_days=runtime.settings.care_relationship_days)
    # The name is sealed at rest; opened for this response's header only (web/downloads.py).
    return StreamingResponse(found.body, media_type=found.view.content_type, headers={
        "Content-Length": str(found.view.size),
        "Content-Disposition": attachment_disposition(found.view.filename,
                                                      fallback="attachment"),
        "Cache-Control": "no-store"})


# Break-glass.

@router.post("/patients/{patient_id}/break-glass", status_code=201,
             responses=responses(401, 403, 404, 422), summary="Emergency access")
async def emergency_access(patient_id: uuid.UUID, body: BreakGlassRequest, claims: Doctor,
                           runtime: RuntimeDep, session: SessionDep,
                           tasks: BackgroundTasks) -> BreakGlassAnswer:
    """Doctors only. Read access to the patient's chart for 60 minutes, whatever the
    relationship or consent (never an erased patient's: 403 `no_care_relationship`). The reason
    (20+ characters) is audited; the patient is notified (in the app, and by mail when
    `PHIVAULT_SMTP_URL` is set: when, never why)."""
    grant = await break_glass(session, runtime.envelope,
                              runtime.reason_mac, claims, patient_id,
                              body.reason, outbox=outbox_for(runtime, tasks))
    return BreakGlassAnswer(expires_at=grant.expires_at)

