"""Clinical tables. Every PHI column holds a ciphertext sealed under the row's data key."""

from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, LargeBinary, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.base import Base


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
