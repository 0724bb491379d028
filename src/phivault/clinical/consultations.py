"""Consultations (the care relationship), the doctor's patient list, and payments.

A patient's booking is `scheduled` at once. A doctor's consultation for a patient with whom a
care relationship exists (`access/care.py`) is `scheduled` too; for anyone else it is only
`proposed`, and grants nothing until the patient accepts it (`PATCH` to `scheduled`): a doctor
can never grant themselves access. Either party may cancel; only the doctor writes notes or
completes, and only once the consultation's scheduled time has passed (an open consultation
moves only to a time still to come): a completed consultation keeps the relationship for
`PHIVAULT_CARE_RELATIONSHIP_DAYS` after that time, so completing one ahead of time would stretch
a doctor's access and take the patient's cancel away.
"""

from __future__ import annotations

import re
import uuid

from sqlalchemy import ColumnElement, func, select, union
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.access.care import care_from, deny, granting, has_care_relationship
from phivault.access.permissions import Role
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.auth.models import StaffProfile, User
from phivault.auth.service import require_active_user
from phivault.auth.tokens import AccessClaims
from phivault.clinical import notifications
from phivault.clinical.models import (
    Consultation,
    MedicalRecord,
    PatientProfile,
    Payment,
    Prescription,
)
from phivault.clinical.schemas import (
    ConsultationUpdate,
    ConsultationView,
    DoctorProposal,
    PatientBooking,
    PatientListItem,
    PaymentCreate,
    PaymentView,
)
from phivault.crypto.envelope import Envelope
from phivault.db.base import utcnow
from phivault.db.paging import fetch_page
from phivault.errors import Conflict, Forbidden, InvalidRequest, NotFound
from phivault.keys.service import new_row_cipher, row_cipher

TABLE = "consultations"
# Allowed status moves: (from, to) -> who may make them.
TRANSITIONS: dict[tuple[str, str], frozenset[str]] = {
    ("proposed", "scheduled"): frozenset({Role.PATIENT}),
    ("proposed", "cancelled"): frozenset({Role.PATIENT, Role.DOCTOR}),
    ("scheduled", "cancelled"): frozenset({Role.PATIENT, Role.DOCTOR}),
    ("scheduled", "completed"): frozenset({Role.DOCTOR}),
}


async def _view(session: AsyncSession, envelope: Envelope,
                row: Consultation) -> ConsultationView:
    cipher = await row_cipher(session, envelope, TABLE, row.id, row.data_key_id)
    return ConsultationView(
        id=row.id, patient_id=row.patient_id, doctor_id=row.doctor_id,
        scheduled_at=row.scheduled_at, status=row.status, reason=cipher.open("reason", row.reason),
        notes=cipher.open_optional("notes", row.notes), created_at=row.created_at,
        updated_at=row.updated_at)


async def create(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                 body: PatientBooking | DoctorProposal, *, care_days: int) -> ConsultationView:
    """Book (a patient) or propose (a doctor) a consultation; `care_days` is how long a
    completed consultation keeps the care relationship (`PHIVAULT_CARE_RELATIONSHIP_DAYS`)."""
    if isinstance(body, PatientBooking):
        patient_id, doctor_id = claims.user_id, body.doctor_id
        await require_active_user(session, patient_id)  # not after an erasure that just won
        doctor = await session.get(User, doctor_id)
        if doctor is None or doctor.role != Role.DOCTOR or doctor.status != "active":
            raise deny(session, NotFound("No such doctor."), None, "consultation",
                       "no_such_doctor")
        status = "scheduled"
    else:
        patient_id, doctor_id = body.patient_id, claims.user_id
        # The patient's row, share-locked: the patient ending this doctor's relationship (or
        # erasing their account) locks it exclusively, so this check comes after that end
        # rather than racing it into a `scheduled` consultation that would restore access.
        account = (await session.execute(select(User.status).where(
            User.id == patient_id, User.role == Role.PATIENT).with_for_update(read=True))
        ).scalar_one_or_none()
        if account is None or account == "deleted":  # an erased patient books nothing more
            raise deny(session, NotFound("No such patient."), None, "consultation",
                       "no_such_patient" if account is None else "erased")
        known = await has_care_relationship(session, doctor_id, patient_id,
                                            care_days=care_days)
        status = "scheduled" if known else "proposed"
    now = utcnow()
    row_id = uuid.uuid4()
    cipher = new_row_cipher(session, envelope, TABLE, row_id)
    row = Consultation(id=row_id, patient_id=patient_id, doctor_id=doctor_id,
                       data_key_id=cipher.data_key_id, scheduled_at=body.scheduled_at,
                       status=status, reason=cipher.seal("reason", body.reason), notes=None,
                       created_by=claims.user_id, created_at=now, updated_at=now)
    session.add(row)
    if status == "proposed":
        notifications.notify(session, envelope, patient_id, "consultation_proposed",
                             await _proposal_text(session, doctor_id, row))
    audit.record(session, Action.CREATE_CONSULTATION, resource_type="consultation",
                 resource_id=row_id, patient_id=patient_id, metadata={"status": status})
    return await _view(session, envelope, row)


async def _proposal_text(session: AsyncSession, doctor_id: uuid.UUID,
                         row: Consultation) -> str:
    """What the patient is told of a proposal: who (the doctor's name and specialty, from the
    staff directory), what (a consultation, its time and id) and what to do about it. Sealed
    in the notification like any of its text."""
    profile = await session.get(StaffProfile, doctor_id)
    who = "A doctor"
    if profile is not None:
        who = f"{profile.full_name} (doctor" + (
            f", {profile.specialty})" if profile.specialty else ")")
    return (f"{who} proposed a consultation with you on {row.scheduled_at:%Y-%m-%d %H:%M} UTC "
            f"(consultation {row.id}). Accept it to start your care relationship with them, "
            "or cancel it.")


# Erased patients' ids: a doctor neither lists nor changes their consultations any more (the
# consultations stay, as medical history; SPEC §9 leaves the doctor only what they wrote in
# records and prescriptions).
_ERASED = select(User.id).where(User.role == Role.PATIENT, User.status == "deleted")


def _party_filter(claims: AccessClaims) -> ColumnElement[bool]:
    if claims.role == Role.PATIENT:
        return Consultation.patient_id == claims.user_id
    return (Consultation.doctor_id == claims.user_id) & Consultation.patient_id.not_in(_ERASED)


async def list_own(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                   limit: int, offset: int) -> tuple[list[ConsultationView], int]:
    rows, total = await fetch_page(session, select(Consultation).where(_party_filter(claims))
                                   .order_by(Consultation.scheduled_at.desc(), Consultation.id),
                                   limit, offset)
    views = [await _view(session, envelope, row) for row in rows]
    for view in views:
        audit.record(session, Action.VIEW_CONSULTATION, resource_type="consultation",
                     resource_id=view.id, patient_id=view.patient_id)
    return views, total


async def update(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                 consultation_id: uuid.UUID, body: ConsultationUpdate) -> ConsultationView:
    row = (await session.execute(select(Consultation).where(
        Consultation.id == consultation_id, _party_filter(claims)).with_for_update())
    ).scalar_one_or_none()
    if row is None:
        raise deny(session, NotFound(), None, "consultation", "not_a_party")
    if body.status is None and body.scheduled_at is None and body.notes is None:
        raise InvalidRequest("Send at least one of status, scheduled_at and notes.")
    now = utcnow()
    changed: dict[str, str | bool] = {}
    if body.notes is not None:
        if claims.role != Role.DOCTOR:
            raise deny(session, Forbidden("Only the doctor writes a consultation's notes."),
                       row.patient_id, "consultation", "notes_by_patient")
        cipher = await row_cipher(session, envelope, TABLE, row.id, row.data_key_id)
        row.notes = cipher.seal("notes", body.notes)
        changed["notes_changed"] = True
    if body.scheduled_at is not None:
        if row.status not in ("proposed", "scheduled"):
            raise Conflict("A completed or cancelled consultation cannot move.")
        if body.scheduled_at <= now:
            # Into the past, a consultation could be completed at once: completion waits for
            # the time the patient agreed to.
            raise InvalidRequest("A consultation moves only to a time still to come.")
        row.scheduled_at = body.scheduled_at
        changed["rescheduled"] = True
    if body.status is not None and body.status != row.status:
        allowed = TRANSITIONS.get((row.status, body.status))
        if allowed is None:
            raise Conflict(f"A {row.status} consultation cannot become {body.status}.")
        if claims.role not in allowed:
            raise deny(session, Forbidden("Only the patient accepts a proposal; only the doctor "
                                          "completes."), row.patient_id, "consultation",
                       "transition_not_allowed")
        if body.status == "completed" and row.scheduled_at > now:
            raise Conflict("A consultation can be completed only once its scheduled time has "
                           "passed.")
        changed["from"], changed["to"] = row.status, body.status
        row.status = body.status
    row.updated_at = now
    audit.record(session, Action.UPDATE_CONSULTATION, resource_type="consultation",
                 resource_id=row.id, patient_id=row.patient_id, metadata=changed)
    return await _view(session, envelope, row)


async def patients_of(session: AsyncSession, envelope: Envelope, doctor_id: uuid.UUID,
                      limit: int, offset: int, *,
                      care_days: int) -> tuple[list[PatientListItem], int]:
    """The patients with whom the doctor has a care relationship now (the chart gate's
    `granting`, with `care_days` its window): id, name, birth year; and the erased patients
    whose records or prescriptions the doctor wrote, by their pseudonymous id alone (SPEC §9:
    the doctor keeps their own notes, nobody sees identity)."""
    cared = select(Consultation.patient_id).where(
        Consultation.doctor_id == doctor_id, granting(care_from(utcnow(), care_days)),
        Consultation.patient_id.not_in(_ERASED))
    wrote = union(
        select(MedicalRecord.patient_id).where(MedicalRecord.author_id == doctor_id),
        select(Prescription.patient_id).where(Prescription.doctor_id == doctor_id)).subquery()
    erased = select(wrote.c.patient_id).where(wrote.c.patient_id.in_(_ERASED))
    ids = union(cared, erased).subquery()
    total = int((await session.execute(select(func.count()).select_from(ids))).scalar_one())
    rows = (await session.execute(
        select(PatientProfile, User.status).join(User, User.id == PatientProfile.user_id)
        .where(PatientProfile.user_id.in_(select(ids.c.patient_id)))
        .order_by(PatientProfile.user_id).limit(limit).offset(offset))).all()
    items = []
    for profile, status in rows:
        if status == "deleted":
            items.append(PatientListItem(id=profile.user_id, full_name=None, birth_year=None))
            continue
        cipher = await row_cipher(session, envelope, "patient_profiles", profile.user_id,
                                  profile.data_key_id)
        birth = cipher.open_optional("birth_date", profile.birth_date)
        items.append(PatientListItem(id=profile.user_id,
                                     full_name=cipher.open_optional("full_name",
                                                                    profile.full_name),
                                     birth_year=int(birth[:4]) if birth else None))
    # One event per patient listed: each sees this read in their own access log.
    for item in items:
        audit.record(session, Action.VIEW_PATIENT_LIST, resource_type="patient_profile",
                     resource_id=item.id, patient_id=item.id)
    return items, total


# Payments.

def _payment_view(row: Payment) -> PaymentView:
    return PaymentView(id=row.id, patient_id=row.patient_id,
                       consultation_id=row.consultation_id, amount=row.amount,
                       currency=row.currency, status=row.status,
                       provider_reference=row.provider_reference, created_at=row.created_at)


# Digits, possibly grouped by single separators (4111-1111-1111-1111, 4111.1111..., 4111 1111...).
_DIGIT_RUNS = re.compile(r"\d(?:[-._: /]?\d)*")


def _luhn(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char)
        total += d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2)
    return total % 10 == 0


def _looks_like_card_number(text: str) -> bool:
    """A run of 13 to 19 digits (separators - and space ignored) passing the Luhn check, alone
    or inside the text: a card number in the wrong field, which phivault must never store."""
    runs = (re.sub(r"\D", "", run) for run in _DIGIT_RUNS.findall(text))
    return any(13 <= len(run) <= 19 and _luhn(run) for run in runs)


async def pay(session: AsyncSession, claims: AccessClaims, consultation_id: uuid.UUID,
              body: PaymentCreate) -> PaymentView:
    await require_active_user(session, claims.user_id)
    row = await session.get(Consultation, consultation_id)
    if row is None or row.patient_id != claims.user_id:
        raise deny(session, NotFound(), None, "payment", "not_my_consultation")
    if _looks_like_card_number(body.provider_reference):
        raise InvalidRequest("provider_reference looks like a card number; phivault never "
                             "accepts card data.")
    payment = Payment(id=uuid.uuid4(), patient_id=claims.user_id, consultation_id=row.id,
                      amount=body.amount, currency=body.currency, status="pending",
                      provider_reference=body.provider_reference, created_at=utcnow())
    session.add(payment)
    audit.record(session, Action.CREATE_PAYMENT, resource_type="payment", resource_id=payment.id,
                 patient_id=claims.user_id)
    return _payment_view(payment)


async def my_payments(session: AsyncSession, claims: AccessClaims, limit: int,
                      offset: int) -> tuple[list[PaymentView], int]:
    rows, total = await fetch_page(session, select(Payment).where(
        Payment.patient_id == claims.user_id).order_by(Payment.created_at.desc(), Payment.id),
        limit, offset)
    audit.record(session, Action.VIEW_PAYMENT, resource_type="payment",
                 patient_id=claims.user_id, metadata={"count": len(rows)})
    return [_payment_view(r) for r in rows], total
