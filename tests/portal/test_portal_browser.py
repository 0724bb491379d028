"""The privacy portal in a real browser (SPEC §15): Debian's Chromium, driven by Playwright,
against a live `phivault serve` over TLS (tests/portal/e2e_server.py).

Sign-in with a TOTP code; a consent switched off, then the doctor refused over the API; a doctor
removed from the care team, then refused; both exports downloaded and parsed; an erasure, after
which sign-in fails; a form posted from another origin without a token, refused. Every page is
checked as tests/portal/e2e_browser.py says: no axe-core violation, no CSP violation, no
sideways scrolling at 375 px, and a screenshot at a desktop's and a phone's width.

No Chromium (scripts/ensure-chromium installs Debian's when `make test` runs as root): every
test here is skipped with the reason, or fails with `CI=true`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pyotp
import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    Page,
    Route,
    async_playwright,
    expect,
)

from phivault.portal import sessions
from tests.portal.e2e_browser import (
    DESKTOP,
    Inspector,
    find_chromium,
    launch_args,
    screenshot_folder,
)
from tests.portal.e2e_server import LiveClinic, live_clinic

# One live server and one Chromium per module and test process. The tests share no data (each
# changes its own patient), so xdist may share them out between its workers.
pytestmark = pytest.mark.slow
CHROMIUM, WHY_NOT = find_chromium()


def require_chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail(WHY_NOT + "; CI=true requires the browser tests")
        pytest.skip(WHY_NOT)
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One Chromium for the module: the system's, never one Playwright downloads."""
    executable = require_chromium()
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=executable,
                                                    args=launch_args())
        yield chromium
        await chromium.close()


@pytest.fixture(scope="module")
async def clinic(browser: Browser, keys_env: dict[str, str],
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveClinic]:
    async with live_clinic(keys_env, tmp_path_factory.mktemp("portal-e2e")) as live:
        yield live


async def new_context(browser: Browser, clinic: LiveClinic, *, bypass_csp: bool = False
                      ) -> BrowserContext:
    return await browser.new_context(base_url=clinic.base_url, ignore_https_errors=True,
                                     accept_downloads=True, viewport=DESKTOP,
                                     bypass_csp=bypass_csp)


@pytest.fixture
async def context(browser: Browser, clinic: LiveClinic) -> AsyncIterator[BrowserContext]:
    """A new browser profile (no cookies) under the pages' own CSP."""
    made = await new_context(browser, clinic)
    yield made
    await made.close()


@pytest.fixture
async def page(context: BrowserContext, inspector: Inspector) -> Page:
    made = await context.new_page()
    inspector.watch(made)
    return made


@pytest.fixture
def inspector(tmp_path_factory: pytest.TempPathFactory) -> Inspector:
    return Inspector(screenshot_folder(tmp_path_factory.getbasetemp() / "portal-screenshots"))


async def sign_in(page: Page, clinic: LiveClinic, who: str) -> None:
    """Through the sign-in form, with a password alone (not for an account with TOTP)."""
    person = clinic.people[who]
    await page.goto("/portal/sign-in")
    await page.get_by_label("Email").fill(person.email)
    await page.get_by_label("Password").fill(person.password)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(re.compile(r"/portal$"))


async def visit(page: Page, path: str, status: int = 200) -> None:
    answer = await page.goto(path)
    assert answer is not None and answer.status == status, (path, answer and answer.status)


# Sign-in.

async def test_sign_in_with_a_totp_code_then_sign_out(page: Page, clinic: LiveClinic,
                                                      context: BrowserContext,
                                                      inspector: Inspector) -> None:
    tess = clinic.people["tess"]
    await visit(page, "/portal/records")
    await expect(page).to_have_url(re.compile(r"/portal/sign-in\?next=/portal/records$"))
    await inspector.check(page, "sign-in")
    await page.get_by_label("Email").fill(tess.email)
    await page.get_by_label("Password").fill("not her password")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_contain_text("not right")
    await inspector.check(page, "sign-in-refused")

    await page.get_by_label("Password").fill(tess.password)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(re.compile(r"/portal/sign-in/code"))
    await inspector.check(page, "sign-in-code")
    secret = clinic.totp["tess"]
    now = pyotp.TOTP(secret).now()
    await page.get_by_label("Code").fill("000000" if now != "000000" else "111111")
    await page.get_by_role("button", name="Continue").click()
    await expect(page.get_by_role("alert")).to_contain_text("not right")
    # A step ahead (one step of drift is accepted): the current code switched TOTP on, and a
    # used code never works twice.
    await page.get_by_label("Code").fill(pyotp.TOTP(secret).at(time.time() + 30))
    await page.get_by_role("button", name="Continue").click()
    await expect(page).to_have_url(re.compile(r"/portal/records$"))

    cookies = {cookie["name"]: cookie for cookie in await context.cookies()}
    assert set(cookies) == {sessions.COOKIE}  # the sign-in cookie is gone
    session = cookies[sessions.COOKIE]
    assert session.get("httpOnly") and session.get("secure")
    assert session.get("sameSite") == "Strict" and session.get("path") == "/"
    await page.get_by_role("button", name="Sign out").click()
    await expect(page).to_have_url(re.compile(r"/portal/sign-in$"))
    await visit(page, "/portal")
    await expect(page).to_have_url(re.compile(r"/portal/sign-in\?next=/portal$"))
    inspector.assert_clean()


# Every page of a patient and of an auditor.

PATIENT_PAGES = (("patient-home", "/portal"), ("patient-profile", "/portal/profile"),
                 ("patient-records", "/portal/records"),
                 ("patient-access-log", "/portal/access-log"),
                 ("patient-care-team", "/portal/care-team"),
                 ("patient-consents", "/portal/consents"), ("patient-export", "/portal/export"),
                 ("patient-erase", "/portal/erase"))


async def test_every_patient_page_is_accessible_fits_a_phone_and_is_screenshotted(
        page: Page, clinic: LiveClinic, inspector: Inspector) -> None:
    await sign_in(page, clinic, "john")
    for name, path in PATIENT_PAGES:
        await visit(page, path)
        await expect(page.locator("nav a[aria-current=page]")).to_have_count(
            0 if path == "/portal" else 1)
        await inspector.check(page, name)
    # What each page must show: John's chart, Dr House's break-glass read of it, Dr Quinn in
    # his care team.
    await visit(page, "/portal/records")
    for heading in ("Records", "Prescriptions", "Consultations"):
        await expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
    await expect(page.get_by_text("Essential hypertension")).to_be_visible()
    await visit(page, "/portal/access-log")
    await expect(page.locator("span.tag.glass").first).to_have_text("break-glass")
    await visit(page, "/portal/care-team")
    await expect(page.get_by_role("button", name=re.compile("Quinn"))).to_have_text(
        "End access")

    # The profile corrected, then a value it refuses.
    await visit(page, "/portal/profile")
    await page.get_by_label("Phone").fill("+44 20 7946 0999")
    await page.get_by_role("button", name="Save my details").click()
    await expect(page.get_by_role("status")).to_contain_text("saved")
    await inspector.check(page, "patient-profile-saved")
    me = await clinic.as_("john", "GET", "/me")
    assert me.json()["phone"] == "+44 20 7946 0999", me.text
    await page.get_by_label("Date of birth").fill("2999-01-01")
    await page.get_by_role("button", name="Save my details").click()
    await expect(page.get_by_role("alert")).to_contain_text("not saved")
    await inspector.check(page, "patient-profile-refused")

    # The error page: a patient on an auditor's page.
    await visit(page, "/portal/audit", 403)
    await expect(page.get_by_role("alert")).to_have_text("You may not do this.")
    await inspector.check(page, "error-forbidden")
    inspector.assert_clean()


async def test_every_auditor_page_is_accessible_and_searches_the_trail(
        page: Page, clinic: LiveClinic, inspector: Inspector) -> None:
    await sign_in(page, clinic, "avery")
    await inspector.check(page, "auditor-home")
    await visit(page, "/portal/audit")
    await inspector.check(page, "auditor-audit")
    await page.get_by_label("Action").select_option("BREAK_GLASS")
    await page.get_by_role("button", name="Search").click()
    await expect(page).to_have_url(re.compile(r"action=BREAK_GLASS"))
    await expect(page.locator("table span.tag.glass").first).to_be_visible()
    await expect(page.get_by_text("Found unconscious at home").first).to_be_visible()
    await inspector.check(page, "auditor-audit-break-glass")
    await page.get_by_label("Since (at or after)").fill("yesterday")
    await page.get_by_role("button", name="Search").click()
    await expect(page.get_by_role("alert")).to_contain_text("Since")
    await inspector.check(page, "auditor-audit-refused")
    await visit(page, "/portal/audit/verify")
    await expect(page.get_by_role("status")).to_contain_text("The chain holds.")
    await inspector.check(page, "auditor-verify")
    await visit(page, "/portal/audit/checkpoint")
    await expect(page.get_by_role("status")).to_contain_text("signed at")
    await inspector.check(page, "auditor-checkpoint")
    inspector.assert_clean()


# What a patient changes in the browser, seen from the API.

async def test_switching_data_sharing_off_refuses_the_doctor(
        page: Page, clinic: LiveClinic, inspector: Inspector) -> None:
    jane = clinic.people["jane"].id
    before = await clinic.as_("house", "GET", f"/patients/{jane}/records")
    assert before.status_code == 200 and before.json(), before.text
    await sign_in(page, clinic, "jane")
    await visit(page, "/portal/consents")
    sharing = page.get_by_label(re.compile("^Data sharing"))
    await expect(sharing).to_be_checked()
    await sharing.uncheck()
    await page.get_by_role("button", name="Save consents").click()
    await expect(page.get_by_role("status")).to_contain_text("can no longer read your chart")
    await expect(page.get_by_label(re.compile("^Data sharing"))).not_to_be_checked()
    await inspector.check(page, "patient-consents-saved")

    after = await clinic.as_("house", "GET", f"/patients/{jane}/records")
    assert after.status_code == 403 and after.json()["error"] == "no_consent", after.text
    consents = await clinic.as_("jane", "GET", "/me/consents")
    assert consents.json()["data_sharing"] is False
    inspector.assert_clean()


async def test_ending_a_doctors_access_refuses_them(page: Page, clinic: LiveClinic,
                                                    inspector: Inspector) -> None:
    kim = clinic.people["kim"].id
    before = await clinic.as_("quinn", "GET", f"/patients/{kim}/records")
    assert before.status_code == 200, before.text
    await sign_in(page, clinic, "kim")
    await visit(page, "/portal/care-team")
    await page.get_by_role("button", name="End access for Dr Michaela Quinn").click()
    await expect(page.get_by_role("status")).to_contain_text(
        "Dr Michaela Quinn can no longer read your chart")
    await expect(page.get_by_role("button", name=re.compile("Quinn"))).to_have_count(0)
    await inspector.check(page, "patient-care-team-ended")

    after = await clinic.as_("quinn", "GET", f"/patients/{kim}/records")
    assert after.status_code == 403, after.text
    assert after.json()["error"] == "no_care_relationship", after.text
    team = await clinic.as_("kim", "GET", "/me/care-team")
    assert team.json() == [], team.text
    inspector.assert_clean()


async def test_both_exports_download_and_parse(page: Page, clinic: LiveClinic) -> None:
    await sign_in(page, clinic, "jane")
    await visit(page, "/portal/export")
    files = {}
    for button in ("Download JSON", "Download FHIR"):
        async with page.expect_download() as started:
            await page.get_by_role("button", name=button).click()
        download = await started.value
        assert await download.failure() is None
        files[button] = (download.suggested_filename,
                         json.loads(Path(await download.path()).read_text(encoding="utf-8")))

    name, document = files["Download JSON"]
    assert re.fullmatch(r"phivault-export-\d{4}-\d{2}-\d{2}\.json", name), name
    assert document["profile"]["full_name"] == "Jane Roe"
    assert "Migraine with aura" in json.dumps(document["medical_records"])
    assert document["prescriptions"] and document["access_log"]
    name, bundle = files["Download FHIR"]
    assert name.endswith(".fhir.json"), name
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    kinds = {entry["resource"]["resourceType"] for entry in bundle["entry"]}
    assert {"Patient", "Condition", "MedicationRequest", "Consent"} <= kinds, kinds
    # The export page is still there: a download does not navigate away.
    await expect(page).to_have_url(re.compile(r"/portal/export$"))


async def test_erasure_then_sign_in_fails(page: Page, clinic: LiveClinic,
                                          inspector: Inspector) -> None:
    ida = clinic.people["ida"]
    await sign_in(page, clinic, "ida")
    await visit(page, "/portal/erase")
    await page.get_by_label("Password").fill("not her password")
    await page.get_by_role("button", name="Erase my account").click()
    await expect(page.get_by_role("alert")).to_contain_text("Nothing was erased")
    await inspector.check(page, "patient-erase-refused")
    await page.get_by_label("Password").fill(ida.password)
    await page.get_by_role("button", name="Erase my account").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Your account is erased")
    await inspector.check(page, "patient-erased")
    assert not await page.context.cookies()  # Clear-Site-Data, and the cookie deleted

    await visit(page, "/portal")
    await expect(page).to_have_url(re.compile(r"/portal/sign-in\?next=/portal$"))
    await page.get_by_label("Email").fill(ida.email)
    await page.get_by_label("Password").fill(ida.password)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_contain_text("not right")
    login = await clinic.api.post("/auth/login", json={"email": ida.email,
                                                       "password": ida.password})
    assert login.status_code == 401, login.text
    inspector.assert_clean()


# Forms from elsewhere, and the CSP.

FOREIGN_FORM = """<!doctype html><html lang="en"><head><title>A prize!</title></head><body>
<form method="post" action="{action}"><input type="hidden" name="marketing" value="true">
<input type="hidden" name="analytics" value="true"><button>Claim your prize</button></form>
</body></html>"""


async def test_a_form_posted_from_another_origin_is_refused(
        page: Page, context: BrowserContext, clinic: LiveClinic) -> None:
    before = (await clinic.as_("john", "GET", "/me/consents")).json()
    await sign_in(page, clinic, "john")
    action = clinic.base_url + "/portal/consents"
    # The pages of two other origins, served by the browser itself: one on another port of
    # the same host (the same site, so the SameSite=Strict cookie goes along: the Origin
    # check refuses it), one on another site (the cookie stays home: not signed in).
    port = int(clinic.base_url.rsplit(":", 1)[1])
    sibling, foreign = f"https://127.0.0.1:{port + 1}/", "https://prizes.example/"
    for origin in (sibling, foreign):
        await context.route(origin, lambda route: route.fulfill(
            content_type="text/html", body=FOREIGN_FORM.format(action=action)))
    await page.goto(sibling)
    async with page.expect_response(action) as answered:
        await page.get_by_role("button", name="Claim your prize").click()
    refused = await answered.value
    assert refused.request.method == "POST" and refused.status == 403
    await expect(page.get_by_role("alert")).to_contain_text("did not come from this site")

    await page.goto(foreign)
    async with page.expect_response(action) as answered:
        await page.get_by_role("button", name="Claim your prize").click()
    unsigned = await answered.value
    assert unsigned.status == 303
    assert (await unsigned.header_value("location") or "").startswith("/portal/sign-in")
    await expect(page).to_have_url(re.compile(r"/portal/sign-in\?next=/portal/consents$"))

    assert (await clinic.as_("john", "GET", "/me/consents")).json() == before
    await visit(page, "/portal")  # still signed in where the site itself is concerned
    await expect(page).to_have_url(re.compile(r"/portal$"))


INLINE_SCRIPT = """() => new Promise(resolve => {
  document.addEventListener('securitypolicyviolation', e => resolve(e.violatedDirective));
  const script = document.createElement('script');
  script.textContent = 'window.inlineRan = true';
  document.body.append(script);
  setTimeout(() => resolve(window.inlineRan ? 'ran' : 'nothing'), 1000);
})"""


async def test_the_csp_lets_no_script_run(page: Page, browser: Browser,
                                          clinic: LiveClinic) -> None:
    answer = await page.goto("/portal/sign-in")
    assert answer is not None
    csp = await answer.header_value("content-security-policy") or ""
    assert "default-src 'none'" in csp and "form-action 'self'" in csp, csp
    assert await page.evaluate(INLINE_SCRIPT) == "script-src-elem"
    # The same script runs where the CSP is bypassed: the check above can fail.
    bypassing = await new_context(browser, clinic, bypass_csp=True)
    try:
        other = await bypassing.new_page()
        await other.goto("/portal/sign-in")
        assert await other.evaluate(INLINE_SCRIPT) == "ran"
    finally:
        await bypassing.close()


async def test_the_page_checks_find_what_they_look_for(page: Page, tmp_path: Path) -> None:
    """The checks themselves: an image without a text, a box too wide for a phone and an
    inline style the CSP blocks are each reported (axe runs under the page's own CSP)."""
    inspector = Inspector(tmp_path)
    inspector.watch(page)

    async def bad_page(route: Route) -> None:
        await route.fulfill(content_type="text/html", headers={
            "content-security-policy": "default-src 'none'"}, body=(
            '<!doctype html><html lang="en"><head><title>Bad</title></head><body><main>'
            '<h1>Bad</h1><img src="data:," width="1" height="1"><div style="width:600px">'
            'wide</div><table><tr><td>'
            + "x" * 200 + "</td></tr></table></main></body></html>"))
    await page.route("https://bad.example/", bad_page)
    await page.goto("https://bad.example/")
    await inspector.check(page, "bad")
    found = "\n".join(inspector.problems)
    assert "image-alt" in found and "wider than a phone's 375 px" in found and "CSP" in found, found
