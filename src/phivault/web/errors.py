"""One mapping from every error to its status and JSON body `{"error", "detail"}`.

Domain errors carry their code; framework errors (404, 405, 400, 422) get ours. A 401 or 429
also writes its durable audit event, rate-bounded per source (audit/flood.py). A 422 names
each bad field and what is wrong with it, never the submitted value (FastAPI's default echoes
it, passwords included). A 500 carries only the request id.

A database that cannot be reached is a 503 `unavailable` with `Retry-After`, never a 500: every
request reaches the database through its unit of work, which raises `errors.Unavailable` for
such a failure (`errors.database_unavailable` decides which they are); any other database error
stays a 500. Every route that `responses(...)` describes lists that 503, since every such route
reaches the database. `/readyz` keeps its own 503, `not_ready`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from phivault import errors
from phivault.audit import flood
from phivault.crypto import IntegrityError
from phivault.request_context import current_request

# Most specific first: the first class an error is an instance of gives its status.
STATUS_OF: dict[type[errors.PhivaultError], int] = {
    errors.Unauthenticated: 401,
    errors.InvalidToken: 401,
    errors.InvalidCredentials: 401,
    errors.MfaRequired: 401,
    errors.MfaEnrollmentRequired: 403,
    errors.Forbidden: 403,
    errors.NoCareRelationship: 403,
    errors.NoConsent: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.WeakPassword: 422,
    errors.InvalidRequest: 422,
    errors.UnsupportedMedia: 415,
    errors.PayloadTooLarge: 413,
    errors.RateLimited: 429,
    errors.Unavailable: 503,
}

FRAMEWORK_CODES = {
    400: ("bad_request", "The request is malformed."),
    401: ("unauthenticated", "This route needs a bearer access token."),
    403: ("forbidden", "You may not do this."),
    404: ("not_found", "No such resource."),
    405: ("method_not_allowed", "This route does not take that method."),
    409: ("conflict", "The request conflicts with the current state."),
    408: ("request_timeout", "The request body arrived too slowly."),
    413: ("payload_too_large", "The request body is too large."),
    414: ("uri_too_long", "The URL is too long (at most 16 KiB)."),
    415: ("unsupported_media_type", "The body's media type is not one this route takes."),
    422: ("validation_error", "The request body or parameters are invalid."),
    429: ("rate_limited", "Too many requests; try again later."),
    431: ("headers_too_large", "The request's header section is too large or has too many "
                               "fields (at most 16 KiB and 100 fields)."),
    500: ("internal_error", "An internal error occurred."),
    503: ("not_ready", "The service is not ready."),
}


class ErrorBody(BaseModel):
    error: str
    detail: str
    request_id: str | None = None
    fields: list[dict[str, str]] | None = None


def error_json(status: int, code: str, detail: str, *, headers: dict[str, str] | None = None,
               **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "detail": detail}
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, headers=headers)


def framework_error(status: int, **extra: Any) -> JSONResponse:
    code, detail = FRAMEWORK_CODES.get(status, ("error", "The request failed."))
    return error_json(status, code, detail, **extra)


# The 503 every route that reaches the database may answer (`responses`).
UNAVAILABLE_DESCRIPTION = ("`unavailable`: the database is down, restarting or unreachable; "
                           "retry after `Retry-After` seconds.")
# Codes answered here rather than by a domain error (the handlers below, the request guard).
HANDLER_CODES = {400: ("malformed_json",), 500: ("integrity_failure",)}


def error_codes() -> dict[int, list[str]]:
    """Every error code each status may carry: ours, and every domain error's by `STATUS_OF`.

    Read from the error classes when asked, so a new domain error is documented by being
    defined. A 503 from a route is `unavailable`; `not_ready` is `/readyz`'s own."""
    codes: dict[int, set[str]] = {status: {code} for status, (code, _) in FRAMEWORK_CODES.items()}
    for status, extra in HANDLER_CODES.items():
        codes[status].update(extra)
    codes[503] = {"unavailable"}
    pending = list(errors.PhivaultError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        status = next((s for kind, s in STATUS_OF.items() if issubclass(cls, kind)), 400)
        codes.setdefault(status, set()).add(cls.code)
    return {status: sorted(found) for status, found in codes.items()}


def describe(status: int) -> str:
    """An error answer's OpenAPI description: the codes it may carry, then what it means."""
    if status == 503:
        return UNAVAILABLE_DESCRIPTION
    codes = ", ".join(f"`{code}`" for code in error_codes().get(status, ()))
    return f"{codes}: {FRAMEWORK_CODES[status][1]}"


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for a route's error answers, and the 503 of a database outage."""
    described: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorBody, "description": describe(s)} for s in statuses}
    described.setdefault(503, {"model": ErrorBody, "description": UNAVAILABLE_DESCRIPTION})
    return described


_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Messages of these error types quote part of the input ("found `P` at 0"): say it plainly.
_PLAIN_MESSAGES = {
    "uuid_parsing": "must be a UUID", "uuid_type": "must be a UUID",
    "int_parsing": "must be an integer", "float_parsing": "must be a number",
    "extra_forbidden": "is not a field of this request",
    "json_invalid": "is not valid JSON",
}


# A body can be wrong in up to 1,000 keys (the request guard's bound): the first few say enough.
MAX_FIELD_PROBLEMS = 20


def _field_problems(exc: RequestValidationError) -> list[dict[str, str]]:
    """Each bad field and what is wrong with it, never the submitted value: `input` and `ctx`
    are dropped, messages that quote input are replaced, and a key the client invented (an
    unknown field) is named only when it looks like a field name. At most MAX_FIELD_PROBLEMS."""
    problems = []
    for error in exc.errors()[:MAX_FIELD_PROBLEMS]:
        parts = [str(part) for part in error.get("loc", ())]
        if error.get("type") == "extra_forbidden" and parts and not _FIELD_NAME.match(parts[-1]):
            parts[-1] = "(unknown field)"
        kind = str(error.get("type", ""))
        message = _PLAIN_MESSAGES.get(kind) or str(error.get("msg", "invalid"))
        if "`" in message:
            message = "is invalid"
        problems.append({"field": ".".join(parts), "problem": message})
    return problems


def route_of(request: Request) -> str | None:
    """The method and path template of the route that answered (never the concrete path,
    whose segments the client chose). Newer FastAPI keeps the route of an included router
    without its prefix, and the effective path beside it."""
    context = (request.scope.get("fastapi") or {}).get("effective_route_context")
    path = getattr(context, "path_format", None) or getattr(request.scope.get("route"), "path",
                                                            None)
    return f"{request.method} {path}" if isinstance(path, str) else None


# An HTML page for errors under a path prefix (the privacy portal's), instead of JSON.
ErrorPage = Callable[[Request, Exception], Awaitable[Response]]


def install(app: FastAPI, pages: Mapping[str, ErrorPage] | None = None) -> None:
    """The app's error answers: JSON, except under a prefix of `pages`, whose function renders
    the error as a page. Handlers at the app's level see an error only after the request's unit
    of work has: it rolled back (or, for `keeps_work`, committed) and wrote the durable events
    first. (A route's own handler that caught errors would come before that: the unit of work
    would then commit work the error should have undone.)"""
    prefixes = dict(pages or {})

    def page_of(request: Request) -> ErrorPage | None:
        path = request.url.path
        return next((page for prefix, page in prefixes.items()
                     if path == prefix or path.startswith(prefix + "/")), None)

    @app.exception_handler(errors.PhivaultError)
    async def _domain(request: Request, exc: errors.PhivaultError) -> Response:
        status = next((s for cls, s in STATUS_OF.items() if isinstance(exc, cls)), 400)
        if status in (401, 429):
            # Missing or bad tokens and rate limits: durable events, bounded per source.
            runtime = request.app.state.runtime
            await flood.record_refusal(runtime.limits.refusals, runtime.unit_of_work, exc,
                                       route_of(request))
        if (page := page_of(request)) is not None:
            return await page(request, exc)
        headers = {"Retry-After": str(exc.retry_after)} \
            if isinstance(exc, errors.RateLimited | errors.Unavailable) else None
        if isinstance(exc, errors.InvalidToken | errors.Unauthenticated):
            headers = {"WWW-Authenticate": 'Bearer realm="phivault"'}
        return error_json(status, exc.code, exc.detail, headers=headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        if (page := page_of(request)) is not None:
            return await page(request, exc)
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return error_json(400, "malformed_json", "The request body is not valid JSON.")
        return framework_error(422, fields=_field_problems(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if (page := page_of(request)) is not None:
            return await page(request, exc)
        return framework_error(exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, exc: IntegrityError) -> Response:
        if (page := page_of(request)) is not None:
            return await page(request, exc)
        return error_json(500, "integrity_failure",
                          "Stored data failed its integrity check; the event was audited.",
                          request_id=current_request().request_id)
