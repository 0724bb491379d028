"""Review finding (issue 10, LOW): a path with a stray trailing slash was answered with a redirect
to `https://<Host header>/...`, an open redirect for anyone who can set the Host header (a
poisoned cache, a misconfigured proxy). No answer may build a redirect from the Host header: such
a path is a plain JSON 404."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest

from phivault.access.guards import app_routes
from phivault.runtime import Runtime
from phivault.web.app import create_app
from tests.factories import bearer

EVIL = {"Host": "evil.example"}


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v1/me/"),
    ("GET", "/api/v1/me/sessions/"),
    ("GET", "/api/v1/doctors/"),
    ("POST", "/api/v1/auth/login/"),
    ("POST", "/api/v1/auth/register/"),
    ("GET", "/healthz/"),
    ("GET", "/.well-known/jwks.json/"),
    ("GET", "/openapi.json/"),
])
async def test_a_trailing_slash_is_a_json_404_not_a_redirect(
        client: httpx.AsyncClient, runtime: Runtime, method: str, path: str) -> None:
    headers = {**EVIL, **await bearer(runtime, "patient")}
    response = await client.request(method, path, headers=headers, json={})
    assert response.status_code == 404, (response.status_code, response.headers)
    assert "location" not in response.headers
    assert response.json()["error"] == "not_found"
    assert "evil.example" not in response.text


async def test_no_route_of_the_app_redirects_on_slashes(runtime: Runtime) -> None:
    """Every route, with a slash added, from an anonymous caller: no 3xx anywhere. The switch
    is off on the app's router, the one that would redirect (included routers answer only for
    their own exact paths)."""
    app = create_app(runtime=runtime)
    assert app.router.redirect_slashes is False
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as client:
        for route in app_routes(app):
            path = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), route.path) + "/"
            for method in route.methods - {"HEAD"}:
                response = await client.request(method, path, headers=EVIL)
                assert response.status_code == 404, (method, path, response.status_code)
                assert "location" not in response.headers


async def test_the_path_without_the_slash_still_answers(client: httpx.AsyncClient,
                                                        runtime: Runtime) -> None:
    response = await client.get("/api/v1/me", headers={**EVIL,
                                                       **await bearer(runtime, "patient")})
    assert response.status_code == 200
