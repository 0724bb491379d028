"""Domain errors: what services raise. `web/errors.py` maps each to one status and error code.

A domain error's message is a fixed human sentence, never built from user input or PHI.
"""

from __future__ import annotations


class PhivaultError(Exception):
    """Base of every error a service raises on purpose."""

    code = "error"
    detail = "The request could not be completed."

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or type(self).detail
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
