"""`GET /api/v1/audit` (SPEC §8): an auditor's search over the trail, its filters, order and
paging, strict validation, role denials, no PHI in the answers, and the break-glass reason that
only auditors read (issue 8, items 3 and 7)."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from phivault.audit import search
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.audit.models import AuditEvent, AuditHead
from phivault.audit.schemas import AuditSearch
from phivault.clinical.models import BreakGlassGrant
from phivault.db.base import utcnow
from phivault.request_context import SYSTEM
from phivault.runtime import Runtime
from phivault.web.app import create_app
from tests.clinical.test_phi_at_rest import found_in, store_phi
from tests.clinical.world import (
    API,
    BREAK_GLASS_REASON,
    book,
    break_glass,
    events_of,
    expect,
    set_consent,
    write_record,
)
from tests.conftest import client_for
from tests.factories import TestUser, signed_in


async def trail(client: httpx.AsyncClient, auditor: TestUser,
                **params: Any) -> tuple[list[dict[str, Any]], httpx.Response]:
    response = await client.get(f"{API}/audit", headers=auditor.headers,
                                params={k: str(v) for k, v in params.items()})
    return expect(response, 200), response


async def whole_trail(client: httpx.AsyncClient, auditor: TestUser,
                      **params: Any) -> list[dict[str, Any]]:
    """Every page of a search, at the largest page size."""
    events: list[dict[str, Any]] = []
    while True:
        page, _ = await trail(client, auditor, limit=500, offset=len(events), **params)
        events += page
        if len(page) < 500:
            return events


async def scene(rt: Runtime, client: httpx.AsyncClient) -> dict[str, Any]:
    """A patient with a doctor who writes and reads a record, a stranger who is refused."""
    patient = await signed_in(rt, "patient")
    doctor = await signed_in(rt, "doctor", full_name="Dr Ada Care")
    stranger = await signed_in(rt, "doctor")
    auditor = await signed_in(rt, "auditor")
    await set_consent(client, patient, True)
    await book(client, patient, doctor)
    record = await write_record(client, doctor, patient.id)
    for _ in range(2):
        expect(await client.get(f"{API}/records/{record['id']}", headers=doctor.headers), 200)
    expect(await client.get(f"{API}/records/{record['id']}", headers=stranger.headers), 403,
           "no_care_relationship")
    return {"patient": patient, "doctor": doctor, "stranger": stranger, "auditor": auditor,
            "record": record}


async def test_filters_order_and_paging(client: httpx.AsyncClient, runtime: Runtime) -> None:
    s = await scene(runtime, client)
    patient, doctor, auditor = s["patient"], s["doctor"], s["auditor"]

    about, response = await trail(client, auditor, patient_id=patient.id)
    assert response.headers["x-total-count"] == str(len(about))
    assert response.headers["x-total-count-exact"] == "true"
    assert all(e["patient_id"] == str(patient.id) for e in about)
    seqs = [e["seq"] for e in about]
    assert seqs == sorted(seqs, reverse=True)  # newest first by default
    assert {e["action"] for e in about} >= {"CONSENT_CHANGED", "CREATE_CONSULTATION",
                                            "CREATE_MEDICAL_RECORD", "VIEW_MEDICAL_RECORD",
                                            "ACCESS_DENIED"}
    oldest_first, _ = await trail(client, auditor, patient_id=patient.id, order="asc")
    assert oldest_first == list(reversed(about))

    # Paging: a window of the same order, the same total.
    page, response = await trail(client, auditor, patient_id=patient.id, limit=2, offset=1)
    assert page == about[1:3]
    assert response.headers["x-total-count"] == str(len(about))

    reads, response = await trail(client, auditor, actor_id=doctor.id,
                                  action="VIEW_MEDICAL_RECORD")
    assert [(e["actor_id"], e["action"], e["resource_id"]) for e in reads] == [
        (str(doctor.id), "VIEW_MEDICAL_RECORD", s["record"]["id"])] * 2
    assert response.headers["x-total-count"] == "2"

    denied, _ = await trail(client, auditor, patient_id=patient.id, outcome="denied")
    assert [(e["action"], e["actor_id"], e["metadata"]["reason"]) for e in denied] == [
        ("ACCESS_DENIED", str(s["stranger"].id), "no_care_relationship")]

    record_events, _ = await trail(client, auditor, resource_type="medical_record",
                                   resource_id=s["record"]["id"])
    assert [e["action"] for e in record_events] == [
        "VIEW_MEDICAL_RECORD", "VIEW_MEDICAL_RECORD", "CREATE_MEDICAL_RECORD"]

    # A time window: `since` inclusive, `until` exclusive.
    created = record_events[-1]
    start = datetime.fromisoformat(created["at"])
    window, _ = await trail(client, auditor, patient_id=patient.id, since=created["at"])
    assert window == [e for e in about if datetime.fromisoformat(e["at"]) >= start]
    assert created in window and about[-1] not in window
    window, _ = await trail(client, auditor, patient_id=patient.id, until=created["at"])
    assert window == [e for e in about if datetime.fromisoformat(e["at"]) < start]
    assert created not in window and about[-1] in window
    window, _ = await trail(client, auditor, patient_id=patient.id,
                            since=(start - timedelta(days=1)).isoformat(),
                            until=(start + timedelta(days=1)).isoformat())
    assert window == about
    assert (await trail(client, auditor, patient_id=uuid.uuid4()))[0] == []

    # Each answer is an event with its chain hash, and every field named.
    event = reads[0]
    assert set(event) == {"seq", "event_id", "at", "actor_id", "actor_role", "action",
                          "resource_type", "resource_id", "patient_id", "outcome", "ip",
                          "user_agent", "request_id", "metadata", "hash",
                          "break_glass_reason"}
    assert len(bytes.fromhex(event["hash"])) == 32 and event["break_glass_reason"] is None


async def test_searches_are_audited_with_their_filters(client: httpx.AsyncClient,
                                                       runtime: Runtime) -> None:
    auditor = await signed_in(runtime, "auditor")
    patient_id = uuid.uuid4()
    _, response = await trail(client, auditor, patient_id=patient_id, action="BREAK_GLASS",
                              since="2030-01-01T00:00:00Z", limit=7)
    request_id = response.headers["x-request-id"]
    (event,) = (await events_of(runtime, [request_id]))[request_id]
    assert (event.action, event.actor_id, event.patient_id) == (
        "VIEW_AUDIT_TRAIL", auditor.id, None)
    assert event.event_metadata == {
        "filter_patient_id": str(patient_id), "filter_action": "BREAK_GLASS",
        "since": "2030-01-01T00:00:00+00:00", "order": "desc", "limit": 7, "offset": 0,
        "count": 0}
    # The auditor's next search sees it: the trail is sequenced before it is read.
    mine, _ = await trail(client, auditor, actor_id=auditor.id)
    assert mine[0]["request_id"] == request_id and mine[0]["action"] == "VIEW_AUDIT_TRAIL"


async def test_the_unfiltered_total_is_the_chain_length(fresh_runtime: Any) -> None:
    rt: Runtime = await fresh_runtime()
    auditor = await signed_in(rt, "auditor")
    async with client_for(rt) as client:
        events, response = await trail(client, auditor, limit=500)
    async with rt.sessions() as session:
        head = (await session.execute(select(AuditHead.seq))).scalar_one() - 1  # the search's
    assert response.headers["x-total-count"] == str(head) == str(len(events))
    assert response.headers["x-total-count-exact"] == "true"
    assert [e["seq"] for e in events] == list(range(head, 0, -1))


@pytest.mark.parametrize("order", ["desc", "asc"])
async def test_a_time_window_answers_alike_within_its_seq_range(
        client: httpx.AsyncClient, runtime: Runtime, order: str) -> None:
    """A window is read within the `seq` range that holds it (`timeline.seq_range`, from the
    timing the sequencer keeps): the answer is the one of the whole chain (a disordered chain
    is in test_timeline.py)."""
    await scene(runtime, client)
    async with runtime.sessions() as session:
        newest = (await session.execute(select(AuditEvent.at).order_by(
            AuditEvent.seq.desc()).limit(1))).scalar_one()
        windows = [AuditSearch(since=newest - timedelta(minutes=5), order=order),
                   AuditSearch(until=newest, order=order),
                   AuditSearch(since=newest - timedelta(days=3650), until=newest, order=order)]
        for window in windows:
            for limit, offset in ((3, 0), (5, 4), (500, 0)):
                seqs = await search.window_seqs(session, window)
                assert seqs is not None
                answers = [(await session.execute(search.page_query(
                    window, limit, offset, within))).all() for within in (None, seqs)]
                assert answers[0] == answers[1] and answers[0], (window, limit, offset)
                seqs = [row.seq for row in answers[0]]
                assert seqs == sorted(seqs, reverse=order == "desc")


async def test_a_broad_filter_counts_up_to_the_cap(client: httpx.AsyncClient, runtime: Runtime,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    s = await scene(runtime, client)
    monkeypatch.setattr(search, "COUNT_CAP", 3)
    events, response = await trail(client, s["auditor"], patient_id=s["patient"].id, limit=2)
    assert len(events) == 2
    assert (response.headers["x-total-count"], response.headers["x-total-count-exact"]) == (
        "3", "false")
    _, response = await trail(client, s["auditor"], actor_id=s["stranger"].id,
                              outcome="denied")
    assert (response.headers["x-total-count"], response.headers["x-total-count-exact"]) == (
        "1", "true")


@pytest.mark.parametrize("query", [
    "action=NOT_AN_ACTION", "action=view_medical_record", "outcome=maybe",
    "actor_id=not-a-uuid", "patient_id=12345", "resource_type=user&resource_id=Robert",
    "resource_id=6a1d0f3e-8d5c-4a7e-9a53-0f1c2b3d4e5f", "actor_id=",
    "patient_id=00000000000000000000000000000000",
    "resource_type=Medical%20Record", "resource_type=" + "a" * 49,
    "since=2031-01-01T00:00:00", "since=2031-01-01", "since=1700000000",
    "since=2031-01-01T00:00:00%2001:00", "until=yesterday",
    "since=2031-01-02T00:00:00Z&until=2031-01-01T00:00:00Z",
    "since=2031-01-01T00:00:00Z&until=2031-01-01T00:00:00Z",
    "order=sideways", "limit=0", "limit=501", "offset=-1", "limit=ten",
    "patient=6a1d0f3e-8d5c-4a7e-9a53-0f1c2b3d4e5f", "action=LOGIN_SUCCESS&action=LOGOUT",
])
async def test_bad_queries_are_refused(client: httpx.AsyncClient, runtime: Runtime,
                                       query: str) -> None:
    auditor = await signed_in(runtime, "auditor")
    response = await client.get(f"{API}/audit?{query}", headers=auditor.headers)
    body = expect(response, 422)
    assert body["error"] in {"validation_error", "invalid_request"}
    # The refusal names no submitted value.
    assert "Robert" not in response.text and "sideways" not in response.text


@pytest.mark.parametrize("role", ["patient", "doctor", "admin"])
async def test_only_auditors_search(client: httpx.AsyncClient, runtime: Runtime,
                                    role: str) -> None:
    caller = await signed_in(runtime, role)
    response = await client.get(f"{API}/audit", headers=caller.headers)
    expect(response, 403, "forbidden")
    request_id = response.headers["x-request-id"]
    events = (await events_of(runtime, [request_id]))[request_id]
    assert [(e.action, e.outcome, e.actor_id, e.event_metadata) for e in events] == [
        ("ACCESS_DENIED", "denied", caller.id, {"reason": "role", "role": role})]


async def test_anonymous_callers_are_refused(client: httpx.AsyncClient,
                                             runtime: Runtime) -> None:
    expect(await client.get(f"{API}/audit"), 401)


async def test_auditor_reads_the_break_glass_reason_and_that_read_is_audited(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient, rescuer = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    auditor = await signed_in(runtime, "auditor")
    response = await break_glass(client, rescuer, patient.id)
    expect(response, 201)
    request_id = response.headers["x-request-id"]

    # Stored sealed: the event names the grant and holds no reason; the grant holds ciphertext.
    (event,) = [e for e in (await events_of(runtime, [request_id]))[request_id]
                if e.action == "BREAK_GLASS"]
    assert "reason" not in event.event_metadata
    async with runtime.sessions() as session:
        grant = await session.get(BreakGlassGrant, uuid.UUID(str(event.resource_id)))
    assert grant is not None and grant.reason is not None and grant.data_key_id is not None
    assert found_in(bytes(grant.reason), [BREAK_GLASS_REASON]) == []

    found, response = await trail(client, auditor, patient_id=patient.id, action="BREAK_GLASS")
    assert [(e["actor_id"], e["resource_id"], e["break_glass_reason"]) for e in found] == [
        (str(rescuer.id), str(grant.id), BREAK_GLASS_REASON)]
    assert "reason" not in found[0]["metadata"] and "expires_at" in found[0]["metadata"]

    # Reading the reason is PHI access: an event of its own, about the patient.
    search_id = response.headers["x-request-id"]
    events = (await events_of(runtime, [search_id]))[search_id]
    assert sorted((e.action, e.actor_id, e.patient_id, e.resource_id) for e in events) == [
        ("VIEW_AUDIT_TRAIL", auditor.id, None, None),
        ("VIEW_BREAK_GLASS_REASON", auditor.id, patient.id, str(grant.id))]
    # A page without break-glass events opens nothing.
    _, response = await trail(client, auditor, patient_id=patient.id, action="CONSENT_CHANGED")
    quiet = response.headers["x-request-id"]
    assert [e.action for e in (await events_of(runtime, [quiet]))[quiet]] == [
        "VIEW_AUDIT_TRAIL"]


async def test_grants_made_before_reasons_were_sealed(client: httpx.AsyncClient,
                                                      runtime: Runtime) -> None:
    """A grant with no sealed reason answers null; an old event that held the reason in its
    metadata answers it as `break_glass_reason` (audited), never in `metadata`."""
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    auditor = await signed_in(runtime, "auditor")
    legacy_reason = f"Legacy emergency reason {secrets.token_hex(4)}"
    grants = []
    async with runtime.unit_of_work() as session:
        for metadata in ({}, {"reason": legacy_reason}):
            grant = BreakGlassGrant(id=uuid.uuid4(), doctor_id=doctor.id, patient_id=patient.id,
                                    created_at=utcnow(), expires_at=utcnow())
            session.add(grant)
            grants.append(grant.id)
            audit.record(session, Action.BREAK_GLASS, actor=SYSTEM, resource_type="break_glass",
                         resource_id=grant.id, patient_id=patient.id, metadata=metadata)
    found, response = await trail(client, auditor, patient_id=patient.id, action="BREAK_GLASS",
                                  order="asc")
    assert [(e["resource_id"], e["break_glass_reason"], e["metadata"]) for e in found] == [
        (str(grants[0]), None, {}), (str(grants[1]), legacy_reason, {})]
    search_id = response.headers["x-request-id"]
    events = (await events_of(runtime, [search_id]))[search_id]
    assert [(e.action, e.resource_id) for e in events if e.action != "VIEW_AUDIT_TRAIL"] == [
        ("VIEW_BREAK_GLASS_REASON", str(grants[1]))]


async def test_no_phi_in_the_answers(fresh_runtime: Any, tmp_path: Path) -> None:
    """Every PHI field filled with known text, then the whole trail read back: none of the text
    is in any answer but the break-glass reason, in its own field."""
    rt: Runtime = await fresh_runtime()
    tag = secrets.token_hex(6)
    plaintexts, _ = await store_phi(rt, tag)
    auditor = await signed_in(rt, "auditor")
    async with client_for(rt) as client:
        events = await whole_trail(client, auditor)
    assert len(events) > 30
    reasons = [e.pop("break_glass_reason") for e in events]
    assert found_in(json.dumps(events).encode(), plaintexts) == []
    (reason,) = [r for r in reasons if r is not None]
    assert found_in(reason.encode(), plaintexts) == [reason]


async def test_openapi_lists_the_error_answers(runtime: Runtime) -> None:
    document = create_app(runtime=runtime).openapi()
    route = document["paths"]["/api/v1/audit"]["get"]
    assert {"401", "403", "422"} <= set(route["responses"])
    parameters = {p["name"] for p in route["parameters"]}
    assert parameters == {"actor_id", "patient_id", "action", "outcome", "resource_type",
                          "resource_id", "since", "until", "order", "limit", "offset"}
    assert "X-Total-Count-Exact" in route["description"]


async def test_since_takes_any_offset(client: httpx.AsyncClient, runtime: Runtime) -> None:
    s = await scene(runtime, client)
    about, _ = await trail(client, s["auditor"], patient_id=s["patient"].id)
    newest = datetime.fromisoformat(about[0]["at"]).astimezone(UTC)
    paris = (newest + timedelta(hours=1)).replace(tzinfo=None).isoformat() + "+01:00"
    found, _ = await trail(client, s["auditor"], patient_id=s["patient"].id, since=paris)
    assert found == [about[0]]


@pytest.mark.parametrize(("field", "value"), [
    ("since", "0001-01-01T00:00:00%2B14:00"), ("until", "0001-01-01T00:00:00%2B14:00"),
    ("since", "9999-12-31T23:59:59-23:59"), ("until", "9999-12-31T23:59:59-23:59"),
])
async def test_a_time_beyond_utc_is_a_422_naming_its_field(
        client: httpx.AsyncClient, runtime: Runtime, field: str, value: str) -> None:
    """Valid with its offset but out of range in UTC: refused, not a 500 in the conversion."""
    auditor = await signed_in(runtime, "auditor")
    response = await client.get(f"{API}/audit?{field}={value}", headers=auditor.headers)
    body = expect(response, 422)
    assert [(f["field"], f["problem"]) for f in body["fields"]] == [
        (f"query.{field}", "Value error, must be a time between 0001-01-01 and 9999-12-31 "
                           "in UTC")]


async def test_one_verification_at_a_time(client: httpx.AsyncClient, runtime: Runtime,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL a verification runs a process per core: a second one asked meanwhile is
    refused at once instead of multiplying them."""
    auditor = await signed_in(runtime, "auditor")
    running, release = asyncio.Event(), asyncio.Event()
    real = audit.verify_snapshot

    async def held(*args: Any, **kwargs: Any) -> Any:
        running.set()
        await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(audit, "verify_snapshot", held)
    first = asyncio.create_task(client.get(f"{API}/audit/verify", headers=auditor.headers))
    await asyncio.wait_for(running.wait(), 10)
    second = await client.get(f"{API}/audit/verify", headers=auditor.headers)
    assert second.status_code == 429 and second.json()["error"] == "rate_limited"
    assert int(second.headers["Retry-After"]) > 0
    release.set()
    assert (await first).json()["ok"] is True
    assert (await client.get(f"{API}/audit/verify", headers=auditor.headers)).status_code == 200
