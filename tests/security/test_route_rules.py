"""Deny by default: every route of the app declares exactly one access rule."""

from __future__ import annotations

from phivault.access.guards import app_routes, declared_rules
from phivault.runtime import Runtime
from phivault.web.app import create_app

# Framework routes that take no rule: the OpenAPI document only.
FRAMEWORK_ROUTES = {"/openapi.json"}
PUBLIC_ROUTES = {"/healthz", "/readyz", "/.well-known/jwks.json", "/.well-known/audit-key.json",
                 "/docs", "/docs/init.js", "/docs/swagger-ui-5.17.14/swagger-ui-bundle.js",
                 "/docs/swagger-ui-5.17.14/swagger-ui.css",
                 "/api/v1/auth/register", "/api/v1/auth/login", "/api/v1/auth/refresh",
                 "/api/v1/auth/logout", "/api/v1/auth/setup",
                 # The portal's sign-in pages and its style sheet (SPEC §15).
                 "/portal/sign-in", "/portal/sign-in/code", "/portal/static/portal.css"}


def test_every_route_declares_one_access_rule(runtime: Runtime) -> None:
    routes = app_routes(create_app(runtime=runtime))
    assert len(routes) >= 7
    undeclared, public = [], set()
    for route in routes:
        if route.dependant is None:
            assert route.path in FRAMEWORK_ROUTES, route.path
            continue
        rules = declared_rules(route.dependant)
        if len(rules) != 1:
            undeclared.append((route.path, sorted(route.methods), [r.describe() for r in rules]))
        elif rules[0].public:
            public.add(route.path)
    assert undeclared == []
    # A new public route is a decision, not an accident: it must be added here on purpose.
    assert public == PUBLIC_ROUTES


def test_api_routes_require_a_role_unless_auth(runtime: Runtime) -> None:
    api = [r for r in app_routes(create_app(runtime=runtime)) if r.path.startswith("/api/v1")]
    assert api
    for route in api:
        (rule,) = declared_rules(route.dependant)
        assert not rule.public or route.path.startswith("/api/v1/auth/"), route.path
        if not rule.public:
            assert rule.roles, route.path
