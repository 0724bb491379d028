"""The client's contract with the server, checked without one: every route of the app has a
method, the models the client copies keep the server's fields, the client imports nothing of
the server but its public schemas, and the pure parts (error mapping, refresh schedule,
multipart body) behave."""

from __future__ import annotations

import ast
import base64
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from phivault.access.guards import app_routes
from phivault.client import (
    AsyncPhivaultClient,
    EmailTaken,
    Forbidden,
    MfaEnrollmentRequired,
    NoConsent,
    PhivaultClient,
    PhivaultClientError,
    RateLimited,
    ServerError,
    Tokens,
    Unavailable,
    ValidationFailed,
)
from phivault.client import models as client_models
from phivault.client.downloads import disposition_filename
from phivault.client.errors import FieldProblem, error_for
from phivault.client.routes import HAND_WRITTEN, declared_routes
from phivault.client.uploads import MultipartUpload
from phivault.runtime import Runtime
from phivault.web.app import create_app

CLIENT = Path(client_models.__file__).parent


def for_browsers(path: str) -> bool:
    """The interactive docs page and its script and assets, and the privacy portal's pages:
    for a browser, not an app."""
    return path in ("/docs", "/portal") or path.startswith(("/docs/", "/portal/"))


def client_routes(cls: type) -> set[tuple[str, str]]:
    specs = [*declared_routes(cls).values(), *HAND_WRITTEN.values()]
    return {(spec.method, spec.template) for spec in specs}


def test_every_route_of_the_app_is_a_client_method(runtime: Runtime) -> None:
    app = create_app(runtime=runtime)
    served = {(method, route.path) for route in app_routes(app)
              for method in route.methods - {"HEAD"} if not for_browsers(route.path)}
    assert served - client_routes(PhivaultClient) == set(), "no client method"
    assert client_routes(PhivaultClient) - served == set(), "the server has no such route"
    assert client_routes(AsyncPhivaultClient) == client_routes(PhivaultClient)


def test_both_clients_have_the_same_documented_methods() -> None:
    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")} - {"close", "aclose"}

    assert public(PhivaultClient) == public(AsyncPhivaultClient)
    assert set(HAND_WRITTEN) <= public(PhivaultClient)
    undocumented = [n for n in public(PhivaultClient) - {"tokens"}
                    for cls in (PhivaultClient, AsyncPhivaultClient)
                    if not getattr(cls, n).__doc__]
    assert undocumented == []


@pytest.mark.parametrize(("copy", "module", "name"), [
    (client_models.ConsentView, "phivault.privacy.consents", "ConsentView"),
    (client_models.VerifyAnswer, "phivault.audit.api", "VerifyAnswer"),
    (client_models.Health, "phivault.web.health", "Health"),
])
def test_copied_models_keep_the_servers_fields(copy: type[BaseModel], module: str,
                                               name: str) -> None:
    """These answers have no model in a schema module yet, so the client keeps a copy."""
    server: type[BaseModel] = getattr(__import__(module, fromlist=[name]), name)
    assert {k: f.annotation for k, f in copy.model_fields.items()} == \
        {k: f.annotation for k, f in server.model_fields.items()}


def test_the_client_imports_only_the_public_schemas() -> None:
    """STYLE.md: the client imports nothing of the server but the public schemas, so an app
    needs neither the database nor the web stack."""
    # And the server's one rule of what a loopback host is (a leaf module: `ipaddress` only).
    allowed = {"phivault", "phivault.schemas", "phivault.ops.addresses"}
    offenders = []
    for path in sorted(CLIENT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("phivault")
                          and n not in allowed and not n.startswith("phivault.client")
                          and not n.endswith(".schemas")]
    assert offenders == []
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, phivault.client; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True).stdout.split()
    heavy = {"sqlalchemy", "fastapi", "starlette", "cryptography", "uvicorn", "asyncpg"}
    assert heavy & {name.split(".")[0] for name in loaded} == set()


def _error(status: int, body: object, **headers: str) -> PhivaultClientError:
    content = json.dumps(body).encode() if body is not None else b"<html>Bad Gateway</html>"
    return error_for(status, httpx.Headers(headers), content)


def test_errors_map_by_code_then_by_status() -> None:
    no_consent = _error(403, {"error": "no_consent", "detail": "No."}, **{"X-Request-ID": "r1"})
    assert type(no_consent) is NoConsent and isinstance(no_consent, Forbidden)
    assert (no_consent.status, no_consent.code, no_consent.detail, no_consent.request_id) == (
        403, "no_consent", "No.", "r1")
    assert type(_error(409, {"error": "email_taken", "detail": "."})) is EmailTaken
    # A code this client does not know yet still lands in its status's family.
    novel = _error(403, {"error": "a_new_code", "detail": "."})
    assert type(novel) is Forbidden and novel.code == "a_new_code"
    limited = _error(429, {"error": "rate_limited", "detail": "."}, **{"Retry-After": "7"})
    assert isinstance(limited, RateLimited) and limited.retry_after == 7
    down = _error(503, {"error": "unavailable", "detail": "."}, **{"Retry-After": "5"})
    assert isinstance(down, Unavailable) and down.retry_after == 5
    invalid = _error(422, {"error": "validation_error", "detail": ".", "fields": [
        {"field": "body.amount", "problem": "must be at most 100000000"}]})
    assert isinstance(invalid, ValidationFailed)
    assert invalid.fields == (FieldProblem("body.amount", "must be at most 100000000"),)
    enrol = _error(403, {"error": "mfa_enrollment_required", "detail": ".",
                         "enrollment_token": "e.t.s"})
    assert isinstance(enrol, MfaEnrollmentRequired) and enrol.enrollment_token == "e.t.s"
    proxy = _error(502, None)
    assert type(proxy) is ServerError and proxy.code == "http_502"
    assert type(_error(418, {})) is PhivaultClientError
    assert str(no_consent) == "403 no_consent: No. (request r1)"


def _jwt(claims: dict[str, object]) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")
    return f"{part({'alg': 'EdDSA'})}.{part(claims)}.c2ln"


def test_tokens_are_refreshed_within_the_leeway_never_earlier_than_half_their_life() -> None:
    tokens = Tokens.issued("a", "r", 900, clock=lambda: 1000.0)
    assert tokens.expires_at == 1900.0
    assert not tokens.expiring(1869.0, leeway=30) and tokens.expiring(1870.0, leeway=30)
    short = Tokens.issued("a", "r", 60, clock=lambda: 1000.0)
    assert not short.expiring(1029.0, leeway=300) and short.expiring(1030.0, leeway=300)
    restored = Tokens.restored(_jwt({"exp": 2000}), "r", clock=lambda: 1400.0)
    assert (restored.expires_at, restored.lifetime) == (2000.0, 600.0)
    assert Tokens.restored("not-a-jwt", "r", clock=lambda: 5.0).expiring(5.0)
    assert "r" not in repr(Tokens.issued("secret-access", "secret-refresh", 60)).replace(
        "refresh_token", "").replace("expires", "")


def test_multipart_body_streams_with_its_length_and_rewinds() -> None:
    data = b"%PDF-1.7\n" + bytes(200_000)
    for source in (data, io.BytesIO(data)):
        upload = MultipartUpload(source, filename='a"b\r\n.pdf')
        sent = b"".join(upload)
        assert int(upload.headers["Content-Length"]) == len(sent)
        assert b'filename="a%22b%0D%0A.pdf"' in sent
        assert b"Content-Type: application/pdf\r\n" in sent and upload.replayable
        upload.rewind()
        assert b"".join(upload) == sent
    streamed = MultipartUpload(iter([data]), filename="x.dcm")
    assert "Content-Length" not in streamed.headers and not streamed.replayable
    assert b"Content-Type: application/dicom" in b"".join(streamed)
    with pytest.raises(ValueError, match="media type"):
        MultipartUpload(data, filename="x.pdf", content_type="text/plain\r\nX-Evil: 1")


def test_a_download_is_named_by_its_content_disposition() -> None:
    assert disposition_filename("attachment") is None
    assert disposition_filename('attachment; filename="scan \\"1\\".pdf"') == 'scan "1".pdf'
    assert disposition_filename(
        "attachment; filename=\"Rontgen.png\"; filename*=UTF-8''R%C3%B6ntgen.png") == "Röntgen.png"


def test_path_values_are_uuids_and_http_is_for_loopback_only() -> None:
    record_id = uuid.uuid4()
    call = PhivaultClient.read_record.call(str(record_id))
    assert (call.method, call.path) == ("GET", f"/api/v1/records/{record_id}")
    with pytest.raises(ValueError, match="record_id must be a UUID"):
        PhivaultClient.read_record.call("../users")
    with pytest.raises(ValueError, match="loopback"):
        PhivaultClient("http://clinic.example")
    PhivaultClient("http://127.0.0.1:8000").close()
