"""Domain errors: what services raise. `web/errors.py` maps each to one status and error code.

A domain error's message is a fixed human sentence, never built from user input or PHI.

One of them is not raised by a service but by the unit of work: `Unavailable`, for work that
failed because the database could not be reached. `database_unavailable` is the one place that
says which failures those are (see its docstring); the unit of work turns them into
`Unavailable`, and `web/errors.py` answers it with a 503 and `Retry-After`.
"""

from __future__ import annotations

import socket
import sqlite3

from sqlalchemy import exc as sa


class PhivaultError(Exception):
    """Base of every error a service raises on purpose.

    `keeps_work`: the unit of work commits what the request did before the error answers (a
    refresh-token reuse revokes the family, then answers 401). `extra`: more fields for the JSON
    body (never PHI).
    """

    code = "error"
    detail = "The request could not be completed."
    keeps_work = False

    def __init__(self, detail: str | None = None, **extra: object) -> None:
        self.detail = detail or type(self).detail
        self.extra = extra
        super().__init__(self.detail)


class InvalidToken(PhivaultError):
    code = "invalid_token"
    detail = "The access token is missing, malformed, expired or revoked."


class Unauthenticated(PhivaultError):
    code = "unauthenticated"
    detail = "This route needs a bearer access token."


class Forbidden(PhivaultError):
    code = "forbidden"
    detail = "Your role may not do this."


class NotFound(PhivaultError):
    code = "not_found"
    detail = "No such resource."


class Conflict(PhivaultError):
    code = "conflict"
    detail = "The request conflicts with the current state."


class RateLimited(PhivaultError):
    code = "rate_limited"
    detail = "Too many requests; try again later."

    def __init__(self, retry_after: int, detail: str | None = None) -> None:
        super().__init__(detail)
        self.retry_after = max(1, retry_after)


class AccountLockedOut(RateLimited):
    """Too many failed password attempts on one account (the lock-out), not too many requests
    from one address: the audit trail tells the two apart."""

    detail = "Too many failed logins for this account; try again later."


class InvalidCredentials(PhivaultError):
    code = "invalid_credentials"
    detail = "The email, password or code is wrong."


class MfaRequired(PhivaultError):
    code = "mfa_required"
    detail = "This account uses two-factor authentication: send totp_code."


class MfaEnrollmentRequired(PhivaultError):
    """The password was right; the enrolment session it opened must be kept."""

    keeps_work = True
    code = "mfa_enrollment_required"
    detail = ("Your role must use two-factor authentication. Use enrollment_token with "
              "POST /auth/mfa/setup and /auth/mfa/enable, then log in with totp_code.")


class InvalidRefreshToken(InvalidToken):
    """`POST /auth/refresh` with a refresh token that no longer gives tokens: the same 401
    `invalid_token`, with a sentence about the refresh token rather than the access token."""

    detail = ("The refresh token is unknown, expired, revoked or already used; "
              "log in again.")


class RefreshTokenReused(InvalidRefreshToken):
    """A used refresh token came back: its whole family is revoked (and that must commit)."""

    keeps_work = True


class EmailTaken(Conflict):
    code = "email_taken"
    detail = "An account with this email already exists."


class WeakPassword(PhivaultError):
    code = "weak_password"
    detail = "The password is not acceptable."


class InvalidRequest(PhivaultError):
    code = "invalid_request"
    detail = "The request is not acceptable."


class NoCareRelationship(PhivaultError):
    code = "no_care_relationship"
    detail = "You have no care relationship with this patient."


class NoConsent(PhivaultError):
    code = "no_consent"
    detail = "The patient has not consented to share their data."


class PayloadTooLarge(PhivaultError):
    code = "payload_too_large"
    detail = "The request body is too large."


class UnsupportedMedia(PhivaultError):
    code = "unsupported_media_type"
    detail = "Attachments must be PDF, PNG, JPEG or DICOM, and their content must match."


class Unavailable(PhivaultError):
    """The database could not be reached: the work was not done (or, when the connection was lost
    during its COMMIT, was done whole or not at all, with its audit events), and may be tried
    again after `retry_after` seconds."""

    code = "unavailable"
    detail = "The database is unavailable right now; try again shortly."
    retry_after = 5


# SQLSTATEs of a database that is gone for now, not of a bad request: class 08 (connection
# exceptions: lost, refused, rejected, protocol), 57P01-57P03 (terminated by an administrator's
# shutdown, by a crash, or the server is starting up or shutting down), 53300 (no connection
# slot left). A dropped database (57P04), a full disk or a wrong password are not outages that
# pass by themselves: they stay 500s.
_OUTAGE_SQLSTATE_CLASSES = ("08",)
_OUTAGE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# SQLite's SQLITE_BUSY and SQLITE_LOCKED ("database is locked"): still locked after the busy
# timeout (db/engine.py), by another process's long write.
_SQLITE_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` means the database cannot be reached now, not that the work was wrong.

    Yes for: a DBAPI error SQLAlchemy found to be a disconnect (`connection_invalidated`: the
    connection died under the work, the server stopped or restarted); a pool checkout that
    timed out, or a connection the pool could not revive; a connection refused, reset, timed
    out or whose host name does not resolve (asyncpg raises these from `connect` unwrapped);
    the SQLSTATEs above, wrapped or not; SQLite's "database is locked". Everything else (an
    integrity violation, a syntax error, a bad password in the URL) is not an outage and keeps
    its own answer.
    """
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 4:
        seen += 1
        if isinstance(current, sa.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, sa.TimeoutError | sa.DisconnectionError):
            return True
        if isinstance(current, ConnectionError | TimeoutError | socket.gaierror):
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and (sqlstate in _OUTAGE_SQLSTATES
                                          or sqlstate.startswith(_OUTAGE_SQLSTATE_CLASSES)):
            return True
        code = getattr(current, "sqlite_errorcode", None)
        if isinstance(current, sqlite3.OperationalError) and isinstance(code, int) \
                and (code & 0xFF) in _SQLITE_BUSY_CODES:
            return True
        # SQLAlchemy wraps the driver's error (`orig`), and its asyncpg adapter chains
        # asyncpg's own (`__cause__`); no other link is followed.
        if isinstance(current, sa.DBAPIError):
            current = current.orig
        elif type(current).__module__.startswith("sqlalchemy."):
            current = current.__cause__
        else:
            current = None
    return False
