"""The patient's pages of the portal (SPEC §15): each shows the patient's own data and audits it
as the API route it mirrors does; each form changes what the API would change, and nothing
without the session's CSRF token from this site; an auditor is refused; the export downloads;
erasure asks for the password again and signs the browser out for good."""

from __future__ import annotations

import re
import uuid

import httpx
import orjson
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import select

from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.auth.models import User
from phivault.clinical.models import CareEnding
from phivault.portal import sessions
from phivault.portal.models import PortalSession
from phivault.portal.patient import LIST_SIZE
from phivault.request_context import SYSTEM
from phivault.runtime import Runtime
from tests.clinical.world import API, break_glass, expect, write_record
from tests.conftest import client_for
from tests.factories import make_user, signed_in
from tests.portal.browser import csrf_of, portal_of, post_form, sign_in, submit
from tests.portal.patient_world import (
    DIAGNOSIS,
    DOCTOR_NAME,
    PAGES,
    PATIENT_NAME,
    REASON,
    count_changes,
    events,
    forms,
    patient_world,
    shape,
)

_ROW = re.compile(r"<tr>(.*?)</tr>", re.S)


def body_rows(page: httpx.Response) -> list[str]:
    """The rows of the page's tables (header rows left out)."""
    return [row for row in _ROW.findall(page.text) if "<th" not in row]


async def test_every_page_shows_the_patients_own_data(runtime: Runtime,
                                                      client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    async with portal_of(runtime, world.patient) as browser:
        pages = {path: await browser.get(path) for path in PAGES}
    for path, page in pages.items():
        assert page.status_code == 200, (path, page.text[:300])
        assert page.headers["cache-control"] == "no-store", path
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp, path
        assert "<script" not in page.text and "style=" not in page.text, path
        assert f'href="{path}" aria-current="page"' in page.text, path
        for field in re.findall(r'<input id="([^"]+)"', page.text):
            assert f'<label for="{field}"' in page.text, (path, field)
        for table in page.text.split("<table>")[1:]:
            assert '<th scope="col">' in table, path
        assert page.text.count("<table>") == page.text.count('<div class="table-wrap">'), path

    profile = pages["/portal/profile"].text
    assert PATIENT_NAME in profile and world.patient.email in profile
    assert 'action="/portal/profile"' in profile and ">Save my details</button>" in profile
    for field in ("full_name", "phone", "address", "birth_date"):
        assert f'name="{field}"' in profile

    records = pages["/portal/records"]
    for heading in ("Records", "Prescriptions", "Consultations"):
        assert f"<h2>{heading}</h2>" in records.text
    assert [DIAGNOSIS in row for row in body_rows(records)].count(True) == 1
    assert "Amoxicillin" in records.text and REASON in records.text
    assert DOCTOR_NAME in records.text and str(world.doctor.id) not in records.text

    log = pages["/portal/access-log"].text
    for column in ("When", "Who", "Role", "What", "Outcome"):
        assert f'<th scope="col">{column}</th>' in log
    assert DOCTOR_NAME in log and "Create medical record" in log
    assert 'class="tag glass"' not in log  # no break-glass here

    team = pages["/portal/care-team"].text
    assert f'action="/portal/care-team/{world.doctor.id}/end"' in team
    assert f'aria-label="End access for {DOCTOR_NAME}">End access</button>' in team

    consents = pages["/portal/consents"].text
    assert 'action="/portal/consents"' in consents and ">Save consents</button>" in consents
    assert re.search(r'name="data_sharing" type="checkbox" value="true" checked', consents)
    assert not re.search(r'name="marketing" type="checkbox" value="true" checked', consents)
    assert '<label for="analytics">' in consents
    assert len(body_rows(pages["/portal/consents"])) == 2  # registration, then the API's

    export_page = pages["/portal/export"].text
    for fmt, label in (("json", "Download JSON"), ("fhir", "Download FHIR")):
        assert f'<input type="hidden" name="format" value="{fmt}">' in export_page
        assert f">{label}</button>" in export_page

    erase = pages["/portal/erase"].text
    assert '<label for="password">Password</label>' in erase
    assert 'name="password" type="password"' in erase
    assert '<button type="submit" class="danger">Erase my account</button>' in erase


async def test_each_page_writes_the_events_its_api_route_writes(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    me = world.patient.id
    mirrors = {
        "/portal/profile": ["/me"],
        "/portal/records": [f"/patients/{me}/records", f"/patients/{me}/prescriptions",
                            "/consultations"],
        "/portal/access-log": ["/me/access-log"],
        "/portal/care-team": ["/me/care-team"],
        "/portal/consents": ["/me/consents", "/me/consents/history"],
    }
    async with portal_of(runtime, world.patient) as browser:
        for page, routes in mirrors.items():
            expected = []
            for route in routes:
                answer = await client.get(API + route, headers=world.patient.headers)
                expect(answer, 200)
                expected += [shape(event) for event in await events(runtime, answer)]
            shown = await browser.get(page)
            assert shown.status_code == 200
            found = [shape(event) for event in await events(runtime, shown)]
            assert found and sorted(found) == sorted(expected), page
        # The pages without PHI write nothing.
        for page in ("/portal/export", "/portal/erase"):
            assert await events(runtime, await browser.get(page)) == []


async def test_rectification_changes_only_what_changed_and_refuses_bad_values(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    patient = world.patient
    async with portal_of(runtime, patient) as browser:
        saved = await submit(browser, "/portal/profile", "/portal/profile", {
            "full_name": PATIENT_NAME, "phone": " +44 20 7946 0001 ",
            "address": "2 New Street, Exampleton", "birth_date": "1980-01-31"})
        assert saved.status_code == 200 and "Your details are saved." in saved.text
        assert 'value="+44 20 7946 0001"' in saved.text
        assert [(e.action, e.event_metadata) for e in await events(runtime, saved)] == [
            ("UPDATE_PROFILE", {"fields": "address,birth_date,phone"})]
        profile = expect(await client.get(f"{API}/me", headers=patient.headers), 200)
        assert (profile["full_name"], profile["phone"], profile["address"],
                profile["birth_date"]) == (PATIENT_NAME, "+44 20 7946 0001",
                                           "2 New Street, Exampleton", "1980-01-31")

        same = await submit(browser, "/portal/profile", "/portal/profile", {
            "full_name": PATIENT_NAME, "phone": "+44 20 7946 0001",
            "address": "2 New Street, Exampleton", "birth_date": "1980-01-31"})
        assert same.status_code == 200 and "Nothing changed" in same.text
        assert [e.action for e in await events(runtime, same)] == ["VIEW_PROFILE"]

        removed = await submit(browser, "/portal/profile", "/portal/profile", {
            "full_name": PATIENT_NAME, "phone": "", "address": "2 New Street, Exampleton",
            "birth_date": "1980-01-31"})
        assert removed.status_code == 200
        assert [e.event_metadata for e in await events(runtime, removed)] == [
            {"fields": "phone"}]
        assert expect(await client.get(f"{API}/me", headers=patient.headers), 200)[
            "phone"] is None

        before = await count_changes(runtime, patient)
        for field, value in (("full_name", ""), ("full_name", "Alex\r\nBcc: evil@example.org"),
                             ("phone", "call me maybe"), ("birth_date", "1899-12-31"),
                             ("birth_date", "31/01/1980"), ("address", "x" * 501)):
            bad = await submit(browser, "/portal/profile", "/portal/profile", {
                "full_name": PATIENT_NAME, "phone": "", "address": "2 New Street, Exampleton",
                "birth_date": "1980-01-31", field: value})
            assert bad.status_code == 400, (field, value)
            assert "Your details were not saved" in bad.text
            assert f'aria-describedby="{field}-problem"' in bad.text, field
            assert [e.action for e in await events(runtime, bad)] == ["VIEW_PROFILE"]
        assert await count_changes(runtime, patient) == before
        profile = expect(await client.get(f"{API}/me", headers=patient.headers), 200)
        assert (profile["full_name"], profile["birth_date"]) == (PATIENT_NAME, "1980-01-31")


async def test_withdrawing_data_sharing_closes_the_chart_to_the_doctor(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    chart = f"{API}/patients/{world.patient.id}/records"
    expect(await client.get(chart, headers=world.doctor.headers), 200)
    async with portal_of(runtime, world.patient) as browser:
        answer = await submit(browser, "/portal/consents", "/portal/consents",
                              {"marketing": "true"})
        assert answer.status_code == 200 and "Your consents are saved." in answer.text
        assert "Doctors can no longer read your chart" in answer.text
        assert re.search(r'name="marketing" type="checkbox" value="true" checked', answer.text)
        assert not re.search(r'name="data_sharing" type="checkbox" value="true" checked',
                             answer.text)
        assert len(body_rows(answer)) == 3  # the history: the new version on top
        assert [(e.action, e.event_metadata) for e in await events(runtime, answer)][0] == (
            "CONSENT_CHANGED", {"marketing": True, "data_sharing": False, "analytics": False})
        expect(await client.get(chart, headers=world.doctor.headers), 403, "no_consent")
        current = expect(await client.get(f"{API}/me/consents", headers=world.patient.headers),
                         200)
        assert (current["marketing"], current["data_sharing"], current["analytics"]) == (
            True, False, False)

        # A value no checkbox sends is refused, and changes nothing.
        before = await count_changes(runtime, world.patient)
        odd = await submit(browser, "/portal/consents", "/portal/consents",
                           {"data_sharing": "maybe"})
        assert odd.status_code == 400 and "malformed" in odd.text
        assert await count_changes(runtime, world.patient) == before

        again = await submit(browser, "/portal/consents", "/portal/consents",
                             {"data_sharing": "true"})
        assert again.status_code == 200
        assert "Doctors can no longer read" not in again.text
    expect(await client.get(chart, headers=world.doctor.headers), 200)


async def test_ending_a_doctors_access_closes_the_chart_and_only_theirs(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    chart = f"{API}/patients/{world.patient.id}/records"
    other = await patient_world(runtime, client)  # another patient, and their own doctor
    async with portal_of(runtime, world.patient) as browser:
        for doctor_id in (other.doctor.id, uuid.uuid4(), world.patient.id):
            refused = await submit(browser, "/portal/care-team",
                                   f"/portal/care-team/{doctor_id}/end", {})
            assert refused.status_code == 404 and "There is nothing here." in refused.text
        malformed = await submit(browser, "/portal/care-team",
                                 "/portal/care-team/not-an-id/end", {})
        assert malformed.status_code == 400
        async with runtime.sessions() as session:
            assert (await session.execute(select(CareEnding).where(
                CareEnding.patient_id == world.patient.id))).scalars().all() == []
        expect(await client.get(chart, headers=world.doctor.headers), 200)
        expect(await client.get(f"{API}/patients/{other.patient.id}/records",
                                headers=other.doctor.headers), 200)

        ended = await submit(browser, "/portal/care-team",
                             f"/portal/care-team/{world.doctor.id}/end", {})
        assert ended.status_code == 200
        assert f"{DOCTOR_NAME} can no longer read your chart" in ended.text
        assert f"/portal/care-team/{world.doctor.id}/end" not in ended.text
        assert "No doctor can read your chart now" in ended.text
        actions = [e.action for e in await events(runtime, ended)]
        assert actions == ["UPDATE_CONSULTATION", "DELETE_CARE_RELATIONSHIP", "VIEW_CARE_TEAM"]
        expect(await client.get(chart, headers=world.doctor.headers), 403,
               "no_care_relationship")
        consultations = expect(await client.get(f"{API}/consultations",
                                                headers=world.patient.headers), 200)
        assert [c["status"] for c in consultations] == ["cancelled"]

        twice = await submit(browser, "/portal/care-team",
                             f"/portal/care-team/{world.doctor.id}/end", {})
        assert twice.status_code == 404


async def test_both_exports_download_and_parse(runtime: Runtime,
                                               client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    async with portal_of(runtime, world.patient) as browser:
        for fmt, media_type, ending in (("json", "application/json", '.json"'),
                                        ("fhir", "application/fhir+json", '.fhir.json"')):
            answer = await submit(browser, "/portal/export", "/portal/export", {"format": fmt})
            assert answer.status_code == 200, answer.text[:300]
            assert answer.headers["content-type"].startswith(media_type)
            disposition = answer.headers["content-disposition"]
            assert disposition.startswith('attachment; filename="phivault-export-'), disposition
            assert ending in disposition
            assert answer.headers["cache-control"] == "no-store"
            api = await client.get(f"{API}/me/export", params={"format": fmt},
                                   headers=world.patient.headers)
            expect(api, 200)
            assert [shape(e) for e in await events(runtime, answer)] == [
                shape(e) for e in await events(runtime, api)]
            assert [(e.action, e.event_metadata) for e in await events(runtime, answer)] == [
                ("DATA_EXPORT", {"format": fmt})]
            if fmt == "json":
                document = orjson.loads(answer.content)
                assert document["patient_id"] == str(world.patient.id)
                assert document["profile"]["full_name"] == PATIENT_NAME
                assert [r["diagnosis"] for r in document["medical_records"]] == [DIAGNOSIS]
                assert [p["medication"] for p in document["prescriptions"]] == ["Amoxicillin"]
                assert [c["reason"] for c in document["consultations"]] == [REASON]
                assert any(e["actor_name"] == DOCTOR_NAME for e in document["access_log"])
            else:
                Bundle.model_validate_json(answer.content)
                bundle = orjson.loads(answer.content)
                kinds = {entry["resource"]["resourceType"] for entry in bundle["entry"]}
                assert {"Patient", "Practitioner", "Encounter", "Condition",
                        "MedicationRequest", "Consent"} <= kinds

        before = await count_changes(runtime, world.patient)
        for fmt in ("xml", "", "JSON"):
            refused = await submit(browser, "/portal/export", "/portal/export", {"format": fmt})
            assert refused.status_code == 400, fmt
            assert "content-disposition" not in refused.headers
        assert await count_changes(runtime, world.patient) == before


async def test_erasure_needs_the_password_and_then_signs_out_for_good(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    patient = world.patient
    async with portal_of(runtime, patient) as browser:
        wrong = await submit(browser, "/portal/erase", "/portal/erase",
                             {"password": "not my password at all"})
        assert wrong.status_code == 401 and "not right" in wrong.text
        assert 'name="password" type="password"' in wrong.text  # the form again
        assert [(e.action, e.outcome, e.event_metadata) for e in await events(runtime, wrong)
                ] == [("ACCESS_DENIED", "denied", {"reason": "erasure_bad_password"})]
        expect(await client.get(f"{API}/me", headers=patient.headers), 200)  # nothing erased

        erased = await submit(browser, "/portal/erase", "/portal/erase",
                              {"password": patient.password})
        assert erased.status_code == 200 and "Your account is erased" in erased.text
        assert erased.headers["clear-site-data"] == '"cache", "cookies", "storage"'
        assert erased.headers["cache-control"] == "no-store"
        cookie = next(value for key, value in erased.headers.multi_items()
                      if key == "set-cookie" and value.startswith(sessions.COOKIE + "="))
        assert "max-age=0" in cookie.lower()
        assert "Sign out" not in erased.text and PATIENT_NAME not in erased.text
        assert "ACCOUNT_ERASED" in [e.action for e in await events(runtime, erased)]
        assert sessions.COOKIE not in browser.cookies
        assert (await browser.get("/portal/records")).status_code == 303

    async with client_for(runtime) as again:
        assert (await sign_in(again, patient)).status_code == 401
    expect(await client.post(f"{API}/auth/login", json={
        "email": patient.email, "password": patient.password}), 401, "invalid_credentials")
    expect(await client.get(f"{API}/me", headers=patient.headers), 401)
    async with runtime.sessions() as session:
        user = await session.get(User, patient.id)
        assert user is not None and user.status == "deleted"
        assert (await session.execute(select(PortalSession).where(
            PortalSession.user_id == patient.id))).scalars().all() == []


async def test_wrong_erasure_passwords_count_toward_the_lockout(runtime: Runtime) -> None:
    patient = await signed_in(runtime)
    async with portal_of(runtime, patient) as browser:
        page = await browser.get("/portal/erase")
        token = csrf_of(page)
        for _ in range(5):
            answer = await post_form(browser, "/portal/erase", {
                "password": "a guess of an attacker", "csrf_token": token})
            assert answer.status_code == 401
        locked = await post_form(browser, "/portal/erase", {
            "password": patient.password, "csrf_token": token})
        assert locked.status_code == 429 and "locked" in locked.text
        assert int(locked.headers["retry-after"]) > 0
    async with runtime.sessions() as session:
        user = await session.get(User, patient.id)
        assert user is not None and user.status == "active"
    async with client_for(runtime) as other:
        assert (await sign_in(other, patient)).status_code == 429  # the login's lock-out too


async def test_no_form_acts_without_this_sites_token(runtime: Runtime,
                                                     client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    before = await count_changes(runtime, world.patient)
    async with portal_of(runtime, world.patient) as browser:
        token = csrf_of(await browser.get("/portal/erase"))
        for action, data in forms(world).items():
            attempts = [
                ("no token", post_form(browser, action, data)),
                ("a forged token", post_form(browser, action, {**data, "csrf_token": "x" * 43})),
                ("another site", post_form(browser, action, {**data, "csrf_token": token},
                                           origin="https://evil.example")),
                ("plain http", post_form(browser, action, {**data, "csrf_token": token},
                                         origin="http://testserver")),
                ("a cross-site fetch", browser.post(action, data={**data, "csrf_token": token},
                                                    headers={"Sec-Fetch-Site": "cross-site"})),
            ]
            for what, attempt in attempts:
                answer = await attempt
                assert answer.status_code == 403, (action, what)
                assert "did not come from this site" in answer.text
                assert "content-disposition" not in answer.headers
        assert (await browser.get("/portal/profile")).status_code == 200  # still signed in
    assert await count_changes(runtime, world.patient) == before
    expect(await client.get(f"{API}/patients/{world.patient.id}/records",
                            headers=world.doctor.headers), 200)
    profile = expect(await client.get(f"{API}/me", headers=world.patient.headers), 200)
    assert profile["full_name"] == PATIENT_NAME


async def test_unknown_oversized_or_control_character_fields_are_refused(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    before = await count_changes(runtime, world.patient)
    async with portal_of(runtime, world.patient) as browser:
        token = csrf_of(await browser.get("/portal/erase"))
        for action, data in forms(world).items():
            for extra in ({"role": "admin"}, {"patient_id": str(uuid.uuid4())},
                          {"csrf_token": "x" * 129}):
                answer = await post_form(browser, action, {**data, "csrf_token": token, **extra})
                assert answer.status_code == 400, (action, extra)
                assert "malformed" in answer.text
        for field, value in (("full_name", "x" * 401), ("address", "x" * 1001),
                             ("phone", "x" * 101), ("full_name", "Alex\x00"),
                             ("address", "1 Street\x1b[2J"), ("birth_date", "\x7f")):
            answer = await post_form(browser, "/portal/profile", {
                **forms(world)["/portal/profile"], field: value, "csrf_token": token})
            assert answer.status_code == 400, (field, value)
        for password in ("x" * 1025, "", "pass\nword"):
            answer = await post_form(browser, "/portal/erase",
                                     {"password": password, "csrf_token": token})
            assert answer.status_code == 400, password
    assert await count_changes(runtime, world.patient) == before


async def test_an_auditor_is_refused_and_a_stranger_sent_to_sign_in(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    auditor = await make_user(runtime, "auditor")
    async with portal_of(runtime, auditor) as browser:
        token = csrf_of(await browser.get("/portal"))
        for page in PAGES:
            answer = await browser.get(page)
            assert answer.status_code == 403, page
            assert answer.headers["cache-control"] == "no-store"
            assert [(e.action, e.event_metadata) for e in await events(runtime, answer)] == [
                ("ACCESS_DENIED", {"reason": "role", "role": "auditor"})]
        for action, data in forms(world).items():
            answer = await post_form(browser, action, {**data, "csrf_token": token})
            assert answer.status_code == 403, action
    async with client_for(runtime) as stranger:
        for page in PAGES:
            answer = await stranger.get(page)
            assert answer.status_code == 303
            assert answer.headers["location"] == f"/portal/sign-in?next={page}"
        for action, data in forms(world).items():
            answer = await post_form(stranger, action, data)
            assert answer.status_code == 303, action
    expect(await client.get(f"{API}/patients/{world.patient.id}/records",
                            headers=world.doctor.headers), 200)


async def test_break_glass_is_marked_and_the_log_pages(runtime: Runtime,
                                                       client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    rescuer = await signed_in(runtime, "doctor", full_name="Dr Rex Rescue")
    expect(await break_glass(client, rescuer, world.patient.id), 201)
    expect(await client.get(f"{API}/records/{world.record['id']}", headers=rescuer.headers), 200)
    async with portal_of(runtime, world.patient) as browser:
        log = await browser.get("/portal/access-log")
        assert log.status_code == 200
        rows = body_rows(log)
        glass = [row for row in rows if "Dr Rex Rescue" in row]
        assert len(glass) == 2  # the break-glass, and the read it allowed
        assert all('<span class="tag glass">break-glass</span>' in row for row in glass)
        assert not any("tag glass" in row for row in rows if DOCTOR_NAME in row)
        assert 'rel="next"' not in log.text

        async with runtime.unit_of_work() as session:  # the system's jobs, 60 of them
            for _ in range(60):
                audit.record(session, Action.DATA_EXPORT, actor=SYSTEM,
                             patient_id=world.patient.id)
        first = await browser.get("/portal/access-log")
        assert len(body_rows(first)) == 50 and "phivault (automatic)" in first.text
        assert 'href="/portal/access-log?page=2" rel="next"' in first.text
        assert 'rel="prev"' not in first.text
        second = await browser.get("/portal/access-log?page=2")
        assert second.status_code == 200
        assert 'href="/portal/access-log?page=1" rel="prev"' in second.text
        assert 'rel="next"' not in second.text
        assert sum('<span class="tag glass">' in row for row in body_rows(second)) == 2
        assert [e.event_metadata for e in await events(runtime, second)] == [
            {"count": len(body_rows(second)), "offset": 50}]
        assert (await browser.get("/portal/access-log?page=99")).status_code == 200
        for bad in ("0", "-1", "two", "9" * 30):
            assert (await browser.get(f"/portal/access-log?page={bad}")).status_code == 400, bad


async def test_what_a_doctor_writes_is_shown_as_text_never_as_markup(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    hostile = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    await write_record(client, world.doctor, world.patient.id, diagnosis=hostile)
    named = await signed_in(runtime, "doctor", full_name='Dr "><b>Bold</b>')
    expect(await client.post(f"{API}/consultations", headers=world.patient.headers, json={
        "doctor_id": str(named.id), "scheduled_at": "2031-05-04T10:00:00+00:00",
        "reason": "</td></tr><tr><td>forged row"}), 201)
    expect(await client.post(f"{API}/patients/{world.patient.id}/records",
                             headers=world.doctor.headers, json={
                                 "diagnosis": "Asthma", "prescriptions": [],
                                 "notes": "First line\n<b>second</b> line"}), 201)
    async with portal_of(runtime, world.patient) as browser:
        records = await browser.get("/portal/records")
        team = await browser.get("/portal/care-team")
    assert "<script>" not in records.text and "<img" not in records.text
    assert "First line<br>&lt;b&gt;second&lt;/b&gt; line" in records.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in records.text
    assert "forged row" in records.text and "<td>forged row" not in records.text
    assert "<b>" not in team.text and "Dr &#34;&gt;&lt;b&gt;Bold&lt;/b&gt;" in team.text


async def test_a_patient_sees_only_their_own_data(runtime: Runtime,
                                                  client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    other = await patient_world(runtime, client)
    await write_record(client, other.doctor, other.patient.id, diagnosis="Someone else's")
    async with portal_of(runtime, world.patient) as browser:
        for page in PAGES:
            answer = await browser.get(page, params={"patient_id": str(other.patient.id)})
            assert answer.status_code == 200
            assert "Someone else" not in answer.text and other.patient.email not in answer.text


async def test_a_long_chart_shows_its_newest_page_and_says_there_is_more(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    world = await patient_world(runtime, client)
    for number in range(LIST_SIZE):
        expect(await client.post(
            f"{API}/patients/{world.patient.id}/prescriptions", headers=world.doctor.headers,
            json={"medication": f"Medication {number}", "dosage": "1 mg",
                  "instructions": "Once"}), 201)
    async with portal_of(runtime, world.patient) as browser:
        page = await browser.get("/portal/records")
    assert page.status_code == 200
    assert f"The newest {LIST_SIZE} of your {LIST_SIZE + 1} prescriptions" in page.text
    assert f"Medication {LIST_SIZE - 1}" in page.text and "Amoxicillin" not in page.text
    assert "of your 1 records" not in page.text  # no note where everything is shown
    shown = [e for e in await events(runtime, page) if e.action == "VIEW_PRESCRIPTION"]
    assert len(shown) == LIST_SIZE
