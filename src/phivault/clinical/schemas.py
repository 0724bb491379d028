"""Request and response models of the clinical routes."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from phivault.schemas import (
    MULTI_LINE,
    SINGLE_LINE,
    RequestModel,
    Upcoming,
    UUIDText,
    examples,
)

ConsultationStatus = Literal["proposed", "scheduled", "completed", "cancelled"]
ClinicalText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                                max_length=10_000), MULTI_LINE]
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                             max_length=500), SINGLE_LINE]
PrescriptionLine = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                                    max_length=500), SINGLE_LINE]
Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                          max_length=2_000), MULTI_LINE]


# A booking's time: ISO 8601 with an offset, not in the past, kept in UTC (phivault.schemas).
When = Upcoming


class PatientBooking(RequestModel):
    """A patient books a doctor."""

    model_config = examples({
        "doctor_id": "00000000-0000-4000-8000-00000000d0c1",
        "scheduled_at": "2031-05-04T10:00:00Z", "reason": "A persistent cough"})

    doctor_id: UUIDText
    scheduled_at: When
    reason: Reason


class DoctorProposal(RequestModel):
    """A doctor schedules (existing patient) or proposes (new patient) a consultation."""

    model_config = examples({
        "patient_id": "00000000-0000-4000-8000-0000000000a1",
        "scheduled_at": "2031-05-04T10:00:00+02:00", "reason": "Follow-up of a referral"})

    patient_id: UUIDText
    scheduled_at: When
    reason: Reason


class ConsultationUpdate(RequestModel):
    model_config = examples({"status": "scheduled"}, {"notes": "Listened to the chest; no wheeze."})

    status: ConsultationStatus | None = None
    scheduled_at: When | None = None
    notes: ClinicalText | None = None


class ConsultationView(BaseModel):
    id: uuid.UUID
    patient_id: uuid.UUID
    doctor_id: uuid.UUID
    scheduled_at: datetime
    status: str
    reason: str
    notes: str | None
    created_at: datetime
    updated_at: datetime


class PatientListItem(BaseModel):
    id: uuid.UUID
    full_name: str | None
    birth_year: int | None


class RecordCreate(RequestModel):
    model_config = examples({
        "diagnosis": "Acute bronchitis", "prescriptions": ["Rest", "Fluids"],
        "notes": "Review in a week."})

    diagnosis: ClinicalText
    prescriptions: list[PrescriptionLine] = Field(max_length=50)
    notes: ClinicalText | None = None


class RecordAmend(RequestModel):
    model_config = examples({"notes": "Better at review; no further treatment."})

    diagnosis: ClinicalText | None = None
    prescriptions: list[PrescriptionLine] | None = Field(default=None, max_length=50)
    notes: ClinicalText | None = None


class RecordView(BaseModel):
    id: uuid.UUID
    patient_id: uuid.UUID
    author_id: uuid.UUID
    version: int
    diagnosis: str
    prescriptions: list[str]
    notes: str | None
    created_at: datetime
    updated_at: datetime


class PrescriptionCreate(RequestModel):
    model_config = examples({
        "medication": "Amoxicillin", "dosage": "500 mg", "instructions": "Three times a day."})

    medication: ShortText
    dosage: ShortText
    instructions: ClinicalText


class PrescriptionView(BaseModel):
    id: uuid.UUID
    patient_id: uuid.UUID
    doctor_id: uuid.UUID
    medication: str
    dosage: str
    instructions: str
    created_at: datetime


class AttachmentView(BaseModel):
    id: uuid.UUID
    patient_id: uuid.UUID
    uploader_id: uuid.UUID
    filename: str
    content_type: str
    size: int
    created_at: datetime


Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
ProviderReference = Annotated[str, StringConstraints(min_length=1, max_length=128,
                                                     pattern=r"^[A-Za-z0-9_.:-]+$")]


class PaymentCreate(RequestModel):
    """Amount in minor units (cents). Only these fields: anything else, card data included,
    is refused with 422."""

    model_config = examples({
        "amount": 4500, "currency": "EUR", "provider_reference": "ch_EXAMPLE_0001"})

    amount: int = Field(ge=1, le=100_000_000)
    currency: Currency
    provider_reference: ProviderReference


class PaymentView(BaseModel):
    id: uuid.UUID
    patient_id: uuid.UUID
    consultation_id: uuid.UUID
    amount: int
    currency: str
    status: str
    provider_reference: str
    created_at: datetime


class BreakGlassRequest(RequestModel):
    model_config = examples({
        "reason": "Unconscious in the emergency room, allergies unknown"})

    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=20,
                                             max_length=1000), MULTI_LINE]


class BreakGlassAnswer(BaseModel):
    expires_at: datetime


class NotificationView(BaseModel):
    id: uuid.UUID
    kind: str
    text: str
    created_at: datetime
    read_at: datetime | None
