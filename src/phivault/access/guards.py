"""Route access rules: every route declares exactly one, as a dependency (deny by default).

`Public()` marks a route anyone may call; `Allow(*roles)` requires a valid access token whose
role is one of `roles`, and writes `ACCESS_DENIED` for every other caller. A test enumerates
the app's routes and fails on any route that declares neither.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from phivault.access.permissions import Role
from phivault.audit import service as audit
from phivault.audit.actions import Action, Outcome
from phivault.auth.tokens import AccessClaims
from phivault.errors import Forbidden, InvalidToken, Unauthenticated
from phivault.ops.addresses import is_loopback
from phivault.request_context import Actor, current_request, set_actor
from phivault.web.dependencies import RuntimeDep, runtime_of

BEARER_DESCRIPTION = "An access token from POST /auth/login."


def bearer_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer <token>`, as FastAPI's `HTTPBearer` reads it."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    return token if scheme.lower() == "bearer" and token else None


async def verified_claims(request: Request, token: str | None,
                          *, allow_enrollment: bool = False) -> AccessClaims:
    """The caller's verified access-token claims, or 401."""
    runtime = runtime_of(request)
    if token is None:
        raise Unauthenticated()
    if len(token) > 4096:
        raise InvalidToken()
    claims = runtime.access_tokens.verify(token)
    # Checked on every request, not at expiry: a revoked session, a disabled or erased user,
    # or a changed role refuses the token at once, on every worker (the database is shared).
    # A miss asks in a unit of work of its own, before the route's work begins.
    await runtime.authenticator.check_session_in(runtime.unit_of_work, claims,
                                                 allow_enrollment=allow_enrollment)
    set_actor(Actor(claims.user_id, claims.role))
    return claims


class AccessRule:
    """Base of the declarations the route enumeration test looks for."""

    roles: frozenset[Role] = frozenset()
    public = False

    def describe(self) -> str:
        return "public" if self.public else "roles: " + ", ".join(sorted(self.roles))


class Public(AccessRule):
    """Anyone may call the route, without a token."""

    public = True

    async def __call__(self) -> None:
        return None


class LoopbackOrToken(AccessRule):
    """Operators' routes (`/metrics`): a caller on this host (the client address, as the proxy
    rules decide it), or one that presents `PHIVAULT_METRICS_TOKEN` as a bearer token; anyone
    else gets 403 `forbidden`. Never a user's access token: metrics are not for accounts."""

    def describe(self) -> str:
        return "loopback or metrics token"

    async def __call__(self, request: Request, runtime: RuntimeDep) -> None:
        address = current_request().ip
        forwarded = "x-forwarded-for" in request.headers or "forwarded" in request.headers
        # A request a proxy forwarded is never "this host": behind a proxy on loopback (nginx,
        # a sidecar), a forwarding header the proxy rules could not use would otherwise leave
        # the proxy's own address as the client's.
        if address is not None and is_loopback(address) and not forwarded:
            return
        token = runtime.settings.metrics_token
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if (token is not None and scheme.lower() == "bearer"
                and hmac.compare_digest(presented.strip().encode(),
                                        token.get_secret_value().encode())):
            return
        raise Forbidden()


class Allow(AccessRule, HTTPBearer):
    """Only a caller with one of `roles` may call the route; others get 403 `forbidden`.

    One dependency, which is also the bearer scheme (`HTTPBearer`, so that the OpenAPI
    document names it on the route): FastAPI's cost per dependency is paid on every request,
    and the route's own unit of work is the route's business; a refusal's `ACCESS_DENIED` is
    written in a unit of work of its own."""

    enrolling = False  # accepts the enrolment token of a user who must set up TOTP

    def __init__(self, *roles: Role) -> None:
        if not roles:
            raise ValueError("Allow() needs at least one role; use Public() for public routes")
        HTTPBearer.__init__(self, scheme_name="HTTPBearer", description=BEARER_DESCRIPTION,
                            auto_error=False)
        self.roles = frozenset(roles)

    async def __call__(self, request: Request) -> AccessClaims:  # type: ignore[override]
        claims = await verified_claims(request, bearer_token(request),
                                       allow_enrollment=self.enrolling)
        if claims.role not in self.roles:
            async with runtime_of(request).unit_of_work() as session:
                audit.record(session, Action.ACCESS_DENIED, outcome=Outcome.DENIED,
                             metadata={"reason": "role", "role": claims.role})
            raise Forbidden()
        return claims


@dataclass(frozen=True)
class RouteEntry:
    path: str
    methods: frozenset[str]
    dependant: Any  # None for framework routes (the OpenAPI document)


def app_routes(app: FastAPI) -> list[RouteEntry]:
    """Every route of `app` with its effective path and dependency tree, including routes of
    included routers (which newer FastAPI keeps behind lazy wrappers)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before lazy router inclusion: the routes are flat.
        contexts: list[Any] = list(app.routes)
    else:
        contexts = list(iter_route_contexts(app.routes))
    return [RouteEntry(str(getattr(c, "path", "")), frozenset(getattr(c, "methods", ()) or ()),
                       getattr(c, "dependant", None)) for c in contexts]


class AllowEnrolling(Allow):
    """`Allow`, for the TOTP set-up routes: an enrolment token is enough."""

    enrolling = True


ANY_ROLE = (Role.PATIENT, Role.DOCTOR, Role.ADMIN, Role.AUDITOR)


def declared_rules(dependant: object) -> list[AccessRule]:
    """The access rules a route's dependency tree declares (for the enumeration test). One
    rule met twice in the tree (a route's own caller, and a dependency of it that needs the
    caller too) is one rule: FastAPI runs it once per request."""
    found: list[AccessRule] = []
    stack = [dependant]
    while stack:
        current = stack.pop()
        call = getattr(current, "call", None)
        if isinstance(call, AccessRule) and not any(call is seen for seen in found):
            found.append(call)
        stack.extend(getattr(current, "dependencies", []))
    return found


__all__ = ["ANY_ROLE", "AccessRule", "Allow", "AllowEnrolling", "LoopbackOrToken", "Public",
           "RouteEntry", "app_routes", "declared_rules", "verified_claims"]
