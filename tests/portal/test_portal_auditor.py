"""The auditor's pages of the portal (SPEC §15): the audit trail searched with the API's filters
and rules, the search and each break-glass reason shown audited as the API's are, the chain
verified (one verification at a time, shared with the API), and a signed checkpoint of its head
that verifies with the published key. Patients are refused every one of them."""

from __future__ import annotations

import asyncio
import base64
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from html import unescape
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import FastAPI
from sqlalchemy import select, update

from phivault.audit import search
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.audit.checkpoint import check_signature, parse_checkpoint
from phivault.audit.models import AuditEvent, AuditHead
from phivault.clinical.models import BreakGlassGrant
from phivault.crypto.audit_signing import CONTEXT
from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.request_context import SYSTEM
from phivault.runtime import Runtime
from phivault.web.app import create_app
from tests.audit.factories import tamper
from tests.audit.test_audit_api import scene
from tests.clinical.world import (
    API,
    BREAK_GLASS_REASON,
    break_glass,
    events_of,
    expect,
)
from tests.conftest import CLIENT_IP, client_for
from tests.factories import TestUser, make_user, signed_in
from tests.portal.browser import sign_in

PAGES = ("/portal/audit", "/portal/audit/verify", "/portal/audit/checkpoint")
_ROW = re.compile(r"<tr>\s*<td>(\d+)</td>")
_PRE = re.compile(r"<pre[^>]*>(.*?)</pre>", re.S)


def seqs_of(page: httpx.Response) -> list[int]:
    """The `seq` of every event in the results table, in the page's order."""
    return [int(seq) for seq in _ROW.findall(page.text)]


def is_page(answer: httpx.Response, status: int) -> None:
    """An HTML page of `status`, under the portal's CSP and never cached."""
    assert answer.status_code == status, (answer.request.url, answer.status_code,
                                          answer.text[:800])
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.headers["cache-control"] == "no-store"
    csp = answer.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp


async def the_auditor(rt: Runtime, client: httpx.AsyncClient) -> TestUser:
    """A new auditor, signed in to the portal in `client`."""
    auditor = await make_user(rt, "auditor")
    assert (await sign_in(client, auditor)).status_code == 303
    return auditor


async def page_events(rt: Runtime, answer: httpx.Response) -> list[AuditEvent]:
    request_id = answer.headers["x-request-id"]
    return (await events_of(rt, [request_id]))[request_id]


# Searching.

async def test_an_auditor_searches_with_filters(runtime: Runtime) -> None:
    async with client_for(runtime) as client:
        s = await scene(runtime, client)
        patient, doctor = s["patient"], s["doctor"]
        api_auditor = await signed_in(runtime, "auditor")
        await the_auditor(runtime, client)

        # The form as a browser sends it: every field, the empty ones included.
        empty = {"actor_id": "", "patient_id": "", "action": "", "outcome": "",
                 "resource_type": "", "resource_id": "", "since": "", "until": ""}
        about = await client.get("/portal/audit", params={
            **empty, "patient_id": str(patient.id), "order": "desc"})
        is_page(about, 200)
        api = await client.get(f"{API}/audit", params={"patient_id": str(patient.id)},
                               headers=api_auditor.headers)
        expected = expect(api, 200)
        # The same events as the API's answer, newest first, and the same total.
        assert seqs_of(about) == [e["seq"] for e in expected] and len(expected) >= 5
        assert f"{api.headers['x-total-count']} events match." in about.text
        for event in expected:
            assert event["action"] in about.text
        # The form keeps the search; the rows link to searches by actor and patient.
        assert f'name="patient_id" type="text" autocomplete="off" spellcheck="false" ' \
               f'maxlength="64" value="{patient.id}"' in about.text
        assert f'href="/portal/audit?actor_id={doctor.id}"' in about.text
        assert f'href="/portal/audit?patient_id={patient.id}"' in about.text

        oldest_first = await client.get("/portal/audit", params={
            "patient_id": str(patient.id), "order": "asc"})
        assert seqs_of(oldest_first) == list(reversed(seqs_of(about)))
        assert '<option value="asc" selected>' in oldest_first.text

        reads = await client.get("/portal/audit", params={
            **empty, "actor_id": str(doctor.id), "action": "VIEW_MEDICAL_RECORD"})
        is_page(reads, 200)
        assert len(seqs_of(reads)) == 2 and "2 events match." in reads.text
        assert '<option value="VIEW_MEDICAL_RECORD" selected>' in reads.text
        assert reads.text.count(s["record"]["id"]) == 2

        denied = await client.get("/portal/audit", params={
            **empty, "patient_id": str(patient.id), "outcome": "denied"})
        assert "1 event match." in denied.text and len(seqs_of(denied)) == 1
        assert "ACCESS_DENIED" in denied.text and str(s["stranger"].id) in denied.text

        record = await client.get("/portal/audit", params={
            "resource_type": "medical_record", "resource_id": s["record"]["id"]})
        assert len(seqs_of(record)) == 3

        nothing = await client.get("/portal/audit", params={"patient_id": str(uuid.uuid4())})
        is_page(nothing, 200)
        assert seqs_of(nothing) == [] and "No event matches this search." in nothing.text


async def test_paging_and_a_capped_total(runtime: Runtime,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    subject = uuid.uuid4()
    async with runtime.unit_of_work() as session:
        for _ in range(60):
            audit.record(session, Action.VIEW_PROFILE, actor=SYSTEM, resource_type="profile",
                         resource_id=subject, patient_id=subject)
    async with client_for(runtime) as client:
        await the_auditor(runtime, client)
        first = await client.get("/portal/audit", params={
            "patient_id": str(subject), "action": "", "order": "desc"})
        is_page(first, 200)
        assert len(seqs_of(first)) == 50 and "60 events match." in first.text
        assert "Showing 1 to 50, 50 a page." in first.text and "Page 1 of 2" in first.text
        next_link = f'href="/portal/audit?patient_id={subject}&amp;order=desc&amp;page=2"'
        assert next_link in first.text and 'rel="prev"' not in first.text

        second = await client.get(f"/portal/audit?patient_id={subject}&order=desc&page=2")
        is_page(second, 200)
        assert seqs_of(second) == sorted(seqs_of(second), reverse=True)
        assert len(seqs_of(second)) == 10 and max(seqs_of(second)) < min(seqs_of(first))
        assert "Showing 51 to 60" in second.text and 'rel="next"' not in second.text
        assert 'rel="prev"' in second.text

        past = await client.get(f"/portal/audit?patient_id={subject}&page=3")
        is_page(past, 200)
        assert seqs_of(past) == [] and "past the last one" in past.text

        # Beyond the cap, the total is "at least", and there is always a next page.
        monkeypatch.setattr(search, "COUNT_CAP", 55)
        capped = await client.get(f"/portal/audit?patient_id={subject}")
        assert "At least 55 events match" in capped.text
        assert "Page 1 of at least 2" in capped.text and 'rel="next"' in capped.text
        monkeypatch.setattr(search, "COUNT_CAP", 60)
        exact = await client.get(f"/portal/audit?patient_id={subject}")
        assert "60 events match." in exact.text


async def test_the_search_is_audited_as_the_api_search_is(runtime: Runtime) -> None:
    async with client_for(runtime) as client:
        auditor = await the_auditor(runtime, client)
        api_auditor = await signed_in(runtime, "auditor")
        patient_id = uuid.uuid4()
        query = {"patient_id": str(patient_id), "action": "BREAK_GLASS",
                 "since": "2030-01-01T00:00:00Z"}
        answer = await client.get("/portal/audit", params={**query, "outcome": ""})
        is_page(answer, 200)
        api = await client.get(f"{API}/audit", params=query, headers=api_auditor.headers)
        expect(api, 200)
    (event,) = await page_events(runtime, answer)
    (api_event,) = await page_events(runtime, api)
    assert (event.action, event.actor_id, event.actor_role, event.patient_id) == (
        "VIEW_AUDIT_TRAIL", auditor.id, "auditor", None)
    assert event.event_metadata == api_event.event_metadata == {
        "filter_patient_id": str(patient_id), "filter_action": "BREAK_GLASS",
        "since": "2030-01-01T00:00:00+00:00", "order": "desc", "limit": 50, "offset": 0,
        "count": 0}


async def test_a_break_glass_reason_shown_is_audited(runtime: Runtime) -> None:
    async with client_for(runtime) as client:
        patient, rescuer = await signed_in(runtime, "patient"), await signed_in(runtime,
                                                                                "doctor")
        expect(await break_glass(client, rescuer, patient.id), 201)
        auditor = await the_auditor(runtime, client)
        found = await client.get("/portal/audit", params={
            "patient_id": str(patient.id), "action": "BREAK_GLASS"})
        is_page(found, 200)
        assert len(seqs_of(found)) == 1 and BREAK_GLASS_REASON in found.text
        quiet = await client.get("/portal/audit", params={
            "patient_id": str(patient.id), "action": "CONSENT_CHANGED"})
        assert BREAK_GLASS_REASON not in quiet.text
    async with runtime.sessions() as session:
        grant_id = (await session.execute(select(AuditEvent.resource_id).where(
            AuditEvent.action == "BREAK_GLASS", AuditEvent.patient_id == patient.id))
        ).scalar_one()
    events = await page_events(runtime, found)
    assert sorted((e.action, e.actor_id, e.patient_id, e.resource_id) for e in events) == [
        ("VIEW_AUDIT_TRAIL", auditor.id, None, None),
        ("VIEW_BREAK_GLASS_REASON", auditor.id, patient.id, grant_id)]
    # A page without break-glass events opens no reason.
    assert [e.action for e in await page_events(runtime, quiet)] == ["VIEW_AUDIT_TRAIL"]


async def test_a_tampered_break_glass_grant_shows_no_reason(
        fresh_runtime: Callable[..., Any]) -> None:
    """A grant whose reason no longer matches its event's `reason_mac` is an integrity
    failure, as on the API: no reason shown, and the failure audited."""
    rt: Runtime = await fresh_runtime()
    async with client_for(rt) as client:
        patient, rescuer = await signed_in(rt, "patient"), await signed_in(rt, "doctor")
        expect(await break_glass(client, rescuer, patient.id), 201)
        async with rt.engine.begin() as connection:
            await connection.execute(update(BreakGlassGrant).values(reason=None))
        await the_auditor(rt, client)
        answer = await client.get("/portal/audit", params={"action": "BREAK_GLASS"})
    assert answer.status_code == 500 and answer.headers["cache-control"] == "no-store"
    assert BREAK_GLASS_REASON not in answer.text
    actions = [e.action for e in await page_events(rt, answer)]
    assert "INTEGRITY_FAILURE" in actions and "VIEW_BREAK_GLASS_REASON" not in actions


BAD_QUERIES = [
    ("action=NOT_AN_ACTION", "Action: choose one of the list."),
    ("action=view_medical_record", "Action: choose one of the list."),
    ("outcome=maybe", "Outcome: choose success, denied or error."),
    ("actor_id=Robert", "Actor id: must be a user id"),
    ("patient_id=12345", "Patient id: must be a patient"),
    ("patient_id=00000000000000000000000000000000", "Patient id: must be a patient"),
    ("resource_type=user&resource_id=Robert", "Resource id: must be an id"),
    ("resource_id=6a1d0f3e-8d5c-4a7e-9a53-0f1c2b3d4e5f",
     "A resource id needs its resource type."),
    ("resource_type=Medical%20Record", "Resource type: lowercase letters"),
    ("resource_type=" + "a" * 49, "Resource type: lowercase letters"),
    ("since=2031-01-01T00:00:00", "Since: must be an ISO 8601 time with an offset"),
    ("since=2031-01-01", "Since: must be an ISO 8601 time with an offset"),
    ("since=1700000000", "Since: must be an ISO 8601 time with an offset"),
    ("until=yesterday", "Until: must be an ISO 8601 time with an offset"),
    ("since=0001-01-01T00:00:00%2B14:00",
     "Since: must be a time between 0001-01-01 and 9999-12-31 in UTC"),
    ("since=2031-01-02T00:00:00Z&until=2031-01-01T00:00:00Z", "Since must be before Until."),
    ("since=2031-01-01T00:00:00Z&until=2031-01-01T00:00:00Z", "Since must be before Until."),
    ("order=sideways", "Order: newest first or oldest first."),
    ("page=0", "Page: a whole number from 1"),
    ("page=ten", "Page: a whole number from 1"),
    ("page=99999999999", "Page: a whole number from 1"),
    ("limit=500", "a field this page does not know"),
    ("patient=6a1d0f3e-8d5c-4a7e-9a53-0f1c2b3d4e5f", "a field this page does not know"),
    ("action=LOGIN_SUCCESS&action=LOGOUT", "at most once"),
]


async def test_malformed_filters_are_a_400_page(runtime: Runtime) -> None:
    async with client_for(runtime) as client:
        await the_auditor(runtime, client)
        for query, problem in BAD_QUERIES:
            answer = await client.get(f"/portal/audit?{query}")
            is_page(answer, 400)
            assert problem in answer.text, (query, answer.text[:3000])
            assert "The search could not be run." in answer.text
            # The page names the field, never the value it refused; it searched nothing.
            assert "Robert" not in answer.text and "sideways" not in answer.text, query
            assert seqs_of(answer) == [] and await page_events(runtime, answer) == [], query
        # Fields that were right are kept in the form; the wrong one is emptied.
        kept = await client.get("/portal/audit?resource_type=user&resource_id=Robert&order=asc")
        assert 'maxlength="48" value="user"' in kept.text
        assert 'maxlength="64" value=""' in kept.text
        assert '<option value="asc" selected>' in kept.text


async def test_empty_fields_mean_no_filter(runtime: Runtime) -> None:
    async with client_for(runtime) as client:
        await the_auditor(runtime, client)
        blank = ("actor_id=&patient_id=&action=&outcome=&resource_type=&resource_id="
                 "&since=&until=&order=desc")
        answer = await client.get(f"/portal/audit?{blank}")
        is_page(answer, 200)
        spaces = await client.get("/portal/audit?actor_id=%20%20&order=&page=")
        is_page(spaces, 200)
    async with runtime.sessions() as session:
        head = (await session.execute(select(AuditHead.seq))).scalar_one()
    assert len(seqs_of(answer)) == 50 or head < 50
    for page in (answer, spaces):
        (event,) = [e for e in await page_events(runtime, page)
                    if e.action == "VIEW_AUDIT_TRAIL"]
        assert event.event_metadata["order"] == "desc"
        assert not [key for key in event.event_metadata if key.startswith("filter_")]


# Who may open the pages.

async def test_a_patient_is_refused_every_auditor_page(runtime: Runtime) -> None:
    patient = await make_user(runtime, "patient")
    async with client_for(runtime) as client:
        for path in PAGES:
            away = await client.get(path)
            assert away.status_code == 303
            assert away.headers["location"] == f"/portal/sign-in?next={path}"
        await sign_in(client, patient)
        for path in PAGES:
            refused = await client.get(path, params={"patient_id": str(patient.id)}
                                       if path == "/portal/audit" else None)
            is_page(refused, 403)
            assert "You may not do this." in refused.text
            events = await page_events(runtime, refused)
            assert [(e.action, e.outcome, e.actor_id, e.event_metadata) for e in events] == [
                ("ACCESS_DENIED", "denied", patient.id, {"reason": "role", "role": "patient"})]


async def test_the_pages_are_accessible_without_script_or_inline_style(
        runtime: Runtime) -> None:
    async with client_for(runtime) as client:
        await the_auditor(runtime, client)
        pages = [await client.get(path) for path in PAGES]
        pages.append(await client.get("/portal/audit?action=NOPE"))
    for page in pages:
        text = page.text
        assert "<script" not in text and "style=" not in text, page.request.url
        assert not re.search(r"<[^>]*\son[a-z]+\s*=", text), page.request.url
        assert '{% extends' not in text and 'href="/portal/static/portal.css"' in text
        fields = re.findall(r'<(?:input|select)(?![^>]*type="hidden")[^>]*\bid="([^"]+)"', text)
        for field in fields:
            assert f'<label for="{field}">' in text, (page.request.url, field)
        assert '<th>' not in text
        if "<table" in text:
            assert '<div class="table-wrap">' in text and '<th scope="col">' in text
    search_page = pages[0].text
    assert len(re.findall(r'<(?:input|select)(?![^>]*type="hidden")', search_page)) == 9
    assert '<form method="get" action="/portal/audit"' in search_page


# Verification.

@pytest.mark.tampers
async def test_verification_shows_ok_then_the_first_bad_seq(
        fresh_runtime: Callable[..., Any]) -> None:
    rt: Runtime = await fresh_runtime()
    async with client_for(rt) as client:
        await the_auditor(rt, client)
        sound = await client.get("/portal/audit/verify")
        is_page(sound, 200)
        async with rt.sessions() as session:
            head = (await session.execute(select(AuditHead.seq))).scalar_one()
        assert "The chain holds." in sound.text
        assert f"<dt><strong>Events verified</strong></dt>\n  <dd>{head - 1}</dd>" in sound.text
        assert "<dt><strong>First bad seq</strong></dt>\n  <dd>none</dd>" in sound.text
        (checked,) = await page_events(rt, sound)
        assert (checked.action, checked.event_metadata) == (
            "VERIFY_AUDIT_CHAIN", {"ok": True, "events": head - 1, "first_bad_seq": None})

        await tamper(rt, "UPDATE audit_events SET ip = '198.51.100.9' WHERE seq = 2")
        broken = await client.get("/portal/audit/verify")
        is_page(broken, 200)
        assert "The chain is broken at seq 2." in broken.text
        assert "<dt><strong>First bad seq</strong></dt>\n  <dd>2</dd>" in broken.text
        (checked,) = await page_events(rt, broken)
        assert checked.event_metadata["ok"] is False
        assert checked.event_metadata["first_bad_seq"] == 2


@asynccontextmanager
async def app_client(rt: Runtime) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """`client_for`, with the app in hand (its verification gate is in `app.state`)."""
    app = create_app(runtime=rt)
    transport = httpx.ASGITransport(app=app, client=(CLIENT_IP, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as client:
        yield app, client


async def test_one_verification_at_a_time_with_the_api(
        fresh_runtime: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The pages and `GET /api/v1/audit/verify` share one gate per process: a verification or
    a checkpoint asked while another runs, either way, is refused at once (429)."""
    rt: Runtime = await fresh_runtime(
        audit_signing_key=generate_key_line(KeyKind.AUDIT_SIGNING))
    async with app_client(rt) as (app, client):
        api_auditor = await signed_in(rt, "auditor")
        await the_auditor(rt, client)
        gate = app.state.verification_gate = asyncio.Lock()
        async with gate:  # a verification at work
            for path in ("/portal/audit/verify", "/portal/audit/checkpoint"):
                busy = await client.get(path)
                is_page(busy, 429)
                assert int(busy.headers["retry-after"]) > 0
            expect(await client.get(f"{API}/audit/verify", headers=api_auditor.headers), 429,
                   "rate_limited")
        for path in ("/portal/audit/verify", "/portal/audit/checkpoint"):
            is_page(await client.get(path), 200)
        assert not gate.locked()

        if rt.engine.dialect.name == "sqlite":
            # SQLite has one writer: a page waits for the write lock the request verifying
            # holds (its session was touched), so the page cannot be asked meanwhile.
            return
        running, release = asyncio.Event(), asyncio.Event()
        real = audit.verify_snapshot

        async def held(*args: Any, **kwargs: Any) -> Any:
            running.set()
            await release.wait()
            return await real(*args, **kwargs)

        monkeypatch.setattr(audit, "verify_snapshot", held)
        for first_path, second_path in (("/portal/audit/verify", f"{API}/audit/verify"),
                                        (f"{API}/audit/verify", "/portal/audit/verify")):
            running.clear()
            release.clear()
            first = asyncio.create_task(client.get(first_path, headers=api_auditor.headers))
            await asyncio.wait_for(running.wait(), 10)
            second = await client.get(second_path, headers=api_auditor.headers)
            assert second.status_code == 429, (first_path, second.text[:500])
            release.set()
            assert (await first).status_code == 200


# Checkpoints.

async def test_the_checkpoint_verifies_with_the_published_key(
        fresh_runtime: Callable[..., Any]) -> None:
    rt: Runtime = await fresh_runtime(
        audit_signing_key=generate_key_line(KeyKind.AUDIT_SIGNING))
    async with client_for(rt) as client:
        await the_auditor(rt, client)
        answer = await client.get("/portal/audit/checkpoint")
        is_page(answer, 200)
        published = (await client.get("/.well-known/audit-key.json")).json()
    async with rt.sessions() as session:
        head_seq, head_hash = (await session.execute(select(AuditHead.seq, AuditHead.hash))
                               ).one()
    (text,) = _PRE.findall(answer.text)
    signed = parse_checkpoint(unescape(text))
    # The head as it was when signed: the page's own event came after it.
    assert signed.seq == head_seq - 1
    assert "phivault audit verify --checkpoint FILE" in answer.text
    assert 'href="/.well-known/audit-key.json"' in answer.text

    (jwk,) = published["keys"]
    assert jwk["kid"] == signed.key_id
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(jwk["x"] + "="))
    public.verify(signed.signature, CONTEXT + signed.signed_bytes())
    # And `phivault audit verify --checkpoint` takes it: its head holds, what follows verifies.
    anchor = check_signature(signed, rt.settings.checkpoint_signer)
    result = await audit.verify_snapshot(rt.sessions, rt.audit_key, rt.sequencer,
                                         rt.queue_key, checkpoint=anchor)
    assert (result.ok, result.events) == (True, 1)
    assert bytes(head_hash) != signed.hash

    (made,) = await page_events(rt, answer)
    assert (made.action, made.outcome, made.resource_type, made.resource_id) == (
        "AUDIT_CHECKPOINT", "success", "audit_chain", str(signed.seq))
    assert made.event_metadata == {"ok": True, "events": signed.seq, "first_bad_seq": None}


@pytest.mark.tampers
async def test_a_broken_chain_is_not_signed(fresh_runtime: Callable[..., Any]) -> None:
    rt: Runtime = await fresh_runtime(
        audit_signing_key=generate_key_line(KeyKind.AUDIT_SIGNING))
    async with client_for(rt) as client:
        await the_auditor(rt, client)
        await tamper(rt, "UPDATE audit_events SET ip = '198.51.100.9' WHERE seq = 1")
        answer = await client.get("/portal/audit/checkpoint")
        is_page(answer, 200)
    assert "The chain is broken at seq 1: no checkpoint was signed." in answer.text
    assert "<pre" not in answer.text
    (made,) = await page_events(rt, answer)
    assert (made.action, made.outcome) == ("AUDIT_CHECKPOINT", "error")
    assert made.event_metadata["first_bad_seq"] == 1


async def test_without_a_key_the_checkpoint_page_says_so(runtime: Runtime) -> None:
    assert runtime.settings.checkpoint_signer.keys == ()
    async with client_for(runtime) as client:
        await the_auditor(runtime, client)
        answer = await client.get("/portal/audit/checkpoint")
    is_page(answer, 200)
    assert "No checkpoint key is configured" in answer.text
    assert "PHIVAULT_AUDIT_SIGNING_KEY" in answer.text and "<pre" not in answer.text
    assert await page_events(runtime, answer) == []
