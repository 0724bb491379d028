"""Consent history: append-only, one row per change (SPEC §4, §9)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.base import Base, UTCDateTime


class Consent(Base):
    """One version of a patient's consents; the newest is the current one."""

    __tablename__ = "consents"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"), index=True)
    marketing: Mapped[bool] = mapped_column(Boolean)
    data_sharing: Mapped[bool] = mapped_column(Boolean)
    analytics: Mapped[bool] = mapped_column(Boolean)
    consent_date: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
