"""The OpenAPI document, completed with what FastAPI cannot see from a route's signature.

A client generated from the document, or one written by reading it, must meet no answer it was
not told about. FastAPI documents what a route declares; these answers come from elsewhere and
are added to every operation here, once, when the document is first built:

- the answers of the request guard (web/middleware.py) and of the HTTP protocol layer
  (web/protocol.py), which any route may give: `400` (`bad_request`: bad framing or a
  malformed `Content-Length`; `malformed_json` where a body is read), `408` (a body that
  arrives too slowly), `413` (a body over the limit), `414` (a URL over 16 KiB) and `431`
  (headers over 16 KiB or 100 fields); and the `500` any route may give (`internal_error`, or
  `integrity_failure` when stored data fails its check);
- FastAPI's own `422` (`HTTPValidationError`), replaced by our `ErrorBody`, which is what the
  validation handler really answers;
- the headers of answers: `X-Total-Count` on every paged list (the routes that take
  `limit`/`offset`), `Retry-After` on `429` and `503`, `WWW-Authenticate` on `401`.

Each error answer's description lists the error codes it may carry (web/errors.py,
`error_codes`), so `no_consent` and `no_care_relationship` are documented where a `403` is.
The fuzzing test (tests/fuzz) holds the document to this: every answer the server gives must be
documented, body and headers included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant

from phivault.access.guards import RouteEntry, app_routes
from phivault.web import errors
from phivault.web.pagination import page_parameters

ERROR_REF = "#/components/schemas/ErrorBody"
FASTAPI_VALIDATION = "#/components/schemas/HTTPValidationError"
# What any route may answer, whatever it declares (the request guard and the error handlers).
EVERY_ROUTE = (400, 408, 413, 414, 431, 500)

HEADERS: dict[str, dict[str, Any]] = {
    "X-Total-Count": {"description": "How many items match in all (this page holds at most "
                                     "`limit` of them, from `offset`).",
                      "schema": {"type": "integer", "minimum": 0}},
    "Retry-After": {"description": "Seconds to wait before trying again.",
                    "schema": {"type": "integer", "minimum": 1}},
    "WWW-Authenticate": {"description": "`Bearer realm=\"phivault\"`.",
                         "schema": {"type": "string"}},
}
HEADERS_OF_STATUS = {"401": "WWW-Authenticate", "429": "Retry-After", "503": "Retry-After"}


def install(app: FastAPI) -> None:
    """Serve the completed document at `/openapi.json` (and from `app.openapi()`)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(generate(), app_routes(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented extension point


def complete(document: dict[str, Any], routes: Iterable[RouteEntry]) -> dict[str, Any]:
    paged = {(method.lower(), route.path) for route in routes
             if route.dependant is not None and _takes(route.dependant, page_parameters)
             for method in route.methods}
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            answers: dict[str, Any] = operation.setdefault("responses", {})
            for code in EVERY_ROUTE:
                answers.setdefault(str(code), {
                    "description": errors.describe(code),
                    "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}})
            for status, answer in answers.items():
                _complete_answer(status, answer)
            if (method, path) in paged:
                success = next(s for s in answers if s.startswith("2"))
                answers[success].setdefault("headers", {})["X-Total-Count"] = \
                    HEADERS["X-Total-Count"]
    schemas = document.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document


def _complete_answer(status: str, answer: dict[str, Any]) -> None:
    if not status.startswith(("4", "5")):
        return
    for content in answer.get("content", {}).values():
        if content.get("schema", {}).get("$ref") == FASTAPI_VALIDATION:
            content["schema"] = {"$ref": ERROR_REF}
            answer["description"] = errors.describe(int(status))
    header = HEADERS_OF_STATUS.get(status)
    if header:
        answer.setdefault("headers", {})[header] = HEADERS[header]


def _takes(dependant: Dependant, call: Callable[..., Any]) -> bool:
    return dependant.call is call or any(_takes(sub, call) for sub in dependant.dependencies)
