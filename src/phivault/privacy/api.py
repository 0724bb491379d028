"""The patient's data-subject rights (SPEC §9): consents, export, rectification, erasure."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from phivault.access.guards import Allow
from phivault.access.permissions import Role
from phivault.audit.schemas import Instant
from phivault.auth.schemas import ErasureRequest, Me, ProfileRectification
from phivault.auth.tokens import AccessClaims
from phivault.db.base import utcnow
from phivault.privacy import consents, erasure, export, rectification
from phivault.privacy.consents import ConsentChoice, ConsentView
from phivault.privacy.schemas import ExportQuery
from phivault.web.dependencies import RuntimeDep, SessionDep
from phivault.web.downloads import attachment_disposition
from phivault.web.errors import responses
from phivault.web.gates import gate_of

router = APIRouter(tags=["privacy"])
Patient = Annotated[AccessClaims, Depends(Allow(Role.PATIENT))]


@router.patch("/me", responses=responses(401, 403, 422), summary="Rectify my profile")
async def rectify_me(body: ProfileRectification, claims: Patient, runtime: RuntimeDep,
                     session: SessionDep) -> Me:
    """Patients only. Correct any of `full_name`, `phone`, `address` and `birth_date` (GDPR
    article 16). Fields not sent stay as they are; `phone`, `address` and `birth_date` may be
    sent as null to remove them. A birth date before 1900 or in the future is a 422. Audited as
    `UPDATE_PROFILE` with the names of the changed fields (never their values). Answers the
    profile as it now is."""
    await rectification.rectify(session, runtime.envelope, claims.user_id, body)
    return await runtime.accounts.me(session, claims.user_id, record_view=False)


@router.delete("/me", status_code=204, responses=responses(401, 403, 422, 429),
               summary="Erase my account")
async def erase_me(body: ErasureRequest, claims: Patient, runtime: RuntimeDep,
                   session: SessionDep) -> Response:
    """Patients only. Erasure (GDPR article 17), after the current password again (a wrong one
    is a 401 `invalid_credentials` and counts toward the login lock-out). In one transaction:
    the identity (name, email and its blind index, phone, address) is destroyed with the data
    keys that sealed it and the birth date is cut to its year; every session ends (this access
    token stops working at once); notifications are deleted, consents withdrawn, open future
    consultations cancelled; the status becomes `deleted`. Medical records, prescriptions,
    consultations, payments and the audit trail stay under the pseudonymous id, and the doctor
    who wrote a record or prescription keeps read access to it. The email may register again, as
    a new person. Audited as `ACCOUNT_ERASED`."""
    await runtime.authenticator.confirm_password(session, claims.user_id, body.password,
                                                 reason="erasure_bad_password",
                                                 exclusive=True)
    await erasure.erase(session, runtime.envelope, claims.user_id)
    # After the commit (which happens before this answer is sent): the SQLite log's old pages.
    return Response(status_code=204,
                    background=BackgroundTask(erasure.forget_on_disk, runtime.engine))


EXPORT_ANSWER = {
    200: {"description": "The export, streamed as an attachment: a JSON document, or with "
                         "`format=fhir` a FHIR R4 Bundle.",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "application/fhir+json": {"schema": {"type": "object"}}}},
    **responses(401, 403, 422, 429, 500)}


async def _export_place(request: Request, claims: Patient,
                        runtime: RuntimeDep) -> AsyncIterator[None]:
    """One export per patient, and a quarter of the pool per server process (the exports'
    second connections never starve the rest), for the request's whole life (`web/gates.py`)."""
    with gate_of(request, "export", runtime.settings.db_pool_size // 4).held(claims.user_id):
        yield


@router.get("/me/export", response_class=StreamingResponse, responses=EXPORT_ANSWER,
            summary="Export my data (JSON or FHIR)", dependencies=[Depends(_export_place)])
async def export_my_data(claims: Patient, query: Annotated[ExportQuery, Query()],
                         runtime: RuntimeDep, session: SessionDep) -> StreamingResponse:
    """Everything phivault holds about you, decrypted (GDPR articles 15 and 20), as a download.

    `format=json` (the default): one `application/json` document with `profile`,
    `consultations`, `medical_records` (every version of every record), `prescriptions`,
    `attachments` (metadata: id, filename, type, size, date, uploader; not the files),
    `payments`, `consents` (the whole history), `notifications` and `access_log` (who accessed
    your data), each section oldest first. `format=fhir`: an `application/fhir+json` FHIR R4
    Bundle of type `collection` (Patient, Practitioner, Encounter, Condition,
    MedicationRequest, DocumentReference, Consent, Communication, AuditEvent). Any other format
    or query parameter is a 422. Patient only.

    The export is as of the moment it starts and is read page by page, so a long history
    streams without delay. One export per patient at a time, and a quarter of the database
    pool's size per server process: beyond that, 429 with `Retry-After`. Audited as
    `DATA_EXPORT` with its format."""
    export.record(session, claims.user_id, query.format)
    start = await export.begin(runtime, claims.user_id, session)
    day = utcnow().date().isoformat()
    name = f"phivault-export-{day}.json" if query.format is export.ExportFormat.JSON \
        else f"phivault-export-{day}.fhir.json"
    # The unit of work (and its DATA_EXPORT event) commits before the body streams; the body
    # reads in short transactions of its own, one page at a time.
    return StreamingResponse(export.stream(runtime, start, query.format),
                             media_type=export.MEDIA_TYPES[query.format],
                             headers={"Cache-Control": "no-store",
                                      "Content-Disposition": attachment_disposition(name)})


@router.get("/me/consents", responses=responses(401, 403, 404, 422),
            summary="My current consents, or those in force at a past instant")
async def read_consents(claims: Patient, session: SessionDep,
                        at: Annotated[Instant | None, Query(
                            description="An ISO 8601 time with an offset: answers the "
                                        "consents in force at that instant (proof of "
                                        "consent); 404 before the first.")] = None
                        ) -> ConsentView:
    """Patients only: their consents in force now (`marketing`, `data_sharing`, `analytics`,
    `consent_date`), or with `at` those in force at that instant (proof of consent, GDPR
    article 7(1)); 404 `not_found` for an instant before the first consent. A new patient's
    are all false until changed: doctors read the chart only while `data_sharing` is true.
    Audited as `VIEW_CONSENT`."""
    if at is not None:
        return await consents.at(session, claims.user_id, at)
    return await consents.current(session, claims.user_id)


@router.put("/me/consents", responses=responses(401, 403, 422), summary="Change my consents")
async def change_consents(body: ConsentChoice, claims: Patient,
                          session: SessionDep) -> ConsentView:
    """Patients only. All three booleans, each required and strictly `true` or `false` (no
    `"yes"`, no `1`: 422); a new version is appended to the history, none is ever changed.
    Withdrawing `data_sharing` closes your chart to doctors at once (break-glass excepted).
    Audited as `CONSENT_CHANGED`."""
    return await consents.change(session, claims.user_id, body)


@router.get("/me/consents/history", responses=responses(401, 403), summary="My consent history")
async def consent_history(claims: Patient, session: SessionDep) -> list[ConsentView]:
    """Patients only: every version of their consents, oldest first, each with the time it
    took effect (`consent_date`). Audited as `VIEW_CONSENT`."""
    return await consents.history(session, claims.user_id)
