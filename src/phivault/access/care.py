"""Who may see and change a patient's chart (SPEC §7).

A patient: their own data only; another patient's is `not_found` (they may not even learn it
exists). A doctor: a patient with whom a care relationship exists (a consultation `scheduled`
or `completed` between them) AND whose current consent has `data_sharing = true`; or, for
reading only, a patient for whom the doctor holds an active break-glass grant, whatever the
relationship or consent. Every other role: `forbidden`. Every denial writes `ACCESS_DENIED`.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from enum import StrEnum

from sqlalchemy import bindparam, exists, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.access.permissions import Role
from phivault.audit import service as audit
from phivault.audit.actions import Action, Outcome
from phivault.auth.models import User
from phivault.auth.tokens import AccessClaims
from phivault.clinical.models import BreakGlassGrant, Consultation
from phivault.db.base import core_table, utcnow
from phivault.errors import Forbidden, NoCareRelationship, NoConsent, NotFound
from phivault.privacy.models import Consent

CARE_STATUSES = ("scheduled", "completed")
BREAK_GLASS_MINUTES = 60


class Basis(StrEnum):
    """Why access was granted; `break_glass` marks the access in the patient's access log."""

    SELF = "self"
    CARE = "care"
    BREAK_GLASS = "break_glass"


async def has_care_relationship(session: AsyncSession, doctor_id: uuid.UUID,
                                patient_id: uuid.UUID) -> bool:
    return bool((await session.execute(select(exists().where(
        Consultation.doctor_id == doctor_id, Consultation.patient_id == patient_id,
        Consultation.status.in_(CARE_STATUSES))))).scalar())


async def is_patient(session: AsyncSession, patient_id: uuid.UUID) -> bool:
    return bool((await session.execute(select(exists().where(
        User.id == patient_id, User.role == Role.PATIENT)))).scalar())


def deny(session: AsyncSession, error: Exception, patient_id: uuid.UUID | None,
         resource_type: str, reason: str) -> Exception:
    audit.record(session, Action.ACCESS_DENIED, outcome=Outcome.DENIED,
                 resource_type=resource_type, patient_id=patient_id,
                 metadata={"reason": reason})
    return error


# The four facts a doctor's chart decision needs, in one round trip, built once: this runs on
# every chart request, and building the statement would cost more than executing it.
_USERS, _GRANTS, _CONSULTATIONS, _CONSENTS = (
    core_table(User), core_table(BreakGlassGrant), core_table(Consultation), core_table(Consent))
_CHART_FACTS = select(
    exists().where(_USERS.c.id == bindparam("patient"), _USERS.c.role == Role.PATIENT),
    exists().where(_GRANTS.c.doctor_id == bindparam("doctor"),
                   _GRANTS.c.patient_id == bindparam("patient"),
                   _GRANTS.c.expires_at > bindparam("now")),
    exists().where(_CONSULTATIONS.c.doctor_id == bindparam("doctor"),
                   _CONSULTATIONS.c.patient_id == bindparam("patient"),
                   _CONSULTATIONS.c.status.in_([literal(s) for s in CARE_STATUSES])),
    select(_CONSENTS.c.data_sharing).where(_CONSENTS.c.patient_id == bindparam("patient"))
    .order_by(_CONSENTS.c.version.desc()).limit(1).scalar_subquery(),
)


async def require_chart_access(session: AsyncSession, claims: AccessClaims,
                               patient_id: uuid.UUID, *, write: bool,
                               resource_type: str) -> Basis:
    """Raise unless the caller may read (or, with `write`, change) the patient's chart."""
    if claims.role == Role.PATIENT:
        if claims.user_id == patient_id:
            return Basis.SELF
        raise deny(session, NotFound(), None, resource_type, "other_patient")
    if claims.role != Role.DOCTOR:
        raise deny(session, Forbidden(), patient_id, resource_type, "role")
    patient, glass, care, sharing = (await session.execute(_CHART_FACTS, {
        "doctor": claims.user_id, "patient": patient_id, "now": utcnow()})).one()
    if not patient:
        raise deny(session, NotFound(), None, resource_type, "no_such_patient")
    if glass and not write:
        return Basis.BREAK_GLASS
    if not care:
        raise deny(session, NoCareRelationship(), patient_id, resource_type,
                   "no_care_relationship")
    if not sharing:
        raise deny(session, NoConsent(), patient_id, resource_type, "no_consent")
    return Basis.CARE


def break_glass_window() -> timedelta:
    return timedelta(minutes=BREAK_GLASS_MINUTES)
