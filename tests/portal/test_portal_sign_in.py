"""Signing in to the portal and out again (SPEC §15): server-side sessions in `__Host-`
cookies, a new session id at sign-in, TOTP as a second step, CSRF on every form, idle and
absolute expiry, `Clear-Site-Data` at sign-out, no open redirect, and the API's lock-out, rate
limit and audit events."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pyotp
from sqlalchemy import select, update

from phivault.audit.models import AuditEvent
from phivault.auth.models import AuthSession
from phivault.db.base import utcnow
from phivault.portal import sessions
from phivault.portal.models import PortalSession
from phivault.runtime import Runtime
from tests.auth.test_mfa import enrol, later_code
from tests.conftest import client_for
from tests.factories import make_user, signed_in
from tests.portal.browser import csrf_of, post_form, sign_in


def _cookie_header(response: httpx.Response, name: str) -> str:
    found = [value for key, value in response.headers.multi_items()
             if key == "set-cookie" and value.startswith(name + "=")]
    assert found, f"no {name} cookie set"
    return found[-1]


async def test_sign_in_sets_a_host_cookie_and_a_new_session_id(runtime: Runtime) -> None:
    patient = await make_user(runtime)
    async with client_for(runtime) as client:
        # A session id planted before sign-in (fixation) is not the one signed in with.
        client.cookies.set(sessions.COOKIE, "planted-by-an-attacker", domain="testserver")
        answer = await sign_in(client, patient, next_path="/portal/records")
        assert answer.status_code == 303 and answer.headers["location"] == "/portal/records"
        cookie = _cookie_header(answer, sessions.COOKIE)
        for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
            assert attribute.lower() in cookie.lower(), cookie
        assert "domain=" not in cookie.lower()
        value = cookie.split(";", 1)[0].split("=", 1)[1]
        assert value != "planted-by-an-attacker" and len(value) >= 40
        home = await client.get("/portal")
        assert home.status_code == 200 and "Who accessed your data" in home.text
        assert home.headers["cache-control"] == "no-store"
        csp = home.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp
    async with runtime.sessions() as session:
        stored = (await session.execute(select(PortalSession.id_digest).where(
            PortalSession.user_id == patient.id))).scalars().all()
        assert stored and value.encode() not in stored  # only its digest is kept
        events = (await session.execute(select(AuditEvent.action).where(
            AuditEvent.actor_id == patient.id))).scalars().all()
        assert "LOGIN_SUCCESS" in events


async def test_a_wrong_password_is_refused_audited_and_counts_toward_the_lockout(
        runtime: Runtime) -> None:
    patient = await make_user(runtime)
    async with client_for(runtime) as client:
        page = await client.get("/portal/sign-in")
        for attempt in range(6):
            answer = await post_form(client, "/portal/sign-in", {
                "email": patient.email, "password": "not the password", "csrf_token":
                csrf_of(page), "next": ""})
            if attempt < 5:
                assert answer.status_code == 401 and "not right" in answer.text
                assert sessions.COOKIE not in answer.headers.get("set-cookie", "")
        assert answer.status_code == 429 and "locked" in answer.text
        assert int(answer.headers["retry-after"]) > 0
        # The right password now is locked out too, as on the API.
        locked = await sign_in(client, patient)
        assert locked.status_code == 429
    async with runtime.sessions() as session:
        failures = (await session.execute(select(AuditEvent).where(
            AuditEvent.resource_id == str(patient.id),
            AuditEvent.action == "LOGIN_FAILURE"))).scalars().all()
        assert len(failures) >= 5


async def test_totp_is_a_second_step(runtime: Runtime, client: httpx.AsyncClient) -> None:
    patient = await signed_in(runtime)
    secret = await enrol(client, patient)
    async with client_for(runtime) as browser:
        page = await browser.get("/portal/sign-in")
        first = await post_form(browser, "/portal/sign-in", {
            "email": patient.email, "password": patient.password,
            "csrf_token": csrf_of(page), "next": "/portal/consents"})
        assert first.status_code == 303, first.text
        # Half signed in: no page yet.
        assert (await browser.get("/portal")).status_code == 303
        code_page = await browser.get(first.headers["location"])
        assert code_page.status_code == 200 and 'name="code"' in code_page.text
        wrong = "000000" if pyotp.TOTP(secret).now() != "000000" else "111111"
        bad = await post_form(browser, "/portal/sign-in/code", {
            "code": wrong, "csrf_token": csrf_of(code_page), "next": "/portal/consents"})
        assert bad.status_code == 401
        pending_cookie = browser.cookies.get(sessions.COOKIE)
        good = await post_form(browser, "/portal/sign-in/code", {
            "code": later_code(secret, 1), "csrf_token": csrf_of(code_page),
            "next": "/portal/consents"})
        assert good.status_code == 303 and good.headers["location"] == "/portal/consents"
        assert browser.cookies.get(sessions.COOKIE) != pending_cookie  # a new id again
        assert (await browser.get("/portal")).status_code == 200


async def test_five_wrong_codes_end_the_half_done_sign_in(runtime: Runtime,
                                                          client: httpx.AsyncClient) -> None:
    patient = await signed_in(runtime)
    secret = await enrol(client, patient)
    wrong = "000000" if pyotp.TOTP(secret).now() != "000000" else "111111"
    async with client_for(runtime) as browser:
        page = await browser.get("/portal/sign-in")
        first = await post_form(browser, "/portal/sign-in", {
            "email": patient.email, "password": patient.password,
            "csrf_token": csrf_of(page), "next": ""})
        code_page = await browser.get(first.headers["location"])
        token = csrf_of(code_page)
        for _ in range(sessions.MAX_CODE_ATTEMPTS):
            answer = await post_form(browser, "/portal/sign-in/code",
                                     {"code": wrong, "csrf_token": token, "next": ""})
            assert answer.status_code == 401
        last = await post_form(browser, "/portal/sign-in/code", {
            "code": later_code(secret, 1), "csrf_token": token, "next": ""})
        assert last.status_code == 303 and "/portal/sign-in" in last.headers["location"]
        assert (await browser.get("/portal")).status_code == 303


async def test_origin_null_is_judged_by_fetch_metadata(runtime: Runtime) -> None:
    """Chromium posts our forms with `Origin: null` (our `Referrer-Policy: no-referrer`) and
    `Sec-Fetch-Site: same-origin`; another site's page that hides its origin sends `null` too,
    with `cross-site` (or `same-site`), and is refused."""
    patient = await make_user(runtime)
    async with client_for(runtime) as client:
        page = await client.get("/portal/sign-in")
        for fetch_site, status in (("cross-site", 403), ("same-site", 403), (None, 403),
                                   ("same-origin", 303)):
            headers = {"Origin": "null", **({"Sec-Fetch-Site": fetch_site} if fetch_site
                                            else {})}
            answer = await client.post("/portal/sign-in", headers=headers, data={
                "email": patient.email, "password": patient.password,
                "csrf_token": csrf_of(page), "next": ""})
            assert answer.status_code == status, fetch_site


async def test_a_cross_site_post_is_refused(runtime: Runtime) -> None:
    patient = await make_user(runtime)
    async with client_for(runtime) as client:
        page = await client.get("/portal/sign-in")
        for origin, token in (("https://evil.example", csrf_of(page)),
                              ("https://evil.example", ""), (None, ""),
                              ("http://testserver", csrf_of(page))):
            answer = await post_form(client, "/portal/sign-in", {
                "email": patient.email, "password": patient.password, "csrf_token": token,
                "next": ""}, origin=origin)
            assert answer.status_code == 403, (origin, token)
        await sign_in(client, patient)
        home = await client.get("/portal")
        assert (await post_form(client, "/portal/sign-out", {"csrf_token": csrf_of(home)},
                                origin="https://evil.example")).status_code == 403
        assert (await post_form(client, "/portal/sign-out",
                                {"csrf_token": "forged"})).status_code == 403
        assert (await client.get("/portal")).status_code == 200  # still signed in


async def test_next_is_never_an_open_redirect(runtime: Runtime) -> None:
    patient = await make_user(runtime)
    for target in ("https://evil.example/portal", "//evil.example/portal", "/\\evil.example",
                   "/portal//evil.example", "/portalx", "/api/v1/me", "/portal/../api/v1/me",
                   "javascript:alert(1)", "/portal/\x00x", "/portal/\r\nLocation: x"):
        async with client_for(runtime) as client:
            answer = await sign_in(client, patient, next_path=target)
            if any(ord(c) < 32 for c in target):  # a malformed form: refused outright
                assert answer.status_code == 400, target
                continue
            assert answer.status_code == 303
            assert answer.headers["location"] == "/portal", target
    async with client_for(runtime) as client:
        redirect = await client.get("/portal/consents")
        assert redirect.status_code == 303
        assert redirect.headers["location"] == "/portal/sign-in?next=/portal/consents"


async def test_sign_out_ends_both_sessions_and_clears_the_site(runtime: Runtime) -> None:
    patient = await make_user(runtime)
    async with client_for(runtime) as client:
        await sign_in(client, patient)
        home = await client.get("/portal")
        value = client.cookies.get(sessions.COOKIE)
        out = await post_form(client, "/portal/sign-out", {"csrf_token": csrf_of(home)})
        assert out.status_code == 303
        assert out.headers["clear-site-data"] == '"cache", "cookies", "storage"'
        client.cookies.set(sessions.COOKIE, value or "", domain="testserver")  # replayed
        assert (await client.get("/portal")).status_code == 303
    async with runtime.sessions() as session:
        logins = (await session.execute(select(AuthSession).where(
            AuthSession.user_id == patient.id))).scalars().all()
        assert logins and all(login.revoked_at is not None for login in logins)
        assert not (await session.execute(select(PortalSession).where(
            PortalSession.user_id == patient.id))).scalars().all()


async def test_idle_and_absolute_expiry(runtime: Runtime) -> None:
    patient = await make_user(runtime)
    idle = timedelta(minutes=runtime.settings.portal_idle_minutes)
    for column, moved in (("seen_at", utcnow() - idle - timedelta(seconds=1)),
                          ("expires_at", utcnow() - timedelta(seconds=1))):
        async with client_for(runtime) as client:
            await sign_in(client, patient)
            assert (await client.get("/portal")).status_code == 200
            async with runtime.unit_of_work() as session:
                await session.execute(update(PortalSession).where(
                    PortalSession.user_id == patient.id).values({column: moved}))
            assert (await client.get("/portal")).status_code == 303, column
    async with runtime.sessions() as session:  # the expired sessions were deleted
        assert not (await session.execute(select(PortalSession).where(
            PortalSession.user_id == patient.id))).scalars().all()


async def test_a_revoked_login_session_signs_the_browser_out(runtime: Runtime) -> None:
    patient = await make_user(runtime)
    async with client_for(runtime) as client:
        await sign_in(client, patient)
        async with runtime.unit_of_work() as session:
            await session.execute(update(AuthSession).where(
                AuthSession.user_id == patient.id).values(revoked_at=utcnow()))
        runtime.session_cache.clear()
        assert (await client.get("/portal")).status_code == 303


async def test_staff_other_than_auditors_are_refused(runtime: Runtime) -> None:
    """As a wrong password is (tests/portal/test_portal_review.py has the audit and the
    TOTP case): the portal tells nobody a staff password was right."""
    doctor = await make_user(runtime, "doctor")
    async with client_for(runtime) as client:
        answer = await sign_in(client, doctor)
        assert answer.status_code == 401 and "not right" in answer.text
        assert sessions.COOKIE not in client.cookies
