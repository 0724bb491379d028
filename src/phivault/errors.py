"""Domain errors: what services raise. `web/errors.py` maps each to one status and error code.

A domain error's message is a fixed human sentence, never built from user input or PHI.
"""

from __future__ import annotations


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


class RefreshTokenReused(InvalidToken):
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
