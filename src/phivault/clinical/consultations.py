"""Consultations (the care relationship), the doctor's patient list, and payments.

A patient's booking is `scheduled` at once. A doctor's consultation for a patient with whom a
care relationship exists is `scheduled` too; for anyone else it is only `proposed`, and grants
nothing until the patient accepts it (`PATCH` to `scheduled`): a doctor can never grant
themselves access. Either party may cancel; only the doctor writes notes or completes.
"""

from __future__ import annotations

import re
import uuid
from datetime import date

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.access.care import CARE_STATUSES, deny, has_care_relationship, is_patient
from phivault.access.permissions import Role
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.auth.models import User
from phivault.auth.tokens import AccessClaims
from phivault.clinical import notifications
from phivault.clinical.models import Consultation, PatientProfile, Payment
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
                 body: PatientBooking | DoctorProposal) -> ConsultationView:
    if isinstance(body, PatientBooking):
        patient_id, doctor_id = claims.user_id, body.doctor_id
        doctor = await session.get(User, doctor_id)
        if doctor is None or doctor.role != Role.DOCTOR or doctor.status != "active":
            raise deny(session, NotFound("No such doctor."), None, "consultation",
                       "no_such_doctor")
        status = "scheduled"
    else:
        patient_id, doctor_id = body.patient_id, claims.user_id
        if not await is_patient(session, patient_id):
            raise deny(session, NotFound("No such patient."), None, "consultation",
                       "no_such_patient")
        known = await has_care_relationship(session, doctor_id, patient_id)
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
                             "A doctor proposed a consultation; accept it to start your care "
                             "relationship, or cancel it.")
    audit.record(session, Action.CREATE_CONSULTATION, resource_type="consultation",
                 resource_id=row_id, patient_id=patient_id, metadata={"status": status})
    return await _view(session, envelope, row)


def _party_filter(claims: AccessClaims) -> ColumnElement[bool]:
    if claims.role == Role.PATIENT:
        return Consultation.patient_id == claims.user_id
    return Consultation.doctor_id == claims.user_id


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
    row = await session.get(Consultation, consultation_id, with_for_update=True)
    is_party = row is not None and claims.user_id in (row.patient_id, row.doctor_id)
    if row is None or not is_party:
        raise deny(session, NotFound(), None, "consultation", "not_a_party")
    if body.status is None and body.scheduled_at is None and body.notes is None:
        raise InvalidRequest("Send at least one of status, scheduled_at and notes.")
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
        changed["from"], changed["to"] = row.status, body.status
        row.status = body.status
    row.updated_at = utcnow()
    audit.record(session, Action.UPDATE_CONSULTATION, resource_type="consultation",
                 resource_id=row.id, patient_id=row.patient_id, metadata=changed)
    return await _view(session, envelope, row)


async def patients_of(session: AsyncSession, envelope: Envelope, doctor_id: uuid.UUID,
                      limit: int, offset: int) -> tuple[list[PatientListItem], int]:
    """The patients with whom the doctor has a care relationship: id, name, birth year."""
    ids = (select(Consultation.patient_id).where(Consultation.doctor_id == doctor_id,
                                                 Consultation.status.in_(CARE_STATUSES))
           .distinct())
    total = int((await session.execute(
        select(func.count()).select_from(ids.subquery()))).scalar_one())
    profiles = (await session.execute(
        select(PatientProfile).where(PatientProfile.user_id.in_(ids))
        .order_by(PatientProfile.user_id).limit(limit).offset(offset))).scalars().all()
    items = []
    for profile in profiles:
        cipher = await row_cipher(session, envelope, "patient_profiles", profile.user_id,
                                  profile.data_key_id)
        birth = cipher.open_optional("birth_date", profile.birth_date)
        items.append(PatientListItem(id=profile.user_id,
                                     full_name=cipher.open_optional("full_name",
                                                                    profile.full_name),
                                     birth_year=date.fromisoformat(birth).year if birth else None))
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
