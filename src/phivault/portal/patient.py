"""The patient's pages of the portal (SPEC §15): the profile and its rectification, records,
who accessed my data, who can read my chart, consents, the export and erasure.

Each page calls the service functions its API route calls, so it shows what the API answers and
audits it alike (`VIEW_PROFILE`, `VIEW_MEDICAL_RECORD` ... `DATA_EXPORT`); none writes an event
of its own. Every action is a form POST whose CSRF token is checked before anything else.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Annotated, Any

from fastapi import Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import Field, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.background import BackgroundTask

from phivault import errors
from phivault.access import care_team
from phivault.access.schemas import CareTeamMember
from phivault.audit import access_log
from phivault.auth.models import StaffProfile
from phivault.auth.schemas import Me, ProfileRectification
from phivault.clinical import consultations, records
from phivault.db.base import utcnow
from phivault.portal import sessions
from phivault.portal.web import (
    CsrfForm,
    CsrfToken,
    Patient,
    PortalForm,
    check_csrf,
    claims_of,
    page_headers,
    render,
    router,
)
from phivault.privacy import consents, erasure, export, rectification
from phivault.privacy.consents import ConsentChoice
from phivault.schemas import Password
from phivault.web.dependencies import RuntimeDep, SessionDep
from phivault.web.downloads import attachment_disposition
from phivault.web.gates import gate_of
from phivault.web.pagination import MAX_OFFSET

# Rows per table: the API's default page. A page says when there are more.
LIST_SIZE = 50
MAX_PAGE = MAX_OFFSET // LIST_SIZE + 1
PROFILE_FIELDS = ("full_name", "phone", "address", "birth_date")
# What the profile form says of a value the rectification refuses (never the value itself).
PROFILE_PROBLEMS = {
    "full_name": "Your name must be 1 to 200 characters on one line; it can be corrected, "
                 "not removed.",
    "phone": "A phone number is 3 to 40 characters: digits, spaces and + ( ) . -",
    "address": "An address is at most 500 characters, on one line.",
    "birth_date": "A date of birth is written YYYY-MM-DD, from 1900-01-01 to today.",
}


async def _doctor_names(session: AsyncSession, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The staff directory's names of `ids` (not PHI: the access log and the care team name
    the same people), so that tables say who rather than an id."""
    wanted = set(ids)
    if not wanted:
        return {}
    rows = await session.execute(select(StaffProfile.user_id, StaffProfile.full_name)
                                 .where(StaffProfile.user_id.in_(wanted)))
    return {user_id: name for user_id, name in rows.all()}


# The profile (GET /me) and its rectification (PATCH /me).

# Forms are `RequestModel`s like the API's bodies: unknown fields, control characters and
# oversized values are refused (a 400 page) before the route runs.

class ProfileForm(PortalForm):
    """The rectification form: the fields `PATCH /me` takes, as text (a blank optional field
    removes it). The bounds are the form's; `ProfileRectification` checks the values, so that
    the form can say what is wrong with each."""

    full_name: str = Field("", max_length=400)
    phone: str = Field("", max_length=100)
    address: str = Field("", max_length=1000)
    birth_date: str = Field("", max_length=32)
    csrf_token: CsrfToken = ""


def _shown(me: Me) -> dict[str, str]:
    """The profile's correctable fields as the form shows them."""
    return {"full_name": me.full_name or "", "phone": me.phone or "",
            "address": me.address or "",
            "birth_date": me.birth_date.isoformat() if me.birth_date else ""}


def _profile_page(request: Request, visit: sessions.Visit, me: Me, *, status: int = 200,
                  notice: str | None = None, problems: dict[str, str] | None = None,
                  values: dict[str, str] | None = None) -> HTMLResponse:
    return render(request, "patient_profile.html", status=status, visit=visit, me=me,
                  notice=notice, problems=problems or {}, values=values or _shown(me))


@router.get("/profile")
async def profile(request: Request, visit: Patient, runtime: RuntimeDep,
                  session: SessionDep) -> HTMLResponse:
    """My profile, as `GET /me` answers it (audited as `VIEW_PROFILE`), and the form that
    corrects it."""
    me = await runtime.accounts.me(session, claims_of(visit).user_id)
    return _profile_page(request, visit, me)


@router.post("/profile")
async def rectify_profile(request: Request, form: Annotated[ProfileForm, Form()],
                          visit: Patient, runtime: RuntimeDep,
                          session: SessionDep) -> HTMLResponse:
    """Rectification (GDPR article 16) as `PATCH /me`: only the fields whose value changed are
    sent, so `UPDATE_PROFILE` names exactly those. A refused value shows the form again (400)
    with what is wrong; nothing changes."""
    check_csrf(request, visit, form.csrf_token)
    user_id = claims_of(visit).user_id
    before = _shown(await runtime.accounts.me(session, user_id, record_view=False))
    sent = {name: getattr(form, name).strip() for name in PROFILE_FIELDS}
    changes: dict[str, Any] = {
        # A blank name is sent as it is, for the rectification to refuse: a name is corrected,
        # never removed. A blank optional field removes it (null, as in PATCH /me).
        name: value if value or name == "full_name" else None
        for name, value in sent.items() if value != before[name]}
    if not changes:
        return _profile_page(request, visit, await runtime.accounts.me(session, user_id),
                             notice="Nothing changed: your details are as they were.")
    try:
        change = ProfileRectification.model_validate(changes)
    except ValidationError as exc:
        problems = {str(error["loc"][0]): PROFILE_PROBLEMS.get(str(error["loc"][0]),
                                                                "This value is not accepted.")
                    for error in exc.errors(include_input=False, include_url=False)
                    if error["loc"]}
        return _profile_page(request, visit, await runtime.accounts.me(session, user_id),
                             status=400, problems=problems, values=sent)
    await rectification.rectify(session, runtime.envelope, user_id, change)
    me = await runtime.accounts.me(session, user_id, record_view=False)
    return _profile_page(request, visit, me, notice="Your details are saved.")


# Records, prescriptions and consultations.

@router.get("/records")
async def my_records(request: Request, visit: Patient, runtime: RuntimeDep,
                     session: SessionDep) -> HTMLResponse:
    """The newest records, prescriptions and consultations, as `GET /patients/{me}/records`,
    `/prescriptions` and `GET /consultations` answer their first page (audited alike: one
    `VIEW_MEDICAL_RECORD`, `VIEW_PRESCRIPTION`, `VIEW_CONSULTATION` per item shown)."""
    claims = claims_of(visit)
    days = runtime.settings.care_relationship_days
    record_views, record_total = await records.list_records(
        session, runtime.envelope, claims, claims.user_id, LIST_SIZE, 0, care_days=days)
    prescription_views, prescription_total = await records.list_prescriptions(
        session, runtime.envelope, claims, claims.user_id, LIST_SIZE, 0, care_days=days)
    consultation_views, consultation_total = await consultations.list_own(
        session, runtime.envelope, claims, LIST_SIZE, 0)
    names = await _doctor_names(session, [
        *(view.author_id for view in record_views),
        *(view.doctor_id for view in prescription_views),
        *(view.doctor_id for view in consultation_views)])
    return render(request, "patient_records.html", visit=visit, names=names,
                  records=record_views, record_total=record_total,
                  prescriptions=prescription_views, prescription_total=prescription_total,
                  consultations=consultation_views, consultation_total=consultation_total)


# Who accessed my data.

@router.get("/access-log")
async def my_access_log(request: Request, visit: Patient, runtime: RuntimeDep,
                        session: SessionDep,
                        page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1) -> HTMLResponse:
    """Every access to my data by someone else, newest first, break-glass accesses marked, a
    page of `LIST_SIZE` at a time: `GET /me/access-log`, audited as `VIEW_ACCESS_LOG`."""
    offset = (page - 1) * LIST_SIZE
    entries, total = await access_log.view(session, runtime.sequencer,
                                           claims_of(visit).user_id, LIST_SIZE, offset)
    more = offset + len(entries) < total.count or (not total.exact
                                                   and len(entries) == LIST_SIZE)
    pages = max(1, -(-total.count // LIST_SIZE))
    return render(request, "patient_access_log.html", visit=visit, entries=entries,
                  page=page, pages=pages, exact=total.exact, total=total.count,
                  previous=page - 1 if page > 1 else None, next=page + 1 if more else None)


# Who can read my chart.

def _care_team_page(request: Request, visit: sessions.Visit, members: list[CareTeamMember],
                    total: int, notice: str | None = None) -> HTMLResponse:
    return render(request, "patient_care_team.html", visit=visit, members=members, total=total,
                  notice=notice)


@router.get("/care-team")
async def my_care_team(request: Request, visit: Patient, runtime: RuntimeDep,
                       session: SessionDep) -> HTMLResponse:
    """The doctors who hold a care relationship with me now, as `GET /me/care-team` (audited
    as `VIEW_CARE_TEAM`), each with a form that ends their access."""
    members, total = await care_team.care_team(
        session, claims_of(visit).user_id, LIST_SIZE, 0,
        care_days=runtime.settings.care_relationship_days)
    return _care_team_page(request, visit, members, total)


@router.post("/care-team/{doctor_id}/end")
async def end_access(request: Request, doctor_id: uuid.UUID, form: Annotated[CsrfForm, Form()],
                     visit: Patient, runtime: RuntimeDep, session: SessionDep) -> HTMLResponse:
    """End that doctor's access at once, as `DELETE /me/care-team/{doctor_id}`; a doctor who is
    not in my care team is a 404 page, and nothing changes."""
    check_csrf(request, visit, form.csrf_token)
    user_id = claims_of(visit).user_id
    days = runtime.settings.care_relationship_days
    await care_team.end_care(session, user_id, doctor_id, care_days=days)
    name = (await _doctor_names(session, [doctor_id])).get(doctor_id, "The doctor")
    members, total = await care_team.care_team(session, user_id, LIST_SIZE, 0, care_days=days)
    return _care_team_page(request, visit, members, total, notice=(
        f"{name} can no longer read your chart. A new consultation you book restores it."))


# Consents.

# A ticked box sends its value ("true"); a form's values are text, so not strictly booleans.
Ticked = Annotated[bool, Field(strict=False)]


class ConsentForm(PortalForm):
    """The consents form: a box not ticked is not sent, so each one is false unless sent."""

    marketing: Ticked = False
    data_sharing: Ticked = False
    analytics: Ticked = False
    csrf_token: CsrfToken = ""


@router.get("/consents")
async def my_consents(request: Request, visit: Patient, session: SessionDep) -> HTMLResponse:
    """My consents in force and their history, as `GET /me/consents` and
    `GET /me/consents/history` (audited alike, `VIEW_CONSENT` each)."""
    user_id = claims_of(visit).user_id
    current = await consents.current(session, user_id)
    history = await consents.history(session, user_id)
    return render(request, "patient_consents.html", visit=visit, current=current,
                  history=history, notice=None)


@router.post("/consents")
async def change_consents(request: Request, form: Annotated[ConsentForm, Form()],
                          visit: Patient, session: SessionDep) -> HTMLResponse:
    """A new version of my consents, as `PUT /me/consents` (`CONSENT_CHANGED`); the history
    below is read again (`VIEW_CONSENT`)."""
    check_csrf(request, visit, form.csrf_token)
    user_id = claims_of(visit).user_id
    current = await consents.change(session, user_id, ConsentChoice(
        marketing=form.marketing, data_sharing=form.data_sharing, analytics=form.analytics))
    history = await consents.history(session, user_id)
    notice = "Your consents are saved."
    if not current.data_sharing:
        notice += " Doctors can no longer read your chart, except in an emergency (break-glass)."
    return render(request, "patient_consents.html", visit=visit, current=current,
                  history=history, notice=notice)


# The export (GDPR articles 15 and 20).

class ExportForm(PortalForm):
    format: Annotated[export.ExportFormat, Field(strict=False)]  # its value, as text
    csrf_token: CsrfToken = ""


async def _export_place(request: Request, visit: Patient,
                        runtime: RuntimeDep) -> AsyncIterator[None]:
    """A place in the API's own export gate (`web/gates.py`), for the request's whole life:
    one export per patient at a time, through the API or here."""
    with gate_of(request, "export", runtime.settings.db_pool_size // 4).held(
            claims_of(visit).user_id):
        yield


@router.get("/export")
async def export_page(request: Request, visit: Patient) -> HTMLResponse:
    """The two downloads: JSON and FHIR."""
    return render(request, "patient_export.html", visit=visit)


@router.post("/export", dependencies=[Depends(_export_place)])
async def download_export(request: Request, form: Annotated[ExportForm, Form()],
                          visit: Patient, runtime: RuntimeDep,
                          session: SessionDep) -> StreamingResponse:
    """The export itself, as `GET /me/export?format=...` streams it: audited as `DATA_EXPORT`
    (committed before the body streams), read page by page, an attachment never cached."""
    check_csrf(request, visit, form.csrf_token)
    user_id = claims_of(visit).user_id
    export.record(session, user_id, form.format)
    start = await export.begin(runtime, user_id, session)
    day = utcnow().date().isoformat()
    name = f"phivault-export-{day}.json" if form.format is export.ExportFormat.JSON \
        else f"phivault-export-{day}.fhir.json"
    return StreamingResponse(export.stream(runtime, start, form.format),
                             media_type=export.MEDIA_TYPES[form.format],
                             headers={**page_headers(),
                                      "content-disposition": attachment_disposition(name)})


# Erasure (GDPR article 17).

class ErasureForm(PortalForm):
    password: Password  # as `DELETE /me`'s body
    csrf_token: CsrfToken = ""


def _erase_page(request: Request, visit: sessions.Visit, *, status: int = 200,
                message: str | None = None) -> HTMLResponse:
    return render(request, "patient_erase.html", status=status, visit=visit, message=message)


@router.get("/erase")
async def erase_page(request: Request, visit: Patient) -> HTMLResponse:
    """What erasure removes and keeps, and the form that asks for the password again."""
    return _erase_page(request, visit)


@router.post("/erase")
async def erase_account(request: Request, form: Annotated[ErasureForm, Form()], visit: Patient,
                        runtime: RuntimeDep, session: SessionDep) -> HTMLResponse:
    """Erasure, as `DELETE /me`: the password again (a wrong one shows the form again, 401,
    and counts toward the login lock-out), then the account is erased, this session ends and
    the browser is asked to forget the site (`Clear-Site-Data`)."""
    check_csrf(request, visit, form.csrf_token)
    user_id = claims_of(visit).user_id
    try:
        await runtime.authenticator.confirm_password(session, user_id, form.password,
                                                     reason="erasure_bad_password",
                                                 exclusive=True)
    except errors.InvalidCredentials:
        # The refusal's event is written (this unit of work commits) and counted, as the API's.
        return _erase_page(request, visit, status=401,
                           message="That password is not right. Nothing was erased.")
    await erasure.erase(session, runtime.envelope, user_id)
    await sessions.end(session, visit.row)
    response = render(request, "patient_erased.html")
    response.headers["clear-site-data"] = '"cache", "cookies", "storage"'
    response.delete_cookie(sessions.COOKIE, path="/", secure=True, httponly=True,
                           samesite="strict")
    # After the commit (before this answer is sent): the SQLite log's old pages, as the API.
    response.background = BackgroundTask(erasure.forget_on_disk, runtime.engine)
    return response

