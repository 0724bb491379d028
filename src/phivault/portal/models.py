"""The portal's server-side sessions (SPEC §15)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Integer, LargeBinary, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.base import Base, UTCDateTime


class PortalSession(Base):
    """A browser's session: the cookie holds a random id, the table only its SHA-256, so a copy
    of the table signs nobody in.

    `pending` is a sign-in half done: the password was right, the TOTP code is due (no login
    session yet, `auth_session_id` null, a few minutes to live). A signed-in row names the login
    session it stands on (`auth_sessions`), so everything that revokes logins (a password
    change, a disabled or erased account, ending the session) ends the portal's too.
    """

    __tablename__ = "portal_sessions"

    id_digest: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid(), index=True)
    role: Mapped[str] = mapped_column(String(16))
    pending: Mapped[bool] = mapped_column()
    # The lock-out's key of the sign-in (auth/service.py: `PasswordChecked.account`), kept
    # while the TOTP code is due, so that wrong codes count against the same account.
    account: Mapped[str | None] = mapped_column(String(64))
    auth_session_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    csrf_token: Mapped[bytes] = mapped_column(LargeBinary(32))
    code_attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
