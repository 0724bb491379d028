"""Consent history: append-only, one row per change (SPEC §4, §9)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Integer, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.base import Base, UTCDateTime


class Consent(Base):
    """One version of a patient's consents; the highest `version` is the current one.

    Versions count 1, 2, 3... per patient (a consent change locks the patient's user row to
    number it), so "current" never depends on clocks, which may disagree across hosts."""

    __tablename__ = "consents"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    marketing: Mapped[bool] = mapped_column(Boolean)
    data_sharing: Mapped[bool] = mapped_column(Boolean)
    analytics: Mapped[bool] = mapped_column(Boolean)
    consent_date: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)

    __table_args__ = (UniqueConstraint("patient_id", "version"),)
