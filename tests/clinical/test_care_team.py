"""The care relationship over time and under the patient's control (SPEC §7, as amended): a
consultation is completed only once its time has passed; a completed one keeps the relationship
for PHIVAULT_CARE_RELATIONSHIP_DAYS; the patient lists their care team and ends one doctor's
access at any moment, which only a new consultation they book or accept restores."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from phivault.access.care_team import _run_start
from phivault.audit.actions import Action
from phivault.clinical.models import Consultation
from phivault.config import ConfigError, load_settings
from phivault.db.base import utcnow
from phivault.runtime import Runtime
from tests.clinical.world import (
    API,
    LATER,
    book,
    complete,
    events_of,
    expect,
    move_consultation,
    propose,
    set_consent,
    set_status,
    write_record,
)
from tests.conftest import client_for, generate_keys
from tests.factories import TestUser, signed_in

DAYS = 365  # the default window, the shared runtime's


def when(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def chart(client: httpx.AsyncClient, doctor: TestUser,
                patient: TestUser) -> httpx.Response:
    return await client.get(f"{API}/patients/{patient.id}/records", headers=doctor.headers)


async def care_team(client: httpx.AsyncClient, patient: TestUser,
                    **params: int) -> list[dict[str, Any]]:
    return list(expect(await client.get(f"{API}/me/care-team", headers=patient.headers,
                                        params=params), 200))


async def end_care(client: httpx.AsyncClient, patient: TestUser,
                   doctor_id: object) -> httpx.Response:
    return await client.delete(f"{API}/me/care-team/{doctor_id}", headers=patient.headers)


async def consultations_of(client: httpx.AsyncClient,
                           patient: TestUser) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in expect(await client.get(f"{API}/consultations",
                                                        headers=patient.headers), 200)}


async def my_patients(client: httpx.AsyncClient, doctor: TestUser) -> list[str]:
    return [p["id"] for p in expect(await client.get(f"{API}/patients",
                                                     headers=doctor.headers), 200)]


async def set_times(rt: Runtime, consultation_id: object, *, scheduled_ago: timedelta,
                    created_ago: timedelta) -> None:
    """Move a consultation's scheduled and creation times into the past."""
    now = utcnow()
    async with rt.unit_of_work() as session:
        await session.execute(update(Consultation).where(
            Consultation.id == uuid.UUID(str(consultation_id))).values(
            scheduled_at=now - scheduled_ago, created_at=now - created_ago))


async def cared_for(rt: Runtime, client: httpx.AsyncClient) -> tuple[TestUser, TestUser]:
    """A patient who shares their data, and a doctor they booked (scheduled)."""
    patient, doctor = await signed_in(rt, "patient"), await signed_in(rt, "doctor")
    await set_consent(client, patient, True)
    await book(client, patient, doctor)
    return patient, doctor


# Completion waits for the consultation's time.

async def test_a_future_consultation_cannot_be_completed_and_the_patient_can_still_cancel(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    """The finding: a doctor marked a future consultation `completed` at once, so that the
    relationship outlived the patient's cancel (a completed one cannot be cancelled)."""
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    await set_consent(client, patient, True)
    proposal = await propose(client, doctor, patient)
    await set_status(client, patient, proposal["id"], "scheduled")  # the patient accepts
    follow_up = await propose(client, doctor, patient)
    assert follow_up["status"] == "scheduled"
    for consultation in (proposal, follow_up):
        url = f"{API}/consultations/{consultation['id']}"
        expect(await client.patch(url, headers=doctor.headers, json={"status": "completed"}),
               409, "conflict")
        # Nor by moving it first: to a later time it is still ahead; into the past, even by
        # seconds (within the booking grace for clock skew), it cannot go.
        expect(await client.patch(url, headers=doctor.headers, json={
            "scheduled_at": LATER, "status": "completed"}), 409, "conflict")
        for ago in (timedelta(minutes=5), timedelta(seconds=20)):
            past = (utcnow() - ago).isoformat()
            for body in ({"scheduled_at": past}, {"scheduled_at": past, "status": "completed"}):
                expect(await client.patch(url, headers=doctor.headers, json=body), 422)
    unchanged = await consultations_of(client, patient)
    assert [(unchanged[c["id"]]["status"], unchanged[c["id"]]["scheduled_at"])
            for c in (proposal, follow_up)] == [
        ("scheduled", proposal["scheduled_at"]), ("scheduled", follow_up["scheduled_at"])]
    # The patient still cancels both, and the doctor's access ends with them.
    expect(await chart(client, doctor, patient), 200)
    for consultation in (proposal, follow_up):
        assert (await set_status(client, patient, consultation["id"], "cancelled"))[
            "status"] == "cancelled"
    expect(await chart(client, doctor, patient), 403, "no_care_relationship")
    assert (await propose(client, doctor, patient))["status"] == "proposed"


async def test_completing_after_the_scheduled_time_works(client: httpx.AsyncClient,
                                                         runtime: Runtime) -> None:
    patient, doctor = await cared_for(runtime, client)
    consultation = next(iter((await consultations_of(client, patient)).values()))
    await move_consultation(runtime, consultation["id"], ago=timedelta(seconds=1))
    done = await set_status(client, doctor, consultation["id"], "completed")
    assert done["status"] == "completed"
    # A completed consultation neither moves nor is cancelled.
    for user, body in ((patient, {"status": "cancelled"}), (doctor, {"scheduled_at": LATER})):
        expect(await client.patch(f"{API}/consultations/{consultation['id']}",
                                  headers=user.headers, json=body), 409, "conflict")
    expect(await chart(client, doctor, patient), 200)


# The window.

async def test_the_relationship_lapses_the_window_after_the_last_completed_consultation(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient, doctor = await cared_for(runtime, client)
    (consultation,) = (await consultations_of(client, patient)).values()
    await complete(runtime, client, doctor, consultation["id"], ago=timedelta(days=DAYS - 1))
    expect(await chart(client, doctor, patient), 200)
    assert str(patient.id) in await my_patients(client, doctor)
    (member,) = await care_team(client, patient)
    scheduled_at = when((await consultations_of(client, patient))[consultation["id"]][
        "scheduled_at"])
    assert (member["basis"], when(member["until"])) == (
        "completed", scheduled_at + timedelta(days=DAYS))
    # A day later (moved in the database) the window has passed.
    await move_consultation(runtime, consultation["id"], ago=timedelta(days=DAYS, seconds=1))
    expect(await chart(client, doctor, patient), 403, "no_care_relationship")
    expect(await client.post(f"{API}/patients/{patient.id}/records", headers=doctor.headers,
                             json={"diagnosis": "x", "prescriptions": [], "notes": "y"}),
           403, "no_care_relationship")
    assert str(patient.id) not in await my_patients(client, doctor)
    assert await care_team(client, patient) == []
    # The doctor needs a new consultation: theirs is only a proposal now.
    proposal = await propose(client, doctor, patient)
    assert proposal["status"] == "proposed"
    expect(await chart(client, doctor, patient), 403, "no_care_relationship")
    await set_status(client, patient, proposal["id"], "scheduled")
    expect(await chart(client, doctor, patient), 200)


async def test_a_scheduled_consultation_keeps_the_relationship(client: httpx.AsyncClient,
                                                               runtime: Runtime) -> None:
    patient, doctor = await cared_for(runtime, client)
    (old,) = (await consultations_of(client, patient)).values()
    await complete(runtime, client, doctor, old["id"], ago=timedelta(days=DAYS + 30))
    expect(await chart(client, doctor, patient), 403, "no_care_relationship")
    upcoming = await book(client, patient, doctor)
    expect(await chart(client, doctor, patient), 200)
    (member,) = await care_team(client, patient)
    assert (member["basis"], member["until"]) == ("scheduled", None)
    # Scheduled, even long past its time and never completed, it still keeps it (SPEC §7:
    # "while a consultation is scheduled"); the patient sees it and may end it.
    await move_consultation(runtime, upcoming["id"], ago=timedelta(days=2 * DAYS))
    expect(await chart(client, doctor, patient), 200)
    assert (await care_team(client, patient))[0]["basis"] == "scheduled"


async def test_the_window_is_the_setting(fresh_runtime: Any) -> None:
    rt: Runtime = await fresh_runtime(care_relationship_days=30)
    async with client_for(rt) as client:
        patient, doctor = await cared_for(rt, client)
        (consultation,) = (await consultations_of(client, patient)).values()
        await complete(rt, client, doctor, consultation["id"], ago=timedelta(days=29))
        expect(await chart(client, doctor, patient), 200)
        (member,) = await care_team(client, patient)
        scheduled_at = when((await consultations_of(client, patient))[consultation["id"]][
            "scheduled_at"])
        assert when(member["until"]) == scheduled_at + timedelta(days=30)
        await move_consultation(rt, consultation["id"], ago=timedelta(days=30, seconds=1))
        expect(await chart(client, doctor, patient), 403, "no_care_relationship")
        assert (await propose(client, doctor, patient))["status"] == "proposed"


@pytest.mark.parametrize("value", ["0", "3651", "a year"])
def test_the_window_setting_is_bounded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       value: str) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env file
    for name, key in generate_keys().items():
        monkeypatch.setenv(name, key)
    assert load_settings().care_relationship_days == 365
    monkeypatch.setenv("PHIVAULT_CARE_RELATIONSHIP_DAYS", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith("PHIVAULT_CARE_RELATIONSHIP_DAYS: ")


# The care team.

async def test_the_care_team_lists_the_doctors_who_can_read_now(client: httpx.AsyncClient,
                                                                runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient")
    await set_consent(client, patient, True)
    names = ("Ada Scheduled", "Bo Completed", "Cy Proposed", "Di Cancelled", "Ed Lapsed",
             "Fe Unbroken", "Gu Broken")
    doctors = {name.split()[1].lower(): await signed_in(
        runtime, "doctor", full_name=f"Dr {name}", specialty=f"{name.split()[1]} medicine")
        for name in names}
    scheduled = await book(client, patient, doctors["scheduled"])
    completed = await book(client, patient, doctors["completed"])
    await complete(runtime, client, doctors["completed"], completed["id"],
                   ago=timedelta(days=1))
    await propose(client, doctors["proposed"], patient)
    cancelled = await book(client, patient, doctors["cancelled"])
    await set_status(client, patient, cancelled["id"], "cancelled")
    lapsed = await book(client, patient, doctors["lapsed"])
    await complete(runtime, client, doctors["lapsed"], lapsed["id"], ago=timedelta(days=400))
    # Unbroken: completed 300 days ago (booked 310 days ago), and booked again since.
    first = await book(client, patient, doctors["unbroken"])
    await complete(runtime, client, doctors["unbroken"], first["id"])
    await set_times(runtime, first["id"], scheduled_ago=timedelta(days=300),
                    created_ago=timedelta(days=310))
    again = await book(client, patient, doctors["unbroken"])
    # Broken: the first lapsed (completed 400 days ago) before the second was booked.
    gone = await book(client, patient, doctors["broken"])
    await complete(runtime, client, doctors["broken"], gone["id"])
    await set_times(runtime, gone["id"], scheduled_ago=timedelta(days=400),
                    created_ago=timedelta(days=410))
    anew = await book(client, patient, doctors["broken"])

    mine = await consultations_of(client, patient)
    response = await client.get(f"{API}/me/care-team", headers=patient.headers)
    listed = expect(response, 200)
    assert response.headers["x-total-count"] == "4"
    assert response.headers["cache-control"] == "no-store"
    assert [m["full_name"] for m in listed] == [
        "Dr Ada Scheduled", "Dr Bo Completed", "Dr Fe Unbroken", "Dr Gu Broken"]
    by_name = {m["full_name"].split()[2].lower(): m for m in listed}
    assert set(listed[0]) == {"id", "full_name", "specialty", "since", "until", "basis"}
    assert by_name["scheduled"] == {
        "id": str(doctors["scheduled"].id), "full_name": "Dr Ada Scheduled",
        "specialty": "Scheduled medicine", "since": listed[0]["since"], "until": None,
        "basis": "scheduled"}
    assert when(by_name["scheduled"]["since"]) == when(scheduled["created_at"])
    done = mine[completed["id"]]
    assert (by_name["completed"]["basis"], when(by_name["completed"]["until"]),
            when(by_name["completed"]["since"])) == (
        "completed", when(done["scheduled_at"]) + timedelta(days=DAYS),
        when(done["created_at"]))
    assert (by_name["unbroken"]["basis"], by_name["unbroken"]["until"]) == ("scheduled", None)
    assert when(by_name["unbroken"]["since"]) == when(mine[first["id"]]["created_at"])
    assert when(by_name["broken"]["since"]) == when(mine[anew["id"]]["created_at"])
    assert when(mine[again["id"]]["created_at"]) > when(by_name["unbroken"]["since"])

    # Paged like every list.
    page = await client.get(f"{API}/me/care-team", headers=patient.headers,
                            params={"limit": 2, "offset": 1})
    assert [m["full_name"] for m in expect(page, 200)] == ["Dr Bo Completed", "Dr Fe Unbroken"]
    assert page.headers["x-total-count"] == "4"
    # Another patient's team is their own.
    assert await care_team(client, await signed_in(runtime, "patient")) == []
    found = await events_of(runtime, [response.headers["x-request-id"]])
    assert (Action.VIEW_CARE_TEAM, patient.id, patient.id, {"count": 4}) in [
        (e.action, e.actor_id, e.patient_id, e.event_metadata)
        for e in found[response.headers["x-request-id"]]]


# Ending one doctor's access.

async def test_ending_closes_the_chart_at_once_and_only_the_patient_restores_it(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    other = await signed_in(runtime, "doctor")
    await set_consent(client, patient, True)
    pending = await propose(client, doctor, patient)  # before any relationship: a proposal
    past = await book(client, patient, doctor)
    await complete(runtime, client, doctor, past["id"], ago=timedelta(days=1))
    upcoming = await book(client, patient, doctor)
    await book(client, patient, other)
    await write_record(client, doctor, patient.id)
    expect(await chart(client, doctor, patient), 200)

    ended = await end_care(client, patient, doctor.id)
    assert ended.status_code == 204 and ended.content == b""
    # At once: reads, writes and the patient list; the completed consultation counts no more.
    expect(await chart(client, doctor, patient), 403, "no_care_relationship")
    expect(await client.post(f"{API}/patients/{patient.id}/prescriptions",
                             headers=doctor.headers, json={
                                 "medication": "A", "dosage": "B", "instructions": "C"}),
           403, "no_care_relationship")
    assert str(patient.id) not in await my_patients(client, doctor)
    statuses = {k: c["status"] for k, c in (await consultations_of(client, patient)).items()}
    assert [statuses[c["id"]] for c in (pending, past, upcoming)] == [
        "cancelled", "completed", "cancelled"]
    # The other doctor keeps theirs; the ended one is off the team, and cannot be ended twice.
    assert [m["id"] for m in await care_team(client, patient)] == [str(other.id)]
    expect(await chart(client, other, patient), 200)
    expect(await end_care(client, patient, doctor.id), 404, "not_found")

    # The doctor cannot restore it: their consultation is only a proposal.
    proposal = await propose(client, doctor, patient)
    assert proposal["status"] == "proposed"
    expect(await chart(client, doctor, patient), 403, "no_care_relationship")
    # The patient accepting it restores it ...
    await set_status(client, patient, proposal["id"], "scheduled")
    expect(await chart(client, doctor, patient), 200)
    assert (await propose(client, doctor, patient))["status"] == "scheduled"
    # ... and so does a booking of the patient's, after another end.
    expect(await end_care(client, patient, doctor.id), 204)
    expect(await chart(client, doctor, patient), 403, "no_care_relationship")
    rebooked = await book(client, patient, doctor)
    expect(await chart(client, doctor, patient), 200)
    (member,) = [m for m in await care_team(client, patient) if m["id"] == str(doctor.id)]
    assert when(member["since"]) == when(rebooked["created_at"])

    found = await events_of(runtime, [ended.headers["x-request-id"]])
    events = [(e.action, e.outcome, e.actor_id, e.patient_id, e.resource_type, e.resource_id,
               e.event_metadata) for e in found[ended.headers["x-request-id"]]]
    assert (Action.DELETE_CARE_RELATIONSHIP, "success", patient.id, patient.id,
            "care_relationship", str(doctor.id), {"consultations_cancelled": 2}) in events
    cancelled = sorted(e[5] for e in events if e[0] == Action.UPDATE_CONSULTATION)
    assert cancelled == sorted([pending["id"], upcoming["id"]])
    assert all(e[6]["to"] == "cancelled" and e[6]["via"] == "care_team"
               for e in events if e[0] == Action.UPDATE_CONSULTATION)


async def test_a_lapsed_or_never_begun_relationship_cannot_be_ended(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient")
    proposer, lapsed = await signed_in(runtime, "doctor"), await signed_in(runtime, "doctor")
    await propose(client, proposer, patient)
    old = await book(client, patient, lapsed)
    await complete(runtime, client, lapsed, old["id"], ago=timedelta(days=DAYS + 1))
    admin = await signed_in(runtime, "admin")
    for target in (proposer.id, lapsed.id, uuid.uuid4(), patient.id, admin.id):
        expect(await end_care(client, patient, target), 404, "not_found")
    expect(await client.delete(f"{API}/me/care-team/not-a-uuid", headers=patient.headers), 422)


async def test_only_the_patient_ends_their_own_doctors_access(client: httpx.AsyncClient,
                                                              runtime: Runtime) -> None:
    patient, doctor = await cared_for(runtime, client)
    stranger = await signed_in(runtime, "patient")
    staff = [doctor, await signed_in(runtime, "admin"), await signed_in(runtime, "auditor")]
    refused = [await end_care(client, stranger, doctor.id)]
    expect(refused[0], 404, "not_found")  # the stranger has no such relationship
    for user in staff:
        for response in (await end_care(client, user, doctor.id),
                         await client.get(f"{API}/me/care-team", headers=user.headers)):
            expect(response, 403, "forbidden")
            refused.append(response)
    for response in (await client.delete(f"{API}/me/care-team/{doctor.id}"),
                     await client.get(f"{API}/me/care-team")):
        expect(response, 401, "unauthenticated")
    # Nothing changed for the patient.
    expect(await chart(client, doctor, patient), 200)
    assert [m["id"] for m in await care_team(client, patient)] == [str(doctor.id)]
    # Every refusal is audited, by whoever was refused.
    actors = [stranger] + [user for user in staff for _ in range(2)]
    found = await events_of(runtime, [r.headers["x-request-id"] for r in refused])
    missing = [(r.request.method, actor.role) for r, actor in zip(refused, actors, strict=True)
               if ("ACCESS_DENIED", "denied", actor.id) not in [
                   (e.action, e.outcome, e.actor_id) for e in found[r.headers["x-request-id"]]]]
    assert missing == []


def test_since_is_the_start_of_the_unbroken_run_that_reaches_now() -> None:
    """Spans are [made, lapses) per consultation (None: scheduled, open-ended)."""
    t = [datetime(2030, 1, day, tzinfo=utcnow().tzinfo) for day in range(1, 11)]
    assert _run_start([(t[0], t[2]), (t[1], t[4]), (t[3], None)]) == t[0]  # overlapping
    assert _run_start([(t[0], t[1]), (t[2], None)]) == t[2]  # a gap breaks the run
    assert _run_start([(t[5], None), (t[0], t[1]), (t[1], t[6])]) == t[0]  # touching, unsorted
    assert _run_start([(t[0], t[3]), (t[1], t[0]), (t[4], None)]) == t[4]  # an empty span
    assert _run_start([(t[3], t[1])]) == t[3]  # nothing but empty spans: the earliest made
