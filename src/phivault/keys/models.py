"""The data-key table: one wrapped DEK per row of PHI."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import LargeBinary, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.base import Base, UTCDateTime


class DataKeyRow(Base):
    """A data-encryption key, stored only wrapped by a master key (envelope encryption).

    `kek_id` repeats the id inside `wrapped`'s authenticated header so that `keys status` can
    count and `keys rewrap` can find keys by an index instead of parsing every row; the header
    stays the authority (a mismatch fails to unwrap).

    Rows of PHI name their key in a `data_key_id` column with no foreign key, on purpose:
    deleting a data key destroys every value it sealed (crypto-shredding), and a row whose key
    is gone reads as an integrity failure rather than blocking the deletion.
    """

    __tablename__ = "data_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    kek_id: Mapped[str] = mapped_column(String(64), index=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
