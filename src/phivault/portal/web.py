"""The portal's web layer (SPEC §15): pages rendered from Jinja2 templates, sign-in and
sign-out, the access rules and CSRF checks every page route declares, and the HTML answers to
errors. Pages call the same services as the API (records, consents, the access log, the audit
trail), so what they show and what they audit is the API's.

No page runs script: the CSP is `default-src 'none'` with `style-src 'self'` for the one style
sheet, and every action (switching a consent, ending a doctor's access, downloading an export,
erasing the account, signing out) is a form POST with the session's CSRF token.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import jinja2
from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from phivault import errors
from phivault.access.guards import AccessRule
from phivault.access.permissions import Role
from phivault.audit import service as audit
from phivault.audit.actions import Action, Outcome
from phivault.auth.schemas import TotpCode
from phivault.auth.tokens import AccessClaims
from phivault.crypto import IntegrityError
from phivault.portal import sessions
from phivault.request_context import Actor, current_request, set_actor
from phivault.schemas import SINGLE_LINE, Email, Password, RequestModel
from phivault.web.dependencies import RuntimeDep, SessionDep
from phivault.web.errors import STATUS_OF

PREFIX = "/portal"
# No script at all, one style sheet from this origin, forms only to this origin.
PORTAL_CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
              "frame-ancestors 'none'; base-uri 'none'")
PORTAL_ROLES = (Role.PATIENT, Role.AUDITOR)

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("phivault.portal", "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_STYLE = resources.files("phivault.portal").joinpath("static/portal.css").read_bytes()

# What a page says for each refusal: in the patient's words, not the API's ("send totp_code").
MESSAGES: dict[type[errors.PhivaultError], str] = {
    errors.InvalidCredentials: "The email, password or code is not right.",
    errors.AccountLockedOut: "Too many failed attempts: this account is locked for a while. "
                             "Try again later.",
    errors.RateLimited: "Too many requests: wait a little and try again.",
    errors.InvalidToken: "Your session has ended. Please sign in again.",
    errors.NotFound: "There is nothing here.",
    errors.Forbidden: "You may not do this.",
    errors.Unavailable: "The service is unavailable for a moment. Try again shortly.",
    errors.MfaEnrollmentRequired: "Your account must use two-factor authentication, and it is "
                                  "not set up yet. Set it up through your clinic's app first.",
}


class SignInNeeded(errors.PhivaultError):
    """The page needs a signed-in visitor: answered with a redirect to the sign-in page. The
    work before it stands (`keeps_work`): a half-done sign-in ended after too many codes is
    ended for good."""

    keeps_work = True
    code = "unauthenticated"
    detail = "Sign in first."

    def __init__(self, next_path: str) -> None:
        super().__init__()
        self.next_path = next_path


class PortalRefusal(errors.PhivaultError):
    """A refusal the portal words itself (a form's own problem)."""

    code = "bad_request"
    detail = "The form could not be accepted."

    def __init__(self, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.status = status


def status_of(exc: errors.PhivaultError) -> int:
    if isinstance(exc, PortalRefusal):
        return exc.status
    return next((status for kind, status in STATUS_OF.items() if isinstance(exc, kind)), 400)


def message_of(exc: errors.PhivaultError) -> str:
    if isinstance(exc, PortalRefusal):
        return exc.detail
    return next((text for kind, text in MESSAGES.items() if isinstance(exc, kind)),
                "The request could not be completed.")


def render(request: Request, template: str, *, status: int = 200,
           visit: sessions.Visit | None = None, **context: Any) -> HTMLResponse:
    """A page: `template` with `context`, the visitor's role and CSRF token for its forms,
    under the portal's CSP, never cached."""
    page = _templates.get_template(template).render(
        visit=visit, role=visit.row.role if visit and visit.claims else None,
        csrf=visit.csrf if visit else "", path=request.url.path, **context)
    return HTMLResponse(page, status_code=status, headers=page_headers())


def page_headers() -> dict[str, str]:
    return {"content-security-policy": PORTAL_CSP, "cache-control": "no-store"}


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path of the portal, never another site (`next=` is no
    open redirect: no scheme, no host, no `//` or backslash, no control characters)."""
    if (not value or len(value) > 512 or not value.startswith(PREFIX)
            or value.startswith("//") or "\\" in value or "//" in value or ".." in value
            or re.search(r"[\x00-\x20\x7f]", value)):
        return PREFIX
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not (parts.path == PREFIX
                                            or parts.path.startswith(PREFIX + "/")):
        return PREFIX
    return value


def _same_origin(request: Request) -> bool:
    """A browser's POST names its page's origin; one from another site is refused before any
    token is looked at (SameSite=Strict already keeps the session cookie off it)."""
    origin = request.headers.get("origin")
    fetch_site = request.headers.get("sec-fetch-site")
    if origin is None:
        return fetch_site in (None, "same-origin", "none")
    if origin == "null":
        # Chromium's form POST under `Referrer-Policy: no-referrer` (ours) says `Origin: null`;
        # so do sandboxed frames and other sites' pages that hide their origin. Fetch metadata
        # tells them apart.
        return fetch_site == "same-origin"
    host = request.headers.get("host", "")
    parts = urlsplit(origin)
    return parts.scheme == "https" and parts.netloc == host


# Access rules (every route declares one: the enumeration test in tests/web).

class PortalAnyone(AccessRule):
    """A portal page anyone may open (the sign-in pages, the style sheet)."""

    public = True

    async def __call__(self) -> None:
        return None


class PortalVisitor(AccessRule):
    """A portal page for a signed-in visitor of one of `roles`. Loads the session from its
    cookie, checks its login session as an access token's is checked, and sets the actor of
    the request's audit events. No session: a redirect to the sign-in page (`next=` here);
    another role: 403."""

    def __init__(self, *roles: Role) -> None:
        self.roles = frozenset(roles)

    async def __call__(self, request: Request, runtime: RuntimeDep,
                       session: SessionDep) -> sessions.Visit:
        if request.method == "GET" and _embedded_by_another_site(request):
            raise PortalRefusal("Open this page from the portal itself.", 403)
        # The session's read, its idle clock's restart and its login session's check commit
        # at once, in a short unit of work of their own: on SQLite a transaction takes the
        # database's write lock, which the request's own unit of work would otherwise hold
        # for the whole page (an export, a verification of the chain: an outside review saw
        # every write in the service wait for one), and a password check (erasure) must begin
        # with nothing written (db/phases.py). This is the first use of the database in every
        # portal route, so the request's unit of work holds no lock yet.
        async with runtime.unit_of_work() as own:
            visit = await sessions.load(own, runtime.settings,
                                        request.cookies.get(sessions.COOKIE))
            ended = False
            if visit is not None and visit.claims is not None:
                try:
                    await runtime.authenticator.check_session(own, visit.claims)
                except errors.InvalidToken:
                    await sessions.end(own, visit.row)
                    ended = True
        if visit is None or visit.claims is None or ended:
            raise SignInNeeded(request.url.path)
        set_actor(Actor(visit.claims.user_id, visit.claims.role))
        if visit.claims.role not in self.roles:
            audit.record(session, Action.ACCESS_DENIED, outcome=Outcome.DENIED,
                         metadata={"reason": "role", "role": visit.claims.role})
            raise errors.Forbidden()
        return visit


def _embedded_by_another_site(request: Request) -> bool:
    """A page requested by another origin's page as a resource (an image, a frame, a fetch):
    SameSite=Strict keeps the cookie off other sites, but not off a sibling subdomain or
    another port of this host, whose page could make an auditor's browser run the chain's
    verification, or a patient's write read events, over and over. A click that navigates
    here is a person's choice and passes."""
    site = request.headers.get("sec-fetch-site")
    return site in ("same-site", "cross-site") and \
        request.headers.get("sec-fetch-mode") != "navigate"


Patient = Annotated[sessions.Visit, Depends(PortalVisitor(Role.PATIENT))]
Auditor = Annotated[sessions.Visit, Depends(PortalVisitor(Role.AUDITOR))]
Member = Annotated[sessions.Visit, Depends(PortalVisitor(*PORTAL_ROLES))]


def claims_of(visit: sessions.Visit) -> AccessClaims:
    assert visit.claims is not None  # noqa: S101 - PortalVisitor admits signed-in visits only
    return visit.claims


def check_csrf(request: Request, visit: sessions.Visit, token: str | None) -> None:
    """Refuse a form from another site, or without the session's token (403)."""
    if not _same_origin(request) or not sessions.same_token(token, visit.csrf):
        raise PortalRefusal("This form has expired or did not come from this site. "
                            "Reload the page and try again.", 403)


# A form's CSRF token and `next=` path: bounded, single-line (`RequestModel` refuses unknown
# fields and control characters, as it does for the API's bodies).
CsrfToken = Annotated[str, Field(max_length=128), SINGLE_LINE]
NextPath = Annotated[str, Field(max_length=512), SINGLE_LINE]


class PortalForm(RequestModel):
    """Base of the portal's forms: `RequestModel`'s rules (unknown fields refused, bounded,
    no control characters), and no U+FFFD: a form's bytes that are not UTF-8 arrive decoded
    with replacement characters, which must not be stored as if typed (an outside review
    saved a name of two of them); the API refuses such bodies outright."""

    @field_validator("*", mode="after")
    @classmethod
    def _no_replacement_characters(cls, value: Any) -> Any:
        if isinstance(value, str) and "\ufffd" in value:
            raise ValueError("not valid UTF-8")
        return value


class CsrfForm(PortalForm):
    """A form that only confirms an action: its CSRF token."""

    csrf_token: CsrfToken = ""


# Errors as pages (installed by the app factory through `web.errors.install`, which calls this
# for every path under /portal only after the request's unit of work has rolled back).

async def error_page(request: Request, exc: Exception) -> Response:
    """A missing session is a redirect to the sign-in page (`next=` here); a refusal a page
    with its status and words; a malformed form a 400 page; an unknown page a 404 page; a
    ciphertext that failed its check a 500 page (the unit of work audited it)."""
    if isinstance(exc, SignInNeeded):
        target = f"{PREFIX}/sign-in?next={quote(safe_next(exc.next_path), safe='/')}"
        return RedirectResponse(target, status_code=303, headers=page_headers())
    if isinstance(exc, errors.PhivaultError):
        response = render(request, "error.html", status=status_of(exc),
                          message=message_of(exc))
        if isinstance(exc, errors.RateLimited | errors.Unavailable):
            response.headers["retry-after"] = str(exc.retry_after)
        return response
    if isinstance(exc, RequestValidationError):
        return render(request, "error.html", status=400,
                      message="The form was incomplete or malformed.")
    if isinstance(exc, StarletteHTTPException):
        return render(request, "error.html", status=exc.status_code,
                      message="There is nothing here." if exc.status_code == 404 else
                      "That is not possible here.")
    if isinstance(exc, IntegrityError):
        return render(request, "error.html", status=500, message=(
            "Stored data failed its integrity check. The clinic has been told "
            f"(reference {current_request().request_id})."))
    raise exc


router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("/static/portal.css", dependencies=[Depends(PortalAnyone())])
async def style() -> Response:
    return Response(_STYLE, media_type="text/css",
                    headers={"cache-control": "public, max-age=3600"})


@router.get("")
async def home(request: Request, visit: Member) -> HTMLResponse:
    """The signed-in visitor's start page: what they can see and do here."""
    return render(request, "home.html", visit=visit)


# Sign-in and sign-out.

class SignInForm(PortalForm):
    email: Email
    password: Password
    csrf_token: CsrfToken = ""
    next: NextPath = ""


class CodeForm(PortalForm):
    code: TotpCode
    csrf_token: CsrfToken = ""
    next: NextPath = ""


def _sign_in_page(request: Request, *, status: int = 200, message: str | None = None,
                  email: str = "", next_path: str | None = None) -> HTMLResponse:
    token = request.cookies.get(sessions.SIGN_IN_COOKIE)
    if not token or len(token) > 128:
        token = sessions.new_token()
    response = render(request, "sign_in.html", status=status, message=message, email=email,
                      sign_in_token=token, next=safe_next(next_path))
    _set_cookie(response, sessions.SIGN_IN_COOKIE, token)
    return response


def _set_cookie(response: Response, name: str, value: str) -> None:
    response.set_cookie(name, value, path="/", secure=True, httponly=True, samesite="strict")


def _signed_in(value: str, next_path: str) -> RedirectResponse:
    response = RedirectResponse(safe_next(next_path), status_code=303, headers=page_headers())
    _set_cookie(response, sessions.COOKIE, value)
    response.delete_cookie(sessions.SIGN_IN_COOKIE, path="/", secure=True, httponly=True,
                           samesite="strict")
    return response


@router.get("/sign-in", dependencies=[Depends(PortalAnyone())])
async def sign_in_page(request: Request, next: str | None = None) -> HTMLResponse:  # noqa: A002
    """The sign-in form (email and password)."""
    return _sign_in_page(request, next_path=next)


@router.post("/sign-in", dependencies=[Depends(PortalAnyone())])
async def sign_in(request: Request, form: Annotated[SignInForm, Form()], runtime: RuntimeDep,
                  session: SessionDep) -> Response:
    """Email and password: signed in, or on to the TOTP code when the account uses it. The
    same rate limit, lock-out and audit events as `POST /auth/login`."""
    if not _same_origin(request) or not sessions.same_token(
            form.csrf_token, request.cookies.get(sessions.SIGN_IN_COOKIE)):
        raise PortalRefusal("This form has expired or did not come from this site. "
                            "Reload the page and try again.", 403)
    await runtime.limits.hit_ip(current_request().ip)
    try:
        step = await runtime.authenticator.check_password(session, form.email, form.password)
    except errors.InvalidCredentials:
        return _sign_in_page(request, status=401, email=form.email, next_path=form.next,
                             message=MESSAGES[errors.InvalidCredentials])
    if step.user.role not in PORTAL_ROLES:
        # As a wrong password: audited, counted, and telling nobody the password was right.
        try:
            runtime.authenticator.refuse(session, step, "portal_role")
        except errors.InvalidCredentials:
            return _sign_in_page(request, status=401, email=form.email, next_path=form.next,
                                 message=MESSAGES[errors.InvalidCredentials])
    if step.user.totp_enabled:
        await runtime.authenticator.second_factor_needed(session, step)
        value = await sessions.start_pending(session, step)
        response = RedirectResponse(
            f"{PREFIX}/sign-in/code?next={quote(safe_next(form.next), safe='/')}",
            status_code=303, headers=page_headers())
        _set_cookie(response, sessions.COOKIE, value)
        return response
    login = await runtime.authenticator.open_session(session, step)
    return _signed_in(await sessions.start(session, runtime.settings, login, step.user.role),
                      form.next)


async def _pending(request: Request, runtime: RuntimeDep, session: SessionDep
                   ) -> sessions.Visit:
    visit = await sessions.load(session, runtime.settings, request.cookies.get(sessions.COOKIE),
                                touch=False)
    if visit is None or not visit.row.pending:
        raise SignInNeeded(PREFIX)
    return visit


@router.get("/sign-in/code", dependencies=[Depends(PortalAnyone())])
async def code_page(request: Request, visit: Annotated[sessions.Visit, Depends(_pending)],
                    next: str | None = None) -> HTMLResponse:  # noqa: A002
    """The second step of a sign-in: the code of the authenticator app."""
    return render(request, "code.html", visit=visit, next=safe_next(next), message=None)


@router.post("/sign-in/code", dependencies=[Depends(PortalAnyone())])
async def code(request: Request, form: Annotated[CodeForm, Form()],
               visit: Annotated[sessions.Visit, Depends(_pending)], runtime: RuntimeDep,
               session: SessionDep) -> Response:
    """The TOTP code: signed in (a new session id), or the form again; after five wrong codes
    the half-done sign-in ends."""
    check_csrf(request, visit, form.csrf_token)
    await runtime.limits.hit_ip(current_request().ip)
    row = visit.row
    if not await sessions.count_code_attempt(session, row):
        raise SignInNeeded(PREFIX)
    try:
        step = await runtime.authenticator.check_second_factor(
            session, row.user_id, row.account or row.user_id.hex, form.code,
            password_checked_at=row.created_at)
    except errors.InvalidCredentials:
        return render(request, "code.html", status=401, visit=visit,
                      next=safe_next(form.next), message=MESSAGES[errors.InvalidCredentials])
    login = await runtime.authenticator.open_session(session, step)
    return _signed_in(await sessions.start(session, runtime.settings, login, row.role,
                                           replacing=row), form.next)


@router.post("/sign-out")
async def sign_out(request: Request, form: Annotated[CsrfForm, Form()], visit: Member,
                   session: SessionDep) -> Response:
    """End the session here and its login session, and ask the browser to forget this site's
    cookies, storage and cache (`Clear-Site-Data`)."""
    check_csrf(request, visit, form.csrf_token)
    await sessions.end(session, visit.row)
    audit.record(session, Action.LOGOUT, resource_type="session",
                 resource_id=visit.row.auth_session_id)
    response = RedirectResponse(f"{PREFIX}/sign-in", status_code=303,
                                headers={**page_headers(),
                                         "clear-site-data": '"cache", "cookies", "storage"'})
    response.delete_cookie(sessions.COOKIE, path="/", secure=True, httponly=True,
                           samesite="strict")
    return response
