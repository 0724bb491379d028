"""Accounts and sessions: users, staff profiles, login sessions (token families), refresh tokens."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, LargeBinary, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.base import Base, UTCDateTime

BIGINT = BigInteger().with_variant(Integer, "sqlite")


class User(Base):
    """An account. The email (PHI) is sealed under the row's data key; `email_index` is its
    blind index, unique while the account has an email (erasure clears both). `status` is
    `active`, `pending` (a staff account waiting for a second admin, SPEC §6), `disabled` or
    `deleted`."""

    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    data_key_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    email: Mapped[bytes | None] = mapped_column(LargeBinary(512))
    email_index: Mapped[bytes | None] = mapped_column(LargeBinary(32), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16), index=True)
    status: Mapped[str] = mapped_column(String(16))
    totp_secret: Mapped[bytes | None] = mapped_column(LargeBinary(256))
    totp_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    totp_last_step: Mapped[int | None] = mapped_column(BIGINT)
    setup_token_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32), unique=True)
    setup_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    password_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The admin who created a staff account through the API (None: the CLI, a registration or
    # an import). With staff approval on, that admin may never approve it (SPEC §6).
    created_by: Mapped[uuid.UUID | None] = mapped_column(Uuid())


class StaffProfile(Base):
    """A doctor's, admin's or auditor's name and specialty: staff directory data, not PHI."""

    __tablename__ = "staff_profiles"

    user_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"), primary_key=True)
    full_name: Mapped[str] = mapped_column(String(200))
    specialty: Mapped[str | None] = mapped_column(String(100))


class AuthSession(Base):
    """A login: the family of refresh tokens it starts, and the `sid` of its access tokens.

    It ends `expires_at` after the login whatever the rotations; revoking it ends every token of
    the family at once. `kind` is `login`, or `mfa_enrollment` for the short session that lets a
    user whose role requires TOTP enrol before getting real tokens.
    """

    __tablename__ = "auth_sessions"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ip: Mapped[str | None] = mapped_column(String(45))
    user_agent: Mapped[str | None] = mapped_column(String(256))


class RefreshToken(Base):
    """One refresh token, stored only as the SHA-256 of its 256 random bits."""

    __tablename__ = "refresh_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    session_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("auth_sessions.id"),
                                                  index=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("users.id"))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


Index("ix_auth_sessions_user_live", AuthSession.user_id, AuthSession.revoked_at)
