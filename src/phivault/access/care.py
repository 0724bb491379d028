"""Who may see and change a patient's chart (SPEC §7).

A patient: their own data only; another patient's is `not_found` (they may not even learn it
exists). A doctor: a patient with whom a care relationship exists AND whose current consent has
`data_sharing = true`; or, for reading only, a patient for whom the doctor holds an active
break-glass grant, whatever the relationship or consent. Every other role: `forbidden`. Every
denial writes `ACCESS_DENIED`.

The care relationship (`granting`): a consultation between the two that is `scheduled`, or
`completed` with its scheduled time less than `PHIVAULT_CARE_RELATIONSHIP_DAYS` ago (a
consultation is completed only once that time has passed), and made after the patient last
ended the doctor's relationship (`CareEnding`, `access/care_team.py`). So it lasts while a
consultation is scheduled and for the window after the last completed one; then the doctor
needs a new consultation, which the patient books or accepts.

An erased patient (SPEC §9): the doctor who wrote a record or prescription keeps read access to
it (the professional duty to keep one's own clinical notes) and to nothing else; nobody else
reads anything, break-glass included. Only callers that can narrow what they read to the
caller's own writing ask for that (`authored=True`, answered `Basis.AUTHOR`); for every other
caller an erased patient's chart is closed.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, exists, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.access.permissions import Role
from phivault.audit import service as audit
from phivault.audit.actions import Action, Outcome
from phivault.auth.models import User
from phivault.auth.tokens import AccessClaims
from phivault.clinical.models import (
    BreakGlassGrant,
    CareEnding,
    Consultation,
    MedicalRecord,
    Prescription,
)
from phivault.db.base import core_table, utcnow
from phivault.errors import Forbidden, NoCareRelationship, NoConsent, NotFound
from phivault.privacy.models import Consent

BREAK_GLASS_MINUTES = 60


class Basis(StrEnum):
    """Why access was granted; `break_glass` marks the access in the patient's access log."""

    SELF = "self"
    CARE = "care"
    BREAK_GLASS = "break_glass"
    AUTHOR = "author"  # an erased patient: only what the caller wrote


_CONSULTATIONS, _ENDINGS = core_table(Consultation), core_table(CareEnding)


def care_from(now: datetime, care_days: int) -> datetime:
    """The earliest scheduled time at which a completed consultation still keeps the care
    relationship at `now` (`care_days`: `PHIVAULT_CARE_RELATIONSHIP_DAYS`)."""
    return now - timedelta(days=care_days)


def not_ended() -> ColumnElement[bool]:
    """Consultations made after the patient last ended that doctor's relationship (or never
    ended it): a condition on the `consultations` table."""
    c, e = _CONSULTATIONS.c, _ENDINGS.c
    return ~exists().where(e.patient_id == c.patient_id, e.doctor_id == c.doctor_id,
                           e.ended_at >= c.created_at)


def granting(completed_after: datetime | ColumnElement[datetime]) -> ColumnElement[bool]:
    """The consultations that make a care relationship now: `scheduled` ones, and `completed`
    ones scheduled after `completed_after` (see `care_from`); none made at or before the
    instant the patient last ended that doctor's relationship. A condition on the
    `consultations` table, for any query over it."""
    c = _CONSULTATIONS.c
    return and_(
        or_(c.status == literal("scheduled"),
            and_(c.status == literal("completed"), c.scheduled_at > completed_after)),
        not_ended())


async def has_care_relationship(session: AsyncSession, doctor_id: uuid.UUID,
                                patient_id: uuid.UUID, *, care_days: int) -> bool:
    """Whether a care relationship exists between them now (`care_days`: the window a
    completed consultation keeps it, `PHIVAULT_CARE_RELATIONSHIP_DAYS`)."""
    return bool((await session.execute(select(exists().where(
        _CONSULTATIONS.c.doctor_id == doctor_id, _CONSULTATIONS.c.patient_id == patient_id,
        granting(care_from(utcnow(), care_days)))))).scalar())


async def is_patient(session: AsyncSession, patient_id: uuid.UUID) -> bool:
    return bool((await session.execute(select(exists().where(
        User.id == patient_id, User.role == Role.PATIENT)))).scalar())


async def patient_status(session: AsyncSession, patient_id: uuid.UUID) -> str | None:
    """The patient's account status (`active`, `disabled`, `deleted`), or None when
    `patient_id` is no patient."""
    return (await session.execute(select(User.status).where(
        User.id == patient_id, User.role == Role.PATIENT))).scalar_one_or_none()


def deny(session: AsyncSession, error: Exception, patient_id: uuid.UUID | None,
         resource_type: str, reason: str) -> Exception:
    audit.record(session, Action.ACCESS_DENIED, outcome=Outcome.DENIED,
                 resource_type=resource_type, patient_id=patient_id,
                 metadata={"reason": reason})
    return error


# The four facts a doctor's chart decision needs, in one round trip, built once: this runs on
# every chart request, and building the statement would cost more than executing it.
_USERS, _GRANTS, _CONSENTS = core_table(User), core_table(BreakGlassGrant), core_table(Consent)
# Their labels, when a caller reads them along with its own row (`chart_facts`).
CHART_FACT_NAMES = ("chart_status", "chart_glass", "chart_care", "chart_sharing")


def chart_facts(patient: Any) -> list[ColumnElement[Any]]:
    """The four facts about `patient` (a bound parameter, or a column of the query they join),
    labelled `CHART_FACT_NAMES`; the doctor and the times are bound as `chart_parameters`
    gives them. A caller that reads the patient's id from a row anyway (a record read) gets
    the facts in the same round trip, and hands them to `require_chart_access`."""
    return [fact.label(name) for fact, name in zip((
        select(_USERS.c.status).where(_USERS.c.id == patient,
                                      _USERS.c.role == Role.PATIENT).scalar_subquery(),
        exists().where(_GRANTS.c.doctor_id == bindparam("doctor"),
                       _GRANTS.c.patient_id == patient,
                       _GRANTS.c.expires_at > bindparam("now")),
        exists().where(_CONSULTATIONS.c.doctor_id == bindparam("doctor"),
                       _CONSULTATIONS.c.patient_id == patient,
                       granting(bindparam("care_from"))),
        select(_CONSENTS.c.data_sharing).where(_CONSENTS.c.patient_id == patient)
        .order_by(_CONSENTS.c.version.desc()).limit(1).scalar_subquery(),
    ), CHART_FACT_NAMES, strict=True)]


def chart_parameters(claims: AccessClaims, care_days: int) -> dict[str, Any]:
    """The values `chart_facts` binds besides the patient."""
    now = utcnow()
    return {"doctor": claims.user_id, "now": now, "care_from": care_from(now, care_days)}


CHART_FACTS = select(*chart_facts(bindparam("patient")))


@dataclass(frozen=True, slots=True)
class Refusal:
    """A chart decision's no: the error to answer, the patient its `ACCESS_DENIED` event names
    (None where naming them would tell the caller the patient exists), and the reason."""

    error: type[Exception]
    patient_id: uuid.UUID | None
    reason: str


def chart_decision(claims: AccessClaims, patient_id: uuid.UUID, facts: Sequence[Any] | None, *,
                   write: bool) -> Basis | Refusal:
    """SPEC §7's decision on the caller's access to the patient's chart, from what is known:
    the caller, and for a doctor the patient's `chart_facts`. Pure, so that every path to a
    chart (the unit of work's and the direct one, `db/direct.py`) decides alike. An erased
    patient is the `Refusal` with reason `erased`; `require_chart_access` may still open it to
    the doctor who wrote for them (`Basis.AUTHOR`), which needs a query."""
    if claims.role == Role.PATIENT:
        return Basis.SELF if claims.user_id == patient_id else Refusal(
            NotFound, None, "other_patient")
    if claims.role != Role.DOCTOR:
        return Refusal(Forbidden, patient_id, "role")
    if facts is None:
        raise ValueError("a doctor's chart decision needs the patient's chart facts")
    status, glass, care, sharing = facts
    if status is None:
        return Refusal(NotFound, None, "no_such_patient")
    if status == "deleted":
        return Refusal(NoCareRelationship, patient_id, "erased")
    if glass and not write:
        return Basis.BREAK_GLASS
    if not care:
        return Refusal(NoCareRelationship, patient_id, "no_care_relationship")
    if not sharing:
        return Refusal(NoConsent, patient_id, "no_consent")
    return Basis.CARE


async def require_chart_access(session: AsyncSession, claims: AccessClaims,
                               patient_id: uuid.UUID, *, write: bool, resource_type: str,
                               care_days: int, authored: bool = False,
                               facts: Sequence[Any] | None = None) -> Basis:
    """Raise unless the caller may read (or, with `write`, change) the patient's chart
    (`chart_decision`), writing `ACCESS_DENIED` for a refusal.

    `care_days` is how long a completed consultation keeps the care relationship
    (`PHIVAULT_CARE_RELATIONSHIP_DAYS`). With `authored`, the caller promises to read only
    what the calling doctor wrote when the answer is `Basis.AUTHOR` (an erased patient);
    without it, an erased patient is refused. `facts`: the patient's `chart_facts`, when the
    caller read them already."""
    if facts is None and claims.role == Role.DOCTOR:
        facts = (await session.execute(CHART_FACTS, {
            "patient": patient_id, **chart_parameters(claims, care_days)})).one()
    decision = chart_decision(claims, patient_id, facts, write=write)
    if isinstance(decision, Basis):
        return decision
    if (decision.reason == "erased" and authored and not write
            and await wrote_for(session, claims.user_id, patient_id)):
        return Basis.AUTHOR
    raise deny(session, decision.error(), decision.patient_id, resource_type, decision.reason)


async def wrote_for(session: AsyncSession, doctor_id: uuid.UUID, patient_id: uuid.UUID) -> bool:
    """Whether the doctor created any of the patient's records or wrote any of their
    prescriptions: what keeps an erased patient's chart open to them, for that alone."""
    return bool((await session.execute(select(
        exists().where(MedicalRecord.patient_id == patient_id,
                       MedicalRecord.author_id == doctor_id)
        | exists().where(Prescription.patient_id == patient_id,
                         Prescription.doctor_id == doctor_id)))).scalar())


def break_glass_window() -> timedelta:
    return timedelta(minutes=BREAK_GLASS_MINUTES)
