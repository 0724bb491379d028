"""Authentication: login, refresh-token rotation, logout, sessions, password change, TOTP.

Framework-free: every function takes the request's session and raises domain errors. A login
starts a session (a refresh-token family) that ends `refresh_token_ttl` after the login whatever
the rotations; access tokens carry its id as `sid`, and `check_session` refuses them the moment
the session is revoked or the user is no longer active (on other workers and hosts within a
second: `session_cache.py`).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NoReturn

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.audit import service as audit
from phivault.audit.actions import Action, Outcome
from phivault.auth import mfa
from phivault.auth.models import AuthSession, RefreshToken, User
from phivault.auth.passwords import Passwords, password_problem
from phivault.auth.ratelimits import AuthLimits
from phivault.auth.session_cache import SessionCache, SessionState, session_cache_of
from phivault.auth.tokens import AccessClaims, AccessTokens
from phivault.crypto.blind_index import BlindIndex, normalise_email
from phivault.crypto.envelope import Envelope
from phivault.db.base import core_table, utcnow
from phivault.db.phases import reads_only
from phivault.errors import (
    InvalidCredentials,
    InvalidRefreshToken,
    InvalidToken,
    MfaEnrollmentRequired,
    MfaRequired,
    NotFound,
    RefreshTokenReused,
    WeakPassword,
)
from phivault.keys.service import RowCipher, row_cipher
from phivault.ops import metrics
from phivault.request_context import Actor, current_request

LOGIN = "login"
MFA_ENROLLMENT = "mfa_enrollment"
ENROLLMENT_MINUTES = 10


def token_digest(token: str) -> bytes:
    """SHA-256 of an opaque token: a slow hash buys nothing for 256 random bits."""
    return hashlib.sha256(token.encode()).digest()


def new_opaque_token() -> str:
    return secrets.token_urlsafe(32)


def email_lookup(index: BlindIndex, email: str) -> bytes:
    """The blind index a user's email is stored under (the current index key)."""
    return index.digest("users", "email", normalise_email(email))


def email_lookups(index: BlindIndex, email: str) -> tuple[bytes, ...]:
    """Every blind index an email may be stored under: during a rotation of the index key,
    rows not yet made again (`phivault keys reindex`) still hold the previous key's."""
    return index.digests("users", "email", normalise_email(email))


async def user_cipher(session: AsyncSession, envelope: Envelope, user: User) -> RowCipher:
    return await row_cipher(session, envelope, "users", user.id, user.data_key_id)


@dataclass(frozen=True, slots=True)
class PasswordChecked:
    """A login's first step passed: the account (share-locked), the lock-out's key for it, and
    the password's new hash when its parameters are out of date."""

    user: User
    account: str
    rehashed: str | None


@dataclass(frozen=True, slots=True)
class IssuedTokens:
    access_token: str
    refresh_token: str
    expires_in: int


# Run on every authenticated request: built once, so a request only binds its two ids (building
# a statement costs more than executing a cached one).
_SESSIONS, _USERS = core_table(AuthSession), core_table(User)
_SESSION_STATE = (
    select(_SESSIONS.c.kind, _SESSIONS.c.revoked_at, _SESSIONS.c.expires_at, _USERS.c.status,
           _USERS.c.role)
    .join(_USERS, _USERS.c.id == _SESSIONS.c.user_id)
    .where(_SESSIONS.c.id == bindparam("session_id"),
           _SESSIONS.c.user_id == bindparam("user_id"))
)


class Authenticator:
    """The authentication service of one runtime (its keys, hasher, limits and TTLs)."""

    def __init__(self, *, envelope: Envelope, blind_index: BlindIndex, passwords: Passwords,
                 limits: AuthLimits, tokens: AccessTokens, refresh_ttl: int,
                 mfa_roles: frozenset[str], session_cache: SessionCache | None = None) -> None:
        self.envelope = envelope
        self.blind_index = blind_index
        self.passwords = passwords
        self.limits = limits
        self.tokens = tokens
        self.refresh_ttl = refresh_ttl
        self.mfa_roles = mfa_roles
        self.session_cache = session_cache or SessionCache(0)

    # Login.

    async def login(self, session: AsyncSession, email: str, password: str,
                    totp_code: str | None) -> IssuedTokens:
        """Check the credentials; the same answer, in about the same time, for an unknown
        email and a wrong password. Five failures lock the account out for the window."""
        step = await self.check_password(session, email, password)
        if step.user.totp_enabled:
            if totp_code is None:
                await self.second_factor_needed(session, step)
                raise MfaRequired()
            await self._check_totp(session, step.user, totp_code)
        login = await self.open_session(session, step)
        return self._issue(session, step.user, login)

    async def check_password(self, session: AsyncSession, email: str,
                             password: str) -> PasswordChecked:
        """A login's first step: the account of `email`, active, with this password (else
        `InvalidCredentials`, audited and counted by the lock-out), its row share-locked. The
        lock-out's count is not yet cleared: `open_session` clears it."""
        lookup = email_lookup(self.blind_index, email)
        account = lookup.hex()
        await self.limits.begin_attempt(account)
        async with reads_only(session):
            found = (await session.execute(select(User).where(
                User.email_index.in_(email_lookups(self.blind_index, email))).limit(2))
                     ).scalars().all()
        # Two accounts under one email can only follow a misrun index-key rotation (a server
        # with the new key and without the previous one); neither may sign in as the other.
        user = found[0] if len(found) == 1 else None
        # The hash runs with no transaction open (`db/phases.py`), and so does the rehash.
        stored = user.password_hash if user is not None else None
        valid = await self.passwords.verify(stored, password)
        if user is None or not valid or user.status != "active":
            self._failed(session, user, "unknown_account" if user is None
                         else "bad_password" if not valid else "inactive")
        rehashed = (await self.passwords.hash(password)
                    if stored is not None and self.passwords.needs_rehash(stored) else None)
        # The row was read before the (slow) hash: an erasure, a disabling, a password change
        # or TOTP being switched on that committed meanwhile must win, so the row is locked and
        # read again now, before anything below decides on it.
        if not await lock_active_user(session, user.id, password_hash=stored):
            self._failed(session, user, "inactive")
        return PasswordChecked(user, account, rehashed)

    async def second_factor_needed(self, session: AsyncSession,
                                   step: PasswordChecked) -> None:
        """The password was right and the account uses TOTP: this attempt is no failure (the
        code's own attempt is counted in `check_second_factor`), and the trail says a code is
        due."""
        user = step.user
        await self.limits.attempt_succeeded(step.account)
        audit.record(session, Action.LOGIN_FAILURE, outcome=Outcome.DENIED,
                     actor=Actor(user.id, user.role), resource_type="user",
                     resource_id=user.id, metadata={"reason": "mfa_required"})

    async def _check_totp(self, session: AsyncSession, user: User, code: str) -> None:
        secret = (await user_cipher(session, self.envelope, user)).open(
            "totp_secret", user.totp_secret or b"")
        step = mfa.matching_step(secret, code, after_step=user.totp_last_step)
        if step is None or not await _claim_totp_step(session, user.id, step):
            self._failed(session, user, "bad_totp")

    async def check_second_factor(self, session: AsyncSession, user_id: uuid.UUID,
                                  account: str, code: str, *,
                                  password_checked_at: datetime) -> PasswordChecked:
        """A login's second step, for a client that keeps the first step's outcome itself
        (the portal, server-side, for a few minutes): the account still active and using
        TOTP, its password unchanged since it was checked at `password_checked_at` (a change
        meanwhile ends the half-done sign-in, as it ends sessions), and `code` a fresh one. A
        wrong code counts against the lock-out of `account` (`PasswordChecked.account`) like a
        wrong password."""
        await self.limits.begin_attempt(account)
        if not await lock_active_user(session, user_id):
            raise InvalidCredentials()
        user = await session.get(User, user_id)
        if user is None or not user.totp_enabled or (
                user.password_changed_at is not None
                and user.password_changed_at >= password_checked_at):
            raise InvalidCredentials()
        await self._check_totp(session, user, code)
        return PasswordChecked(user, account, None)

    async def open_session(self, session: AsyncSession, step: PasswordChecked) -> AuthSession:
        """A login's last step, once every factor is checked: clear the lock-out's count and
        start the login session (audited `LOGIN_SUCCESS`); a role that must use TOTP and has
        not set it up gets an enrolment session instead (`MfaEnrollmentRequired`)."""
        user = step.user
        await self.limits.attempt_succeeded(step.account)
        if step.rehashed is not None:
            user.password_hash = step.rehashed
        actor = Actor(user.id, user.role)
        if user.role in self.mfa_roles and not user.totp_enabled:
            enrollment = self._start_session(session, user, MFA_ENROLLMENT,
                                             timedelta(minutes=ENROLLMENT_MINUTES))
            audit.record(session, Action.LOGIN_SUCCESS, actor=actor, resource_type="user",
                         resource_id=user.id, metadata={"mfa_enrollment": True})
            token = self.tokens.issue(user.id, user.role, enrollment.id,
                                      scope=MFA_ENROLLMENT, not_after=enrollment.expires_at)
            raise MfaEnrollmentRequired(enrollment_token=token)
        login = self._start_session(session, user, LOGIN, timedelta(seconds=self.refresh_ttl))
        audit.record(session, Action.LOGIN_SUCCESS, actor=actor, resource_type="user",
                     resource_id=user.id, metadata={"session_id": str(login.id)})
        return login

    def refuse(self, session: AsyncSession, step: PasswordChecked, reason: str) -> NoReturn:
        """Refuse a sign-in whose password was right, for `reason` (the portal refuses staff
        other than auditors): answered and audited as a wrong password, and counted by the
        lock-out, so that the refusal tells nobody the password was right."""
        self._failed(session, step.user, reason)

    def _failed(self, session: AsyncSession, user: User | None, reason: str) -> NoReturn:
        """Audit the failed attempt (it stays counted by the lock-out) and refuse it."""
        metrics.auth_failure(reason)
        audit.record(session, Action.LOGIN_FAILURE, outcome=Outcome.DENIED,
                     actor=Actor(user.id, user.role) if user else Actor(None, None),
                     resource_type="user", resource_id=user.id if user else None,
                     metadata={"reason": reason})
        raise InvalidCredentials()

    def _start_session(self, session: AsyncSession, user: User, kind: str,
                       lifetime: timedelta) -> AuthSession:
        now = utcnow()
        ctx = current_request()
        login = AuthSession(id=uuid.uuid4(), user_id=user.id, kind=kind, created_at=now,
                            expires_at=now + lifetime, last_used_at=now, ip=ctx.ip,
                            user_agent=ctx.user_agent)
        session.add(login)
        return login

    def _issue(self, session: AsyncSession, user: User, login: AuthSession) -> IssuedTokens:
        refresh = new_opaque_token()
        now = utcnow()
        session.add(RefreshToken(id=uuid.uuid4(), token_hash=token_digest(refresh),
                                 session_id=login.id, user_id=user.id, issued_at=now,
                                 expires_at=login.expires_at))
        access = self.tokens.issue(user.id, user.role, login.id, not_after=login.expires_at)
        expires_in = max(0, int(min(self.tokens.ttl_seconds,
                                    (login.expires_at - now).total_seconds())))
        return IssuedTokens(access, refresh, expires_in)

    # Refresh and logout.

    async def refresh(self, session: AsyncSession, refresh_token: str) -> IssuedTokens:
        """Rotate: the presented token is marked used and a new pair returned. A token used
        before (or raced by a concurrent use) revokes its whole family: a stolen copy and the
        genuine client cannot both go on."""
        now = utcnow()
        found = (await session.execute(
            select(RefreshToken, AuthSession, User)
            .join(AuthSession, AuthSession.id == RefreshToken.session_id)
            .join(User, User.id == RefreshToken.user_id)
            .where(RefreshToken.token_hash == token_digest(refresh_token))
        )).one_or_none()
        if found is None:
            raise InvalidRefreshToken()
        token, login, user = found
        if login.revoked_at is not None or token.revoked_at is not None:
            raise InvalidRefreshToken()
        if token.used_at is not None:
            await self._revoke_for_reuse(session, login, user)
        if now >= login.expires_at or user.status != "active" or login.kind != LOGIN:
            raise InvalidRefreshToken()
        # Mark it used only if nobody else did in the meantime: of two concurrent uses, one
        # wins and the other is a reuse.
        claimed = await session.execute(
            update(RefreshToken).where(RefreshToken.id == token.id,
                                       RefreshToken.used_at.is_(None)).values(used_at=now)
            .execution_options(synchronize_session=False))
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            await self._revoke_for_reuse(session, login, user)
        login.last_used_at = now
        ctx = current_request()
        login.ip, login.user_agent = ctx.ip, ctx.user_agent
        audit.record(session, Action.TOKEN_REFRESH, actor=Actor(user.id, user.role),
                     resource_type="session", resource_id=login.id)
        return self._issue(session, user, login)

    async def _revoke_for_reuse(self, session: AsyncSession, login: AuthSession,
                                user: User) -> None:
        await revoke_sessions(session, AuthSession.id == login.id)
        audit.record(session, Action.REFRESH_TOKEN_REUSE, outcome=Outcome.DENIED,
                     actor=Actor(user.id, user.role), resource_type="session",
                     resource_id=login.id)
        raise RefreshTokenReused()

    async def logout(self, session: AsyncSession, refresh_token: str) -> None:
        """End the token's session. An unknown or dead token changes nothing (and says so to
        nobody: logout always answers 204)."""
        found = (await session.execute(
            select(RefreshToken.session_id, User.id, User.role)
            .join(User, User.id == RefreshToken.user_id)
            .where(RefreshToken.token_hash == token_digest(refresh_token))
        )).one_or_none()
        if found is None:
            return
        session_id, user_id, role = found
        if await revoke_sessions(session, AuthSession.id == session_id):
            audit.record(session, Action.LOGOUT, actor=Actor(user_id, role),
                         resource_type="session", resource_id=session_id)

    # Per-request check.

    async def check_session(self, session: AsyncSession, claims: AccessClaims,
                            *, allow_enrollment: bool = False) -> None:
        """Refuse a token whose session was revoked or ended, whose user is no longer active
        or has another role now, or whose scope does not fit the route.

        The database's answer is kept for at most a second (`session_cache.py`), which a
        revocation here or on any other worker evicts. A miss asks in `session`, alone (it
        may hold SQLite's write lock, which another request's question could need)."""
        await self._check_session(lambda: self._session_state(session, claims), claims,
                                  allow_enrollment, alone=True)

    async def check_session_in(self, work: Callable[[], AbstractAsyncContextManager[AsyncSession]],
                               claims: AccessClaims, *, allow_enrollment: bool = False) -> None:
        """`check_session`, where a miss asks in a unit of work of its own (`work`): a route's
        access rule, which runs before the route's own work begins (and a route answered by
        the direct path has none)."""
        async def load() -> SessionState | None:
            async with work() as session:
                return await self._session_state(session, claims)

        await self._check_session(load, claims, allow_enrollment, alone=False)

    @staticmethod
    async def _session_state(session: AsyncSession, claims: AccessClaims) -> SessionState | None:
        row = (await session.execute(_SESSION_STATE, {
            "session_id": claims.session_id, "user_id": claims.user_id})).one_or_none()
        return None if row is None else tuple(row)

    async def _check_session(self, load: Callable[[], Awaitable[SessionState | None]],
                             claims: AccessClaims, allow_enrollment: bool, *,
                             alone: bool) -> None:
        cache = self.session_cache
        state = cache.get(claims.session_id, claims.user_id)
        if state is None:
            state = await cache.fetch(claims.session_id, claims.user_id, load, alone=alone)
            if state is None:
                raise InvalidToken()
        kind, revoked_at, expires_at, status, role = state
        scope_ok = (claims.scope is None and kind == LOGIN) or (
            allow_enrollment and claims.scope == MFA_ENROLLMENT and kind == MFA_ENROLLMENT)
        if (revoked_at is not None or utcnow() >= expires_at or status != "active"
                or role != claims.role or not scope_ok):
            raise InvalidToken()

    # Sessions.

    async def list_sessions(self, session: AsyncSession, user_id: uuid.UUID,
                            current: uuid.UUID) -> list[tuple[AuthSession, bool]]:
        rows = (await session.execute(
            select(AuthSession).where(AuthSession.user_id == user_id,
                                      AuthSession.kind == LOGIN,
                                      AuthSession.revoked_at.is_(None),
                                      AuthSession.expires_at > utcnow())
            .order_by(AuthSession.created_at.desc())
        )).scalars().all()
        return [(row, row.id == current) for row in rows]

    async def end_session(self, session: AsyncSession, user_id: uuid.UUID,
                          session_id: uuid.UUID) -> None:
        """End one of the caller's own sessions; another user's is `not_found`."""
        if not await revoke_sessions(session, AuthSession.id == session_id,
                                     AuthSession.user_id == user_id):
            raise NotFound()
        audit.record(session, Action.SESSION_REVOKED, resource_type="session",
                     resource_id=session_id)

    # Password and TOTP.

    async def change_password(self, session: AsyncSession, user_id: uuid.UUID, current: str,
                              new: str) -> None:
        async with reads_only(session):
            user = await self._user(session, user_id)
            email = (await user_cipher(session, self.envelope, user)).open("email",
                                                                           user.email or b"")
            account = await self._lockout_account(session, user)
        if not await self._recheck_password(user, current, account):
            audit.record(session, Action.PASSWORD_CHANGED, outcome=Outcome.DENIED,
                         resource_type="user", resource_id=user.id,
                         metadata={"reason": "bad_password"})
            raise InvalidCredentials()
        problem = password_problem(new, email)
        if problem:
            raise WeakPassword(f"The new password {problem}.")
        new_hash = await self.passwords.hash(new)
        await self._relock(session, user)
        user.password_hash = new_hash
        user.password_changed_at = utcnow()
        revoked = await revoke_sessions(session, AuthSession.user_id == user.id)
        audit.record(session, Action.PASSWORD_CHANGED, resource_type="user", resource_id=user.id,
                     metadata={"sessions_revoked": revoked})

    async def start_mfa(self, session: AsyncSession, user_id: uuid.UUID,
                        password: str) -> tuple[str, str]:
        """A new TOTP secret (not active until `enable_mfa`), after the password again: a
        stolen access token alone cannot change MFA."""
        user = await self.confirm_password(session, user_id, password,
                                           reason="mfa_setup_bad_password")
        if user.totp_enabled:
            raise InvalidCredentials("Two-factor authentication is already on.")
        cipher = await user_cipher(session, self.envelope, user)
        secret = mfa.new_secret()
        user.totp_secret = cipher.seal("totp_secret", secret)
        user.totp_last_step = None
        email = cipher.open("email", user.email or b"")
        # A new secret replaces any pending one: worth an event, which never holds the secret.
        audit.record(session, Action.MFA_SETUP_STARTED, resource_type="user",
                     resource_id=user.id)
        return secret, mfa.provisioning_uri(secret, email)

    async def enable_mfa(self, session: AsyncSession, user_id: uuid.UUID, code: str,
                         claims: AccessClaims) -> None:
        user = await self._user(session, user_id)
        if user.totp_enabled or user.totp_secret is None:
            raise InvalidCredentials("Start with POST /auth/mfa/setup.")
        secret = (await user_cipher(session, self.envelope, user)).open("totp_secret",
                                                                        user.totp_secret)
        step = mfa.matching_step(secret, code, after_step=user.totp_last_step)
        if step is None or not await _claim_totp_step(session, user.id, step):
            audit.record(session, Action.MFA_ENABLED, outcome=Outcome.DENIED,
                         resource_type="user", resource_id=user.id,
                         metadata={"reason": "bad_totp"})
            raise InvalidCredentials()
        user.totp_enabled = True
        # Sessions opened without the second factor end: from now on logins need it.
        await revoke_sessions(session, AuthSession.user_id == user.id)
        audit.record(session, Action.MFA_ENABLED, resource_type="user", resource_id=user.id)

    async def confirm_password(self, session: AsyncSession, user_id: uuid.UUID,
                               password: str, *, reason: str, exclusive: bool = False) -> User:
        """The caller's current password again before a sensitive act (TOTP set-up, erasure),
        under the login lock-out; a wrong one writes `ACCESS_DENIED` with `reason` and answers
        `invalid_credentials`. The hash runs with no transaction open; the act that follows
        runs in a new one, with the account locked and read again (the user, as it is now, is
        returned). `exclusive`: locked for update, for an act that will lock it so anyway
        (erasure): two such acts that each share-locked it first would then deadlock waiting
        for each other to let go (an outside review got 500s from parallel erasures)."""
        async with reads_only(session):
            user = await self._user(session, user_id)
            account = await self._lockout_account(session, user)
        if not await self._recheck_password(user, password, account):
            audit.record(session, Action.ACCESS_DENIED, outcome=Outcome.DENIED,
                         resource_type="user", resource_id=user.id,
                         metadata={"reason": reason})
            raise InvalidCredentials()
        await self._relock(session, user, exclusive=exclusive)
        return user

    async def _lockout_account(self, session: AsyncSession, user: User) -> str:
        """The lock-out's key for `user`: the one logins use, the email's digest under the
        current index key (not the stored digest, which during a rotation of that key may
        still be the previous key's: the two would count apart)."""
        if user.email is None:
            return user.id.hex
        email = (await user_cipher(session, self.envelope, user)).open("email", user.email)
        return email_lookup(self.blind_index, email).hex()

    async def _recheck_password(self, user: User, password: str, account: str) -> bool:
        """The current password again (password change, TOTP set-up, erasure), under the same
        lock-out as logins (`account`, from `_lockout_account`): a stolen access token is no
        password-guessing oracle."""
        await self.limits.begin_attempt(account)
        if not await self.passwords.verify(user.password_hash, password):
            return False
        await self.limits.attempt_succeeded(account)
        return True

    async def _user(self, session: AsyncSession, user_id: uuid.UUID) -> User:
        user = await session.get(User, user_id)
        if user is None or user.status != "active":
            raise InvalidToken()
        return user

    @staticmethod
    async def _relock(session: AsyncSession, user: User, *, exclusive: bool = False) -> None:
        """After a hash run outside the transaction: the account is still active and its
        password unchanged (a concurrent change wins; this request's check is stale)."""
        if not await lock_active_user(session, user.id, password_hash=user.password_hash,
                                      exclusive=exclusive):
            raise InvalidToken()


async def _claim_totp_step(session: AsyncSession, user_id: uuid.UUID, step: int) -> bool:
    """Record `step` as used, unless it (or a later one) already was: of two concurrent logins
    with one code, exactly one wins."""
    result = await session.execute(
        update(User).where(User.id == user_id,
                           (User.totp_last_step.is_(None)) | (User.totp_last_step < step))
        .values(totp_last_step=step).execution_options(synchronize_session=False))
    return int(result.rowcount) == 1  # type: ignore[attr-defined]


async def lock_active_user(session: AsyncSession, user_id: uuid.UUID, *,
                           password_hash: str | None = None, exclusive: bool = False) -> bool:
    """Share-lock the user's row and answer whether the account is still active (and, given
    `password_hash`, still has that password: one checked outside the transaction).

    Erasure and disabling lock the row for update, so a write made in an account's name (a
    login's session, a consent change, a booking, a rectification) either commits before them or
    sees the account gone: its request checked the account at its start, which is not enough
    (an outside review made erased accounts' consents and bookings come back that way). SQLite
    needs no lock: every writing transaction there begins IMMEDIATE, one at a time."""
    # `populate_existing`: a `User` the caller read earlier (before a hash run outside the
    # transaction, `db/phases.py`) now shows the row as locked.
    user = (await session.execute(select(User).where(User.id == user_id)
                                  .with_for_update(read=not exclusive)
                                  .execution_options(populate_existing=True))
            ).scalar_one_or_none()
    if user is None or user.status != "active":
        return False
    return password_hash is None or user.password_hash == password_hash


async def require_active_user(session: AsyncSession, user_id: uuid.UUID) -> None:
    """`lock_active_user`, or `InvalidToken`: the caller's account has just gone."""
    if not await lock_active_user(session, user_id):
        raise InvalidToken()


async def require_live_session(session: AsyncSession, claims: AccessClaims) -> None:
    """The caller's account still active (share-locked, as `require_active_user`) and their
    session still live, read now, past every cache: for a write made long after the request's
    own check (an upload whose body took minutes), which a revocation, a disabling or an
    erasure that committed meanwhile must stop."""
    await require_active_user(session, claims.user_id)
    row = (await session.execute(_SESSION_STATE, {
        "session_id": claims.session_id, "user_id": claims.user_id})).one_or_none()
    if row is None or row.revoked_at is not None or utcnow() >= row.expires_at:
        raise InvalidToken()


async def revoke_sessions(session: AsyncSession, *where: object) -> int:
    """Revoke the live sessions matching `where` (and so every token of their families);
    returns how many.

    Every revocation goes through here (a disabled, re-roled or erased account too: its
    status changes in the same transaction), so this is where the session-check caches learn
    of it: in this process at once, on every worker once the transaction commits."""
    now = utcnow()
    revoked_users = (await session.execute(
        update(AuthSession).where(*where, AuthSession.revoked_at.is_(None))  # type: ignore[arg-type]
        .values(revoked_at=now).returning(AuthSession.user_id)
        .execution_options(synchronize_session=False))).scalars().all()
    cache = session_cache_of(session)
    if cache is not None and revoked_users:
        cache.revoked(session, revoked_users)
    return len(revoked_users)


__all__ = ["Authenticator", "IssuedTokens", "email_lookup", "email_lookups", "lock_active_user",
           "new_opaque_token", "require_active_user", "require_live_session", "revoke_sessions",
           "token_digest"]
