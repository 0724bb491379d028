"""Routes of authentication (`/auth/*`), the caller's account and sessions (`/me`), and public
key publication."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response, status

from phivault.access.guards import ANY_ROLE, Allow, AllowEnrolling, Public
from phivault.auth.schemas import (
    LoginRequest,
    Me,
    MfaEnableRequest,
    MfaSetupAnswer,
    MfaSetupRequest,
    PasswordChange,
    RefreshRequest,
    RegisterAnswer,
    RegisterRequest,
    SessionView,
    SetupRequest,
    TokenPair,
)
from phivault.auth.service import IssuedTokens
from phivault.auth.tokens import AccessClaims
from phivault.request_context import current_request
from phivault.web.dependencies import RuntimeDep, SessionDep
from phivault.web.errors import responses

well_known = APIRouter(tags=["auth"])


@well_known.get("/.well-known/jwks.json", dependencies=[Depends(Public())],
                summary="Public keys that verify access tokens")
async def jwks(runtime: RuntimeDep) -> dict[str, Any]:
    """The Ed25519 public keys (JWK Set, RFC 7517) of every configured signing key. Public."""
    return runtime.access_tokens.jwks()


async def limit_auth_requests(runtime: RuntimeDep) -> None:
    """At most PHIVAULT_AUTH_RATE_LIMIT auth requests per client address (429 beyond)."""
    await runtime.limits.hit_ip(current_request().ip)


auth = APIRouter(prefix="/auth", tags=["auth"], dependencies=[Depends(limit_auth_requests)])
me = APIRouter(prefix="/me", tags=["me"])

Anyone = Annotated[AccessClaims, Depends(Allow(*ANY_ROLE))]
Enrolling = Annotated[AccessClaims, Depends(AllowEnrolling(*ANY_ROLE))]
NO_CONTENT: dict[str, Any] = {"status_code": status.HTTP_204_NO_CONTENT,
                              "response_class": Response}


def _pair(tokens: IssuedTokens) -> TokenPair:
    return TokenPair(access_token=tokens.access_token, refresh_token=tokens.refresh_token,
                     expires_in=tokens.expires_in)


@auth.post("/register", status_code=201, dependencies=[Depends(Public())],
           responses=responses(409, 422, 429), summary="Register a patient")
async def register(body: RegisterRequest, runtime: RuntimeDep,
                   session: SessionDep) -> RegisterAnswer:
    """Public. Creates a **patient** account (staff come from `POST /users`), with all three
    consents false unless `consents` sets them (`data_sharing` must be true before a doctor may
    read the chart). The password: 15 to 128 characters, not a common or breached one, not
    containing the email's local part. A taken email answers 409 `email_taken`; a refused
    password 422 `weak_password`; more than `PHIVAULT_AUTH_RATE_LIMIT` auth requests from one
    address, 429 with `Retry-After`."""
    created = await runtime.accounts.register(session, body)
    return RegisterAnswer(id=created.user.id, email=created.email, role=created.user.role)


@auth.post("/login", dependencies=[Depends(Public())], responses=responses(401, 403, 422, 429),
           summary="Log in")
async def login(body: LoginRequest, runtime: RuntimeDep, session: SessionDep) -> TokenPair:
    """Public. Email and password (and `totp_code` once TOTP is on) for an access token (15
    minutes) and a refresh token (its session ends 7 days after this login).

    401 `invalid_credentials` for an unknown email, a wrong password or a wrong code, alike;
    401 `mfa_required` when the code is missing; 429 with `Retry-After` after 5 failures for the
    account within 15 minutes; 403 `mfa_enrollment_required` with an `enrollment_token` when the
    role must enrol TOTP first."""
    return _pair(await runtime.authenticator.login(session, body.email, body.password,
                                                   body.totp_code))


@auth.post("/refresh", dependencies=[Depends(Public())], responses=responses(401, 422, 429),
           summary="Rotate a refresh token")
async def refresh(body: RefreshRequest, runtime: RuntimeDep, session: SessionDep) -> TokenPair:
    """Public. A new pair for a refresh token, which is then used up; the session still ends
    7 days after its login. An unknown, expired or revoked refresh token answers 401
    `invalid_token`; presenting a used one again also revokes its whole session (every token
    of that login) and is audited as `REFRESH_TOKEN_REUSE`."""
    return _pair(await runtime.authenticator.refresh(session, body.refresh_token))


@auth.post("/logout", dependencies=[Depends(Public())], responses=responses(422, 429),
           summary="End the session of a refresh token", **NO_CONTENT)
async def logout(body: RefreshRequest, runtime: RuntimeDep, session: SessionDep) -> None:
    """Public. Revokes the session of the refresh token (every token of its family, the
    access tokens too, at once). Always 204, whether the token was live, used or unknown."""
    await runtime.authenticator.logout(session, body.refresh_token)


@auth.post("/setup", dependencies=[Depends(Public())], responses=responses(401, 422, 429),
           summary="Set a new staff member's password", **NO_CONTENT)
async def setup(body: SetupRequest, runtime: RuntimeDep, session: SessionDep) -> None:
    """Public: the new staff member, with no account password yet. Redeems the one-time
    `setup_token` from `POST /users` (valid 72 hours) with the password they choose (the same
    rules as at registration: 422 `weak_password`). An unknown, used or expired token answers
    401 `invalid_token`."""
    await runtime.accounts.redeem_setup(session, body.setup_token, body.password)


@auth.post("/mfa/setup", responses=responses(401, 403, 422, 429), summary="Start TOTP set-up")
async def mfa_setup(body: MfaSetupRequest, claims: Enrolling, runtime: RuntimeDep,
                    session: SessionDep) -> MfaSetupAnswer:
    """Any signed-in user, or one holding the enrolment token of a role that must use TOTP.
    The current password again (a stolen access token alone cannot change MFA; a wrong one is
    401 `invalid_credentials` and counts toward the lock-out); answers a new secret and its
    `otpauth://` URI for an authenticator app. TOTP is on only after `POST /auth/mfa/enable`."""
    secret, uri = await runtime.authenticator.start_mfa(session, claims.user_id, body.password)
    response = MfaSetupAnswer(secret=secret, otpauth_uri=uri)
    return response


@auth.post("/mfa/enable", responses=responses(401, 403, 422, 429), summary="Turn TOTP on",
           **NO_CONTENT)
async def mfa_enable(body: MfaEnableRequest, claims: Enrolling, runtime: RuntimeDep,
                     session: SessionDep) -> None:
    """Any signed-in user, or one holding an enrolment token (as for `POST /auth/mfa/setup`). A
    current code from the app turns TOTP on (a wrong or reused code is 401
    `invalid_credentials`). Every session ends: log in again with `totp_code`."""
    await runtime.authenticator.enable_mfa(session, claims.user_id, body.code, claims)


@auth.post("/password", responses=responses(401, 403, 422, 429), summary="Change password",
           **NO_CONTENT)
async def change_password(body: PasswordChange, claims: Anyone, runtime: RuntimeDep,
                          session: SessionDep) -> None:
    """Any signed-in user. The current password (a wrong one is 401 `invalid_credentials`
    and counts toward the lock-out) and a new one (the registration rules: 422
    `weak_password`). Every session of the account ends, this one included: log in again."""
    await runtime.authenticator.change_password(session, claims.user_id, body.current_password,
                                                body.new_password)


@me.get("", responses=responses(401, 403), summary="My account")
async def read_me(claims: Anyone, runtime: RuntimeDep, session: SessionDep) -> Me:
    """Any signed-in user: their own account. A patient's answer includes their profile
    (PHI, so the read is audited as `VIEW_PROFILE`); staff get their directory entry."""
    return await runtime.accounts.me(session, claims.user_id)


@me.get("/sessions", responses=responses(401, 403), summary="My live sessions")
async def my_sessions(claims: Anyone, runtime: RuntimeDep,
                      session: SessionDep) -> list[SessionView]:
    """Any signed-in user: their own live sessions (one per login), `current` marking the
    one this token belongs to; `last_used_at` is the last login or token refresh."""
    rows = await runtime.authenticator.list_sessions(session, claims.user_id, claims.session_id)
    return [SessionView(id=s.id, created_at=s.created_at, last_used_at=s.last_used_at,
                        expires_at=s.expires_at, ip=s.ip, user_agent=s.user_agent,
                        current=current) for s, current in rows]


@me.delete("/sessions/{session_id}", responses=responses(401, 403, 404),
           summary="End one of my sessions", **NO_CONTENT)
async def end_my_session(session_id: uuid.UUID, claims: Anyone, runtime: RuntimeDep,
                         session: SessionDep) -> None:
    """Any signed-in user, for one of their own sessions: it ends at once (its refresh and
    access tokens stop working). Another user's session, or an unknown id, is 404
    `not_found`. Audited as `SESSION_REVOKED`."""
    await runtime.authenticator.end_session(session, claims.user_id, session_id)
