"""The HTTP safeguards of SPEC §11 on every answer: headers, request ids, JSON errors, limits."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict, Field

from phivault.access.guards import Public
from phivault.runtime import Runtime
from phivault.web.app import create_app
from phivault.web.dependencies import SessionDep
from tests.factories import bearer

SECURITY_HEADERS = {
    "strict-transport-security": "max-age=31536000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'",
}


class Echo(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    password: str = Field(min_length=15, max_length=128)
    flag: bool
    count: int = Field(ge=0, le=10)


def probe_app(runtime: Runtime) -> FastAPI:
    """The real app plus routes that exercise body parsing and crashes."""
    app = create_app(runtime=runtime)

    @app.post("/test/echo", dependencies=[Depends(Public())])
    async def echo(body: Echo) -> dict[str, bool]:
        return {"ok": body.flag}

    @app.get("/test/crash", dependencies=[Depends(Public())])
    async def crash() -> None:
        raise RuntimeError("secret detail: Jane Doe, diagnosis X")

    return app


@pytest.fixture
async def probe(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=probe_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
        yield c


def assert_hardened(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name
    assert len(response.headers["x-request-id"]) == 32


async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    for path, status in (("/healthz", "ok"), ("/readyz", "ready")):
        response = await client.get(path)
        assert response.status_code == 200
        assert response.json() == {"status": status}
        assert_hardened(response)


async def test_request_ids_are_unique(client: httpx.AsyncClient) -> None:
    ids = {(await client.get("/healthz")).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


async def test_a_client_cannot_choose_its_request_id(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": "forged-id"})
    assert response.headers["x-request-id"] != "forged-id"


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/nope", 404, "not_found"),
    ("GET", "/api/v1/nope", 404, "not_found"),
    ("POST", "/healthz", 405, "method_not_allowed"),
    ("DELETE", "/api/v1/audit/verify", 405, "method_not_allowed"),
])
async def test_framework_errors_are_json(client: httpx.AsyncClient, method: str, path: str,
                                         status: int, code: str) -> None:
    response = await client.request(method, path)
    assert response.status_code == status
    assert response.json()["error"] == code
    assert response.json()["detail"]
    assert_hardened(response)


async def test_unhandled_error_is_a_bare_500(probe: httpx.AsyncClient,
                                             captured_logs: object) -> None:
    response = await probe.get("/test/crash")
    assert response.status_code == 500
    body = response.json()
    assert body == {"error": "internal_error", "detail": "An internal error occurred.",
                    "request_id": response.headers["x-request-id"]}
    assert_hardened(response)
    logs = captured_logs.getvalue()  # type: ignore[attr-defined]
    assert "RuntimeError" in logs and "Jane Doe" not in logs and "Traceback" not in logs


async def test_malformed_json_is_400(probe: httpx.AsyncClient) -> None:
    response = await probe.post("/test/echo", content=b'{"password": ',
                                headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == "malformed_json"


@pytest.mark.parametrize("body, fields", [
    ({"password": "p" * 20, "flag": "yes", "count": 1}, ["body.flag"]),
    ({"password": "p" * 20, "flag": 1, "count": 1}, ["body.flag"]),
    ({"password": "p" * 20, "flag": True, "count": "12"}, ["body.count"]),
    ({"password": "p" * 20, "flag": True, "count": 11}, ["body.count"]),
    ({"password": "short-secret", "flag": True, "count": 1}, ["body.password"]),
    ({"password": "p" * 20, "flag": True, "count": 1, "role": "admin"}, ["body.role"]),
])
async def test_422_names_fields_without_echoing_values(
        probe: httpx.AsyncClient, body: dict[str, object], fields: list[str]) -> None:
    response = await probe.post("/test/echo", json=body)
    assert response.status_code == 422
    answer = response.json()
    assert answer["error"] == "validation_error"
    assert [f["field"] for f in answer["fields"]] == fields
    text = response.text
    for value in body.values():
        if isinstance(value, str) and len(value) > 2:
            assert value not in text


async def test_body_over_1mib_is_413_by_content_length(probe: httpx.AsyncClient) -> None:
    payload = b'{"password": "' + b"a" * (1024 * 1024 + 1) + b'"}'
    response = await probe.post("/test/echo", content=payload,
                                headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert_hardened(response)


async def test_chunked_body_over_1mib_is_413(probe: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"password": "'
        for _ in range(20):
            yield b"a" * 65536
        yield b'"}'

    response = await probe.post("/test/echo", content=chunks(),
                                headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


async def test_bad_content_length_is_400(probe: httpx.AsyncClient) -> None:
    response = await probe.post("/test/echo", content=b"{}",
                                headers={"content-type": "application/json",
                                         "content-length": "-5"})
    assert response.status_code == 400


async def test_jwks_publishes_public_keys_only(client: httpx.AsyncClient,
                                               runtime: Runtime) -> None:
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    keys = response.json()["keys"]
    assert [k["kid"] for k in keys] == [k.kid for k in runtime.settings.signing_keys]
    for key in keys:
        assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and key["alg"] == "EdDSA"
        assert "d" not in key


async def test_docs_page_has_no_inline_script(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text and "unsafe-inline" not in page.text
    assert page.text.count('integrity="sha384-') == 2
    assert (await client.get("/docs/init.js")).status_code == 200


async def test_openapi_lists_error_answers_and_bearer_auth(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    verify = spec["paths"]["/api/v1/audit/verify"]["get"]
    assert {"401", "403"} <= set(verify["responses"])
    assert verify["security"] == [{"HTTPBearer": []}]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


async def test_forwarded_for_is_ignored_from_untrusted_peers(client: httpx.AsyncClient,
                                                             runtime: Runtime) -> None:
    from sqlalchemy import select

    from phivault.audit.models import AuditEvent

    response = await client.get("/api/v1/audit/verify",
                                headers={**(await bearer(runtime, "auditor")),
                                         "X-Forwarded-For": "198.51.100.99"})
    assert response.status_code == 200
    async with runtime.sessions() as session:
        event = (await session.execute(
            select(AuditEvent).where(AuditEvent.request_id == response.headers["x-request-id"])
        )).scalar_one()
    assert event.ip == "203.0.113.7"


async def test_access_log_lines_carry_the_request_id(client: httpx.AsyncClient,
                                                     captured_logs: object) -> None:
    response = await client.get("/healthz", headers={"Authorization": "Bearer abc.def.ghi"})
    lines = [json.loads(line) for line in
             captured_logs.getvalue().splitlines()]  # type: ignore[attr-defined]
    access = [line for line in lines if line.get("event") == "request"]
    assert access and access[-1]["request_id"] == response.headers["x-request-id"]
    assert access[-1]["path"] == "/healthz" and access[-1]["status"] == 200
    assert "abc.def.ghi" not in captured_logs.getvalue()  # type: ignore[attr-defined]


async def test_a_failed_commit_fails_the_request(runtime: Runtime) -> None:
    """The unit of work commits before the response is sent: when the commit fails (here a
    duplicate key), the client gets a 500, never a 200 for work that was not saved."""
    from phivault.db.base import utcnow
    from phivault.keys.models import DataKeyRow

    key_id = uuid.uuid4()
    async with runtime.unit_of_work() as session:
        session.add(DataKeyRow(id=key_id, kek_id="k", wrapped=b"x", created_at=utcnow()))
    app = create_app(runtime=runtime)

    @app.post("/test/conflict", dependencies=[Depends(Public())])
    async def conflict(session: SessionDep) -> dict[str, bool]:
        session.add(DataKeyRow(id=key_id, kek_id="k", wrapped=b"y", created_at=utcnow()))
        return {"saved": True}

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://t") as c:
        response = await c.post("/test/conflict")
    assert response.status_code == 500 and response.json()["error"] == "internal_error"


async def test_slow_body_is_408(probe: httpx.AsyncClient,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from phivault.web import middleware

    monkeypatch.setattr(middleware, "BODY_CHUNK_TIMEOUT", 0.2)

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"password": "'
        await asyncio.sleep(0.5)
        yield b'abc"}'

    response = await probe.post("/test/echo", content=trickle(),
                                headers={"content-type": "application/json"})
    assert response.status_code == 408 and response.json()["error"] == "request_timeout"


async def test_odd_content_lengths_are_400(probe: httpx.AsyncClient) -> None:
    for value in ("\u00b2".encode("latin-1"), b"9" * 40, b"1e3"):
        response = await probe.post("/test/echo", content=b"{}", headers={
            "content-type": "application/json", "content-length": value})
        assert response.status_code == 400, value


async def test_unknown_keys_and_bad_ids_are_not_echoed(probe: httpx.AsyncClient,
                                                       client: httpx.AsyncClient,
                                                       runtime: Runtime) -> None:
    response = await probe.post("/test/echo", json={
        "password": "p" * 20, "flag": True, "count": 1, "Jane Doe HIV+": 1})
    assert response.status_code == 422
    assert "Jane Doe" not in response.text
    assert response.json()["fields"] == [{"field": "body.(unknown field)",
                                          "problem": "is not a field of this request"}]
    from tests.factories import signed_in

    user = await signed_in(runtime, "patient")
    bad = await client.delete("/api/v1/me/sessions/Patient-Secret-Id", headers=user.headers)
    assert bad.status_code == 422 and "Secret" not in bad.text


async def test_the_caller_does_not_outlive_the_request(client: httpx.AsyncClient,
                                                       runtime: Runtime) -> None:
    from phivault.request_context import SYSTEM, current_actor
    from tests.factories import signed_in

    user = await signed_in(runtime, "auditor")
    assert (await client.get("/api/v1/audit/verify", headers=user.headers)).status_code == 200
    assert current_actor() == SYSTEM
