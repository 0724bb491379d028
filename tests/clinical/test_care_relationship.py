"""The care relationship, consent and break-glass (SPEC §7) as flows over time: a doctor can
never grant themselves access; acceptance, cancellation, completion and consent changes take
effect at once; break-glass reads for 60 minutes and never writes. Also records' versions."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import httpx
import pytest

from phivault.db.base import utcnow
from phivault.runtime import Runtime
from tests.clinical.world import (
    API,
    WHEN,
    book,
    break_glass,
    events_of,
    expect,
    expire_break_glass,
    file_of,
    move_consultation,
    prescribe,
    propose,
    set_consent,
    set_status,
    upload,
    write_record,
)
from tests.factories import TestUser, signed_in

RECORD = {"diagnosis": "Iron deficiency anaemia", "prescriptions": ["Ferrous sulfate"],
          "notes": "Recheck ferritin in 3 months"}


async def read_records(client: httpx.AsyncClient, user: TestUser,
                       patient: TestUser) -> httpx.Response:
    return await client.get(f"{API}/patients/{patient.id}/records", headers=user.headers)


async def my_patients(client: httpx.AsyncClient, doctor: TestUser) -> list[str]:
    return [p["id"] for p in expect(await client.get(f"{API}/patients",
                                                     headers=doctor.headers), 200)]


async def test_a_proposal_grants_nothing_until_the_patient_accepts(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    await set_consent(client, patient, True)
    proposal = await propose(client, doctor, patient)
    assert proposal["status"] == "proposed"
    assert proposal["patient_id"] == str(patient.id) and proposal["doctor_id"] == str(doctor.id)
    # A second proposal is no more than the first.
    assert (await propose(client, doctor, patient))["status"] == "proposed"
    expect(await read_records(client, doctor, patient), 403, "no_care_relationship")
    expect(await client.post(f"{API}/patients/{patient.id}/records", headers=doctor.headers,
                             json=RECORD), 403, "no_care_relationship")
    assert str(patient.id) not in await my_patients(client, doctor)
    # The doctor cannot accept their own proposal.
    expect(await client.patch(f"{API}/consultations/{proposal['id']}", headers=doctor.headers,
                              json={"status": "scheduled"}), 403, "forbidden")
    expect(await client.patch(f"{API}/consultations/{proposal['id']}", headers=doctor.headers,
                              json={"status": "completed"}), 409, "conflict")
    expect(await read_records(client, doctor, patient), 403, "no_care_relationship")
    # The patient was told, and accepts.
    notices = expect(await client.get(f"{API}/me/notifications", headers=patient.headers), 200)
    assert [n["kind"] for n in notices].count("consultation_proposed") == 2
    assert (await set_status(client, patient, proposal["id"], "scheduled"))["status"] == \
        "scheduled"
    record = await write_record(client, doctor, patient.id)
    assert [r["id"] for r in expect(await read_records(client, doctor, patient), 200)] == [
        record["id"]]
    assert await my_patients(client, doctor) == [str(patient.id)]
    # From now on the doctor's follow-ups are scheduled at once.
    assert (await propose(client, doctor, patient))["status"] == "scheduled"


async def test_the_patient_list_shows_name_and_birth_year_of_cared_for_patients_only(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    doctor = await signed_in(runtime, "doctor")
    email = f"ada.{uuid.uuid4().hex[:8]}@clinic.example"
    registered = expect(await client.post(f"{API}/auth/register", json={
        "email": email, "password": "correct horse battery staple 42",
        "full_name": "Ada Lovelace", "birth_date": "1985-12-10"}), 201)
    tokens = expect(await client.post(f"{API}/auth/login", json={
        "email": email, "password": "correct horse battery staple 42"}), 200)
    ada = TestUser(uuid.UUID(registered["id"]), email, "", "patient", tokens["access_token"])
    proposed_only = await signed_in(runtime, "patient")
    await propose(client, doctor, proposed_only)
    await book(client, ada, doctor)
    listing = await client.get(f"{API}/patients", headers=doctor.headers)
    assert expect(listing, 200) == [{"id": str(ada.id), "full_name": "Ada Lovelace",
                                     "birth_year": 1985}]
    assert listing.headers["x-total-count"] == "1"


@pytest.mark.parametrize("who", ["patient", "doctor"])
async def test_either_party_may_cancel_and_that_ends_the_relationship(
        client: httpx.AsyncClient, runtime: Runtime, who: str) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    await set_consent(client, patient, True)
    consultation = await book(client, patient, doctor)
    expect(await read_records(client, doctor, patient), 200)
    canceller = patient if who == "patient" else doctor
    assert (await set_status(client, canceller, consultation["id"], "cancelled"))["status"] == \
        "cancelled"
    expect(await read_records(client, doctor, patient), 403, "no_care_relationship")
    # A cancelled consultation stays cancelled.
    for user, status in ((patient, "scheduled"), (doctor, "completed")):
        expect(await client.patch(f"{API}/consultations/{consultation['id']}",
                                  headers=user.headers, json={"status": status}), 409)
    expect(await client.patch(f"{API}/consultations/{consultation['id']}",
                              headers=patient.headers, json={"scheduled_at": WHEN}), 409)
    # And the doctor's next consultation is only a proposal again.
    assert (await propose(client, doctor, patient))["status"] == "proposed"


async def test_completion_is_the_doctors_and_keeps_the_relationship(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    await set_consent(client, patient, True)
    consultation = await book(client, patient, doctor)
    url = f"{API}/consultations/{consultation['id']}"
    expect(await client.patch(url, headers=patient.headers, json={"status": "completed"}), 403,
           "forbidden")
    expect(await client.patch(url, headers=patient.headers, json={"notes": "I feel fine"}), 403,
           "forbidden")
    expect(await client.patch(url, headers=patient.headers, json={}), 422)
    # Not before its time (SPEC §7): completed at once, it would outlive the patient's cancel.
    expect(await client.patch(url, headers=doctor.headers, json={"status": "completed"}), 409,
           "conflict")
    await move_consultation(runtime, consultation["id"])  # its time has come
    done = expect(await client.patch(url, headers=doctor.headers, json={
        "status": "completed", "notes": "Responded well"}), 200)
    assert (done["status"], done["notes"]) == ("completed", "Responded well")
    expect(await read_records(client, doctor, patient), 200)
    await write_record(client, doctor, patient.id)
    mine = expect(await client.get(f"{API}/consultations", headers=patient.headers), 200)
    assert [(c["id"], c["notes"]) for c in mine] == [(consultation["id"], "Responded well")]


async def test_consent_gates_the_chart_at_once(client: httpx.AsyncClient,
                                               runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    await book(client, patient, doctor)
    # A new account has not consented to data sharing.
    expect(await read_records(client, doctor, patient), 403, "no_consent")
    await set_consent(client, patient, True)
    await write_record(client, doctor, patient.id)
    await prescribe(client, doctor, patient.id)
    await set_consent(client, patient, False)
    for response in (await read_records(client, doctor, patient),
                     await client.get(f"{API}/patients/{patient.id}/prescriptions",
                                      headers=doctor.headers),
                     await upload(client, doctor, patient.id, file_of("image/png", 50))):
        expect(response, 403, "no_consent")
    # The patient still reads everything.
    assert len(expect(await read_records(client, patient, patient), 200)) == 1
    await set_consent(client, patient, True)
    expect(await read_records(client, doctor, patient), 200)
    history = expect(await client.get(f"{API}/me/consents/history", headers=patient.headers),
                     200)
    assert [h["data_sharing"] for h in history] == [False, True, False, True]


async def test_break_glass_reads_for_an_hour_and_never_writes(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient")
    carer, rescuer = await signed_in(runtime, "doctor"), await signed_in(runtime, "doctor")
    await set_consent(client, patient, True)
    await book(client, patient, carer)
    record = await write_record(client, carer, patient.id)
    await prescribe(client, carer, patient.id)
    attachment = expect(await upload(client, patient, patient.id, file_of("image/png", 90)),
                        201)
    await set_consent(client, patient, False)  # break-glass works whatever the consent

    before = utcnow()
    answer = expect(await break_glass(client, rescuer, patient.id), 201)
    expires = datetime.fromisoformat(answer["expires_at"])
    assert timedelta(minutes=59) < expires - before <= timedelta(minutes=60, seconds=5)
    reads = [f"{API}/patients/{patient.id}/records", f"{API}/records/{record['id']}",
             f"{API}/records/{record['id']}/versions",
             f"{API}/patients/{patient.id}/prescriptions",
             f"{API}/patients/{patient.id}/attachments", f"{API}/attachments/{attachment['id']}"]
    for url in reads:
        assert (await client.get(url, headers=rescuer.headers)).status_code == 200, url
    # Never a write.
    for response in (
            await client.post(f"{API}/patients/{patient.id}/records", headers=rescuer.headers,
                              json=RECORD),
            await client.patch(f"{API}/records/{record['id']}", headers=rescuer.headers,
                               json={"notes": "x"}),
            await client.post(f"{API}/patients/{patient.id}/prescriptions",
                              headers=rescuer.headers, json={
                                  "medication": "A", "dosage": "B", "instructions": "C"}),
            await upload(client, rescuer, patient.id, file_of("image/png", 90))):
        expect(response, 403, "no_care_relationship")
    # No care relationship came of it, and the patient was told.
    assert str(patient.id) not in await my_patients(client, rescuer)
    kinds = [n["kind"] for n in expect(await client.get(f"{API}/me/notifications",
                                                        headers=patient.headers), 200)]
    assert kinds == ["break_glass"]
    # After 60 minutes it is over.
    await expire_break_glass(runtime, rescuer.id, patient.id)
    for url in reads:
        expect(await client.get(url, headers=rescuer.headers), 403, "no_care_relationship")


async def test_break_glass_needs_a_reason_and_a_patient(client: httpx.AsyncClient,
                                                        runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    url = f"{API}/patients/{patient.id}/break-glass"
    for reason in ("urgent", " " * 30, "x" * 19, "   nineteen chars!!   "):
        expect(await client.post(url, headers=doctor.headers, json={"reason": reason}), 422)
    expect(await client.post(url, headers=doctor.headers, json={}), 422)
    for target in (uuid.uuid4(), doctor.id):
        expect(await break_glass(client, doctor, target), 404, "not_found")
    expect(await read_records(client, doctor, patient), 403, "no_care_relationship")


async def test_booking_bodies(client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    admin = await signed_in(runtime, "admin")
    url = f"{API}/consultations"

    def body(**fields: object) -> dict[str, object]:
        return {"scheduled_at": WHEN, "reason": "Check-up", **fields}

    for target in (uuid.uuid4(), admin.id, patient.id):
        expect(await client.post(url, headers=patient.headers,
                                 json=body(doctor_id=str(target))), 404, "not_found")
    for target in (uuid.uuid4(), doctor.id):
        expect(await client.post(url, headers=doctor.headers,
                                 json=body(patient_id=str(target))), 404, "not_found")
    wrong_shape = [
        (patient, body(patient_id=str(patient.id))),
        (doctor, body(doctor_id=str(doctor.id))),
        (patient, body(doctor_id=str(doctor.id), scheduled_at="2031-05-04T10:00:00")),
        (patient, body(doctor_id=str(doctor.id), reason="")),
        (patient, body(doctor_id=str(doctor.id), status="scheduled")),
        (patient, {"doctor_id": str(doctor.id), "scheduled_at": WHEN}),
    ]
    for user, sent in wrong_shape:
        assert (await client.post(url, headers=user.headers, json=sent)).status_code == 422, sent
    assert expect(await client.get(url, headers=patient.headers), 200) == []


async def test_records_are_versioned_never_overwritten(client: httpx.AsyncClient,
                                                       runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    await set_consent(client, patient, True)
    await book(client, patient, doctor)
    first = expect(await client.post(f"{API}/patients/{patient.id}/records",
                                     headers=doctor.headers, json=RECORD), 201)
    assert first["version"] == 1 and first["author_id"] == str(doctor.id)
    url = f"{API}/records/{first['id']}"
    expect(await client.patch(url, headers=doctor.headers, json={}), 422)
    expect(await client.patch(url, headers=patient.headers, json={"notes": "mine"}), 403,
           "forbidden")
    second = expect(await client.patch(url, headers=doctor.headers,
                                       json={"diagnosis": "Anaemia of chronic disease"}), 200)
    assert second["version"] == 2 and second["prescriptions"] == RECORD["prescriptions"]
    assert second["notes"] == RECORD["notes"]  # fields not sent carry over
    latest = expect(await client.get(url, headers=patient.headers), 200)
    assert (latest["version"], latest["diagnosis"]) == (2, "Anaemia of chronic disease")
    versions = expect(await client.get(url + "/versions", headers=patient.headers), 200)
    assert [(v["version"], v["diagnosis"]) for v in versions] == [
        (1, RECORD["diagnosis"]), (2, "Anaemia of chronic disease")]
    listing = expect(await read_records(client, patient, patient), 200)
    assert [(r["id"], r["version"]) for r in listing] == [(first["id"], 2)]


async def test_lists_are_paged(client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    await set_consent(client, patient, True)
    await book(client, patient, doctor)
    made = [(await write_record(client, doctor, patient.id, f"Finding {i}"))["id"]
            for i in range(3)]
    page = await client.get(f"{API}/patients/{patient.id}/records?limit=2&offset=1",
                            headers=patient.headers)
    assert page.headers["x-total-count"] == "3"
    assert len(expect(page, 200)) == 2
    everything = expect(await client.get(f"{API}/patients/{patient.id}/records?limit=500",
                                         headers=patient.headers), 200)
    assert sorted(r["id"] for r in everything) == sorted(made)
    for query in ("limit=0", "limit=501", "offset=-1", "limit=abc"):
        expect(await client.get(f"{API}/patients/{patient.id}/records?{query}",
                                headers=patient.headers), 422)


async def test_unknown_ids_are_not_found(client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    nobody = uuid.uuid4()
    for user in (patient, doctor):
        for url in (f"{API}/patients/{nobody}/records", f"{API}/records/{nobody}",
                    f"{API}/records/{nobody}/versions", f"{API}/patients/{nobody}/prescriptions",
                    f"{API}/patients/{nobody}/attachments", f"{API}/attachments/{nobody}"):
            expect(await client.get(url, headers=user.headers), 404, "not_found")
        expect(await client.patch(f"{API}/consultations/{nobody}", headers=user.headers,
                                  json={"status": "cancelled"}), 404, "not_found")
    # A doctor's id is no patient's.
    colleague = await signed_in(runtime, "doctor")
    expect(await client.get(f"{API}/patients/{colleague.id}/records", headers=doctor.headers),
           404, "not_found")
    expect(await client.get(f"{API}/patients/not-a-uuid/records", headers=doctor.headers), 422)


async def test_a_disabled_doctor_cannot_be_booked(client: httpx.AsyncClient,
                                                  runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    admin = await signed_in(runtime, "admin")
    expect(await client.patch(f"{API}/users/{doctor.id}", headers=admin.headers,
                              json={"status": "disabled"}), 200)
    expect(await client.post(f"{API}/consultations", headers=patient.headers, json={
        "doctor_id": str(doctor.id), "scheduled_at": WHEN, "reason": "Check-up"}),
        404, "not_found")


async def test_refusals_inside_a_consultation_are_audited(client: httpx.AsyncClient,
                                                          runtime: Runtime) -> None:
    """SPEC §7: every denial writes an ACCESS_DENIED event, also a party's refused change."""
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    consultation = await book(client, patient, doctor)
    proposal = await propose(client, await signed_in(runtime, "doctor"), patient)
    refused = [
        await client.patch(f"{API}/consultations/{consultation['id']}", headers=patient.headers,
                           json={"notes": "I wrote this myself"}),
        await client.patch(f"{API}/consultations/{consultation['id']}", headers=patient.headers,
                           json={"status": "completed"}),
        await client.patch(f"{API}/consultations/{proposal['id']}", headers=doctor.headers,
                           json={"status": "cancelled"}),
    ]
    assert [r.status_code for r in refused] == [403, 403, 404]
    found = await events_of(runtime, [r.headers["x-request-id"] for r in refused])
    actors = [patient, patient, doctor]
    labels = ["patient writes notes (403)", "patient completes (403)",
              "doctor cancels another doctor's consultation (404)"]
    missing = [label for label, r, actor in zip(labels, refused, actors, strict=True)
               if ("ACCESS_DENIED", "denied", actor.id) not in
               [(e.action, e.outcome, e.actor_id) for e in found[r.headers["x-request-id"]]]]
    assert missing == []
