"""The client's exceptions: one class per kind of refusal, carrying the server's error code.

The server answers every error as `{"error": code, "detail": sentence}` (SPEC §10), with the
status its domain error maps to (`web/errors.py`). An app wants to catch meaning, not numbers:
`NoConsent` rather than "a 403 whose body says no_consent". So an answer is mapped by its code
first (the precise meaning), then by its status (a code this client does not know yet still
lands in the right family: a new 403 code is still a `Forbidden`). Every exception carries
`status`, `code`, `detail` and `request_id` (the `X-Request-ID` an operator finds in the logs
and the audit trail), never the request's body or tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


class PhivaultClientError(Exception):
    """Base of every error the client raises. `status` is None when no answer came back."""

    default_code: ClassVar[str] = "error"

    def __init__(self, detail: str, *, status: int | None = None, code: str | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code or self.default_code
        self.detail = detail
        self.request_id = request_id

    def __str__(self) -> str:
        where = f" (request {self.request_id})" if self.request_id else ""
        prefix = f"{self.status} " if self.status is not None else ""
        return f"{prefix}{self.code}: {self.detail}{where}"


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One bad field of a request (`body.password`, `query.limit`) or of an answer, and the
    rule it broke. Never the value: the server does not echo it, the client does not quote it."""

    field: str
    problem: str


# Raised before or instead of an answer.

class ConnectionFailed(PhivaultClientError):
    """The server could not be reached, or the connection broke (no answer, `status` None)."""

    default_code = "connection_failed"


class AnswerTimedOut(ConnectionFailed):
    """An answer's body did not arrive whole within the client's `deadline` (a server that
    sends a byte now and then keeps each read under the `timeout`, never the sum of them)."""

    default_code = "answer_timed_out"


class NotSignedIn(PhivaultClientError):
    """A route that needs a session was called before `login` (or after the session ended)."""

    default_code = "not_signed_in"


class MalformedToken(PhivaultClientError):
    """A token to send (the session's access token, an enrolment or a metrics token) holds a
    character a bearer token cannot (RFC 6750: letters, digits, `-._~+/`, then `=`): a line
    break from a file, say. It was not sent, and the message never shows it."""

    default_code = "malformed_token"


# Answers the client does not take: the server (or something in its place) misbehaved.

class UnexpectedRedirect(PhivaultClientError):
    """A 3xx answer. The API never redirects and the client follows no redirect (its token
    must not travel elsewhere): check `base_url`. `location` is where the answer pointed."""

    default_code = "unexpected_redirect"

    def __init__(self, detail: str, *, location: str | None = None, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.location = location


class InvalidAnswer(PhivaultClientError):
    """A success answer that is not what the API answers: not JSON, not the route's model, or
    compressed although the client asked for none. `fields` names the places that did not fit
    (never their values, which may be PHI or tokens)."""

    default_code = "invalid_answer"

    def __init__(self, detail: str, *, fields: tuple[FieldProblem, ...] = (),
                 **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.fields = fields


class AnswerTooLarge(InvalidAnswer):
    """An answer's body is longer than the client accepts (`limit` bytes: `max_answer_bytes`,
    `max_export_bytes`, 25 MiB and a margin for an attachment) or than its own
    `Content-Length`. The client stopped reading at the limit."""

    default_code = "answer_too_large"

    def __init__(self, detail: str, *, limit: int | None = None, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.limit = limit


# 400, 408, 413, 415.

class BadRequest(PhivaultClientError):
    default_code = "bad_request"


class RequestTimeout(PhivaultClientError):
    default_code = "request_timeout"


class PayloadTooLarge(PhivaultClientError):
    default_code = "payload_too_large"


class UnsupportedMediaType(PhivaultClientError):
    """An attachment that is not PDF, PNG, JPEG or DICOM, or whose bytes do not match the
    declared type."""

    default_code = "unsupported_media_type"


# 401.

class AuthenticationFailed(PhivaultClientError):
    """Base of the 401 answers."""

    default_code = "unauthenticated"


class Unauthenticated(AuthenticationFailed):
    default_code = "unauthenticated"


class InvalidToken(AuthenticationFailed):
    """The access token was refused (expired, revoked, malformed), and refreshing did not
    help or was not possible."""

    default_code = "invalid_token"


class SessionRevoked(InvalidToken):
    """The refresh token was refused, so the session is over and the client has forgotten it:
    sign in again.

    Among the causes is refresh-token reuse: when a used refresh token is presented again (a
    stolen copy, or two clients sharing one session), the server revokes the whole token family
    and answers `invalid_token`. It answers the same for a logged-out, ended, expired or
    otherwise revoked session (SPEC §6), so a client cannot tell reuse from the others."""


TokenReuseDetected = SessionRevoked
"""The name apps look for: a reused refresh token surfaces as `SessionRevoked`."""


class InvalidCredentials(AuthenticationFailed):
    """A wrong email, password or TOTP code (the server does not say which)."""

    default_code = "invalid_credentials"


class MfaRequired(AuthenticationFailed):
    """This account uses TOTP: log in again with `totp_code`."""

    default_code = "mfa_required"


# 403.

class Forbidden(PhivaultClientError):
    """The caller's role may not do this."""

    default_code = "forbidden"


class NoCareRelationship(Forbidden):
    default_code = "no_care_relationship"


class NoConsent(Forbidden):
    default_code = "no_consent"


class MfaEnrollmentRequired(Forbidden):
    """The password was right but the role must enrol TOTP first: call `start_mfa` and
    `enable_mfa` with `enrollment_token` (valid 10 minutes), then log in with a code."""

    default_code = "mfa_enrollment_required"

    def __init__(self, detail: str, *, enrollment_token: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.enrollment_token = enrollment_token


# 404, 409.

class NotFound(PhivaultClientError):
    default_code = "not_found"


class Conflict(PhivaultClientError):
    default_code = "conflict"


class EmailTaken(Conflict):
    default_code = "email_taken"


# 422.

class ValidationFailed(PhivaultClientError):
    """The request was well-formed but not acceptable; `fields` names each bad field when the
    server could tell (a 422 `validation_error`)."""

    default_code = "validation_error"

    def __init__(self, detail: str, *, fields: tuple[FieldProblem, ...] = (),
                 **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.fields = fields


class WeakPassword(ValidationFailed):
    default_code = "weak_password"


class InvalidRequest(ValidationFailed):
    default_code = "invalid_request"


# 429, 5xx.

class RateLimited(PhivaultClientError):
    """Too many requests (per address, per account lock-out, or a busy gate); `retry_after`
    is the server's `Retry-After` in seconds, when it sent one."""

    default_code = "rate_limited"

    def __init__(self, detail: str, *, retry_after: int | None = None, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.retry_after = retry_after


class ServerError(PhivaultClientError):
    default_code = "internal_error"


class IntegrityFailure(ServerError):
    """Stored data failed its integrity check (tampering or corruption); the server audited it.
    Quote `request_id` to the operator."""

    default_code = "integrity_failure"


class Unavailable(ServerError):
    """The database (or the service) is unavailable for now; try again after `retry_after`."""

    default_code = "unavailable"

    def __init__(self, detail: str, *, retry_after: int | None = None, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.retry_after = retry_after


class NotReady(Unavailable):
    """`/readyz`: the instance should not get traffic now."""

    default_code = "not_ready"


BY_CODE: dict[str, type[PhivaultClientError]] = {
    cls.default_code: cls for cls in (
        BadRequest, RequestTimeout, PayloadTooLarge, UnsupportedMediaType, Unauthenticated,
        InvalidToken, InvalidCredentials, MfaRequired, Forbidden, NoCareRelationship, NoConsent,
        MfaEnrollmentRequired, NotFound, Conflict, EmailTaken, ValidationFailed, WeakPassword,
        InvalidRequest, RateLimited, ServerError, IntegrityFailure, Unavailable, NotReady)}
BY_CODE["malformed_json"] = BadRequest

BY_STATUS: dict[int, type[PhivaultClientError]] = {
    400: BadRequest, 401: AuthenticationFailed, 403: Forbidden, 404: NotFound,
    408: RequestTimeout, 409: Conflict, 413: PayloadTooLarge, 415: UnsupportedMediaType,
    422: ValidationFailed, 429: RateLimited, 503: Unavailable,
}


def _retry_after(headers: Mapping[str, str]) -> int | None:
    value = headers.get("retry-after", "")
    return int(value) if value.isdigit() else None


def _fields(body: Mapping[str, Any]) -> tuple[FieldProblem, ...]:
    found = body.get("fields")
    if not isinstance(found, list):
        return ()
    return tuple(FieldProblem(str(item.get("field", "")), str(item.get("problem", "")))
                 for item in found if isinstance(item, dict))


def error_for(status: int, headers: Mapping[str, str], content: bytes) -> PhivaultClientError:
    """The exception for an error answer: by its error code, else by its status.

    `headers` must look names up case-insensitively (httpx's `Headers` do)."""
    try:
        parsed = json.loads(content) if content else {}
    except ValueError:
        parsed = {}
    body: Mapping[str, Any] = parsed if isinstance(parsed, dict) else {}
    code = body.get("error") if isinstance(body.get("error"), str) else None
    detail = body.get("detail") if isinstance(body.get("detail"), str) else None
    request_id = body.get("request_id") or headers.get("x-request-id")
    common: dict[str, Any] = {"status": status, "code": code or f"http_{status}",
                              "request_id": str(request_id) if request_id else None}
    if 300 <= status < 400:
        # Whatever its body says: a redirect is never one of the API's answers.
        common["code"] = UnexpectedRedirect.default_code
        return UnexpectedRedirect(
            f"The server answered {status}, a redirect, which the client does not follow: "
            "check base_url.", location=headers.get("location"), **common)
    cls = BY_CODE.get(code or "") or BY_STATUS.get(status) or (
        ServerError if status >= 500 else PhivaultClientError)
    detail = detail or f"The server answered {status}."
    if issubclass(cls, RateLimited | Unavailable):
        return cls(detail, retry_after=_retry_after(headers), **common)
    if issubclass(cls, ValidationFailed):
        return cls(detail, fields=_fields(body), **common)
    if issubclass(cls, MfaEnrollmentRequired):
        token = body.get("enrollment_token")
        return cls(detail, enrollment_token=token if isinstance(token, str) else None,
                   **common)
    return cls(detail, **common)


__all__ = [
    "AnswerTimedOut", "AnswerTooLarge", "AuthenticationFailed", "BadRequest", "Conflict",
    "ConnectionFailed", "EmailTaken", "FieldProblem", "Forbidden", "IntegrityFailure",
    "InvalidAnswer", "InvalidCredentials", "InvalidRequest", "InvalidToken", "MalformedToken",
    "MfaEnrollmentRequired", "MfaRequired", "NoCareRelationship", "NoConsent", "NotFound",
    "NotReady", "NotSignedIn", "PayloadTooLarge", "PhivaultClientError", "RateLimited",
    "RequestTimeout", "ServerError", "SessionRevoked", "TokenReuseDetected", "Unauthenticated",
    "Unavailable", "UnexpectedRedirect", "UnsupportedMediaType", "ValidationFailed",
    "WeakPassword", "error_for",
]
