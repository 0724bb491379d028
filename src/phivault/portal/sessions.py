"""The portal's server-side sessions and CSRF tokens (SPEC §15).

The browser holds only a random id in a `__Host-` cookie (HttpOnly, Secure, SameSite=Strict,
Path=/); the database holds its SHA-256 (`PortalSession`). Every sign-in makes a new id, so an
id planted before sign-in is worth nothing afterwards (no fixation). A session ends after
`PHIVAULT_PORTAL_IDLE_MINUTES` without a request, `PHIVAULT_PORTAL_SESSION_HOURS` after sign-in,
or when its login session ends: it stands on a row of `auth_sessions`, checked on every request
by the same `check_session` as an access token, so a password change, a disabled or erased
account, or the patient ending the session elsewhere signs the browser out at once.

Each session has its own CSRF token, sent in every form and compared in constant time. The
sign-in forms, before any session exists, use a double-submit token: a random value in a second
`__Host-` cookie that the form must repeat. SameSite=Strict and the Origin check in
`portal/web.py` stand in front of both.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.auth.models import AuthSession
from phivault.auth.service import PasswordChecked, revoke_sessions
from phivault.auth.tokens import AccessClaims
from phivault.config import Settings
from phivault.db.base import core_table, utcnow
from phivault.portal.models import PortalSession

COOKIE = "__Host-phivault-portal"
SIGN_IN_COOKIE = "__Host-phivault-sign-in"
# How long a half-done sign-in (password right, TOTP code due) waits for its code, and how
# many codes it may try (each wrong one also counts against the account's lock-out).
PENDING_MINUTES = 5
MAX_CODE_ATTEMPTS = 5
_TABLE = core_table(PortalSession)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("ascii", "replace")).digest()


def new_token() -> str:
    """A random cookie value or double-submit token: 32 bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def same_token(given: str | None, expected: str | bytes | None) -> bool:
    """Constant-time comparison of a submitted CSRF token with the expected one."""
    if not given or not expected or len(given) > 128:
        return False
    want = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(given.encode("ascii", "replace"), want)


@dataclass(frozen=True, slots=True)
class Visit:
    """The session a request came with: its row, the CSRF token its forms carry, and (signed
    in) the claims that the services take, as an access token's would be."""

    row: PortalSession
    csrf: str
    claims: AccessClaims | None


def _claims(row: PortalSession) -> AccessClaims | None:
    if row.pending or row.auth_session_id is None:
        return None
    return AccessClaims(row.user_id, row.role, row.auth_session_id, "portal", row.created_at,
                        row.expires_at)


async def _insert(session: AsyncSession, row: PortalSession) -> str:
    value = new_token()
    row.id_digest = _digest(value)
    session.add(row)
    await session.flush()
    return value


async def start_pending(session: AsyncSession, step: PasswordChecked) -> str:
    """Keep a sign-in whose password was right while its TOTP code is due; the cookie value."""
    now = utcnow()
    await purge_expired(session, now)
    return await _insert(session, PortalSession(
        user_id=step.user.id, role=step.user.role, pending=True, account=step.account,
        auth_session_id=None, csrf_token=new_token().encode(), code_attempts=0, created_at=now,
        seen_at=now, expires_at=now + timedelta(minutes=PENDING_MINUTES)))


async def start(session: AsyncSession, settings: Settings, login: AuthSession, role: str,
                replacing: PortalSession | None = None) -> str:
    """The signed-in session of `login` (a new id: the pending one it replaces is deleted);
    the cookie value."""
    now = utcnow()
    if replacing is not None:
        await session.execute(delete(_TABLE).where(_TABLE.c.id_digest == replacing.id_digest))
    await purge_expired(session, now)
    absolute = now + timedelta(hours=settings.portal_session_hours)
    return await _insert(session, PortalSession(
        user_id=login.user_id, role=role, pending=False,
        account=None, auth_session_id=login.id, csrf_token=new_token().encode(),
        code_attempts=0, created_at=now, seen_at=now,
        expires_at=min(absolute, login.expires_at)))


async def load(session: AsyncSession, settings: Settings, cookie: str | None,
               *, touch: bool = True) -> Visit | None:
    """The live session of `cookie`, its idle clock restarted (`touch`); None when there is
    none, or it expired (then it is deleted). The login session under it is checked by the
    caller (`Authenticator.check_session`)."""
    if not cookie or len(cookie) > 128:
        return None
    key = _digest(cookie)
    row = (await session.execute(select(PortalSession).where(PortalSession.id_digest == key))
           ).scalar_one_or_none()
    if row is None:
        return None
    now = utcnow()
    idle = timedelta(minutes=settings.portal_idle_minutes)
    if now >= row.expires_at or now - row.seen_at >= idle:
        await end(session, row)  # and its login session, which nothing else can use
        return None
    if touch:
        await session.execute(update(_TABLE).where(_TABLE.c.id_digest == key)
                              .values(seen_at=now))
    return Visit(row, row.csrf_token.decode(), _claims(row))


async def count_code_attempt(session: AsyncSession, row: PortalSession) -> bool:
    """Count one TOTP code tried on a pending sign-in; False (and the sign-in is ended) once
    `MAX_CODE_ATTEMPTS` were tried. One statement counts and tests, so parallel tries cannot
    all pass a test made before any of them counted."""
    counted = (await session.execute(
        update(_TABLE).where(_TABLE.c.id_digest == row.id_digest,
                             _TABLE.c.code_attempts < MAX_CODE_ATTEMPTS)
        .values(code_attempts=_TABLE.c.code_attempts + 1).returning(_TABLE.c.code_attempts)
    )).scalar_one_or_none()
    if counted is None:
        await end(session, row)
        return False
    return True


async def end(session: AsyncSession, row: PortalSession) -> None:
    """Sign out: the portal session goes, and the login session under it is revoked."""
    await session.execute(delete(_TABLE).where(_TABLE.c.id_digest == row.id_digest))
    if row.auth_session_id is not None:
        await revoke_sessions(session, AuthSession.id == row.auth_session_id,
                              AuthSession.user_id == row.user_id)


async def purge_expired(session: AsyncSession, now: datetime | None = None) -> None:
    """Delete sessions past their absolute end (idle ones go when next presented, or here
    once their absolute end passes)."""
    await session.execute(delete(_TABLE).where(_TABLE.c.expires_at <= (now or utcnow())))

