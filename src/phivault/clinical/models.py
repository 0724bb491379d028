"""Clinical tables. Every PHI column holds a ciphertext sealed under the row's data key."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.base import Base, UTCDateTime

BIGINT = BigInteger().with_variant(Integer, "sqlite")


class PatientProfile(Base):
    """A patient's identity data (all PHI, all sealed). The row id is the user id."""

    __tablename__ = "patient_profiles"

    user_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"), primary_key=True)
    data_key_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    full_name: Mapped[bytes | None] = mapped_column(LargeBinary(1024))
    birth_date: Mapped[bytes | None] = mapped_column(LargeBinary(128))
    sex: Mapped[bytes | None] = mapped_column(LargeBinary(128))
    phone: Mapped[bytes | None] = mapped_column(LargeBinary(256))
    address: Mapped[bytes | None] = mapped_column(LargeBinary(1024))


class Consultation(Base):
    """An appointment between a patient and a doctor. `reason` and `notes` are sealed.

    A consultation in status `scheduled` or `completed` is the care relationship that opens the
    patient's chart to the doctor (with the patient's consent)."""

    __tablename__ = "consultations"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"), index=True)
    doctor_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"), index=True)
    data_key_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    scheduled_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[bytes] = mapped_column(LargeBinary(4096))
    notes: Mapped[bytes | None] = mapped_column(LargeBinary(20_000))
    created_by: Mapped[uuid.UUID] = mapped_column(Uuid())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


Index("ix_consultations_care", Consultation.doctor_id, Consultation.patient_id,
      Consultation.status)


class MedicalRecord(Base):
    """A record's identity; its content lives in versions, none ever overwritten or deleted."""

    __tablename__ = "medical_records"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"), index=True)
    author_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"))
    latest_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class MedicalRecordVersion(Base):
    """One version of a record, sealed under its own data key."""

    __tablename__ = "medical_record_versions"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    record_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("medical_records.id"))
    version: Mapped[int] = mapped_column(Integer)
    author_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"))
    data_key_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    diagnosis: Mapped[bytes] = mapped_column(LargeBinary(20_000))
    prescriptions: Mapped[bytes] = mapped_column(LargeBinary(40_000))
    notes: Mapped[bytes | None] = mapped_column(LargeBinary(40_000))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (UniqueConstraint("record_id", "version"),)


class Prescription(Base):
    __tablename__ = "prescriptions"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"), index=True)
    doctor_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"))
    data_key_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    medication: Mapped[bytes] = mapped_column(LargeBinary(1024))
    dosage: Mapped[bytes] = mapped_column(LargeBinary(1024))
    instructions: Mapped[bytes] = mapped_column(LargeBinary(8192))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Attachment(Base):
    """A file's metadata; its bytes are sealed segment by segment in `attachment_segments`."""

    __tablename__ = "attachments"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"), index=True)
    uploader_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"))
    data_key_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    filename: Mapped[bytes] = mapped_column(LargeBinary(1024))
    content_type: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BIGINT)
    segments: Mapped[int] = mapped_column(Integer)
    complete: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AttachmentSegment(Base):
    """One sealed segment of an attachment (the first also holds the stream header)."""

    __tablename__ = "attachment_segments"

    attachment_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("attachments.id"),
                                                     primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary())


class Payment(Base):
    """A payment for a consultation. No card data is ever accepted or stored."""

    __tablename__ = "payments"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"), index=True)
    consultation_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("consultations.id"))
    amount: Mapped[int] = mapped_column(BIGINT)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))
    provider_reference: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Notification(Base):
    __tablename__ = "notifications"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"), index=True)
    data_key_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    kind: Mapped[str] = mapped_column(String(32))
    text: Mapped[bytes] = mapped_column(LargeBinary(4096))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class BreakGlassGrant(Base):
    """Emergency read access of one doctor to one patient's chart, for 60 minutes. The reason
    is clinical free text, so PHI: it is sealed here under the grant's own data key, and the
    BREAK_GLASS audit event names the grant (`resource_id`), through which auditors read it."""

    __tablename__ = "break_glass_grants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    doctor_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"))
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Null only for grants made before reasons were sealed (their reason is in the event).
    data_key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    reason: Mapped[bytes | None] = mapped_column(LargeBinary(4096))


Index("ix_break_glass_active", BreakGlassGrant.doctor_id, BreakGlassGrant.patient_id,
      BreakGlassGrant.expires_at)


class CareEnding(Base):
    """A patient ended a doctor's care relationship (SPEC §7): from then on, no consultation
    between them made up to `ended_at` grants anything; only a newer one does. Append-only:
    each end is a row of its own (the runtime role may not change or delete one)."""

    __tablename__ = "care_endings"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"))
    doctor_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"))
    ended_at: Mapped[datetime] = mapped_column(UTCDateTime())


Index("ix_care_endings_pair", CareEnding.patient_id, CareEnding.doctor_id, CareEnding.ended_at)
