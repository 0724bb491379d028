"""`POST /consultations` checks the body against the caller's own model: a patient's 422 names
a patient's fields only, a doctor's a doctor's (the body does not say who sends it)."""

from __future__ import annotations

import uuid

import httpx

from phivault.runtime import Runtime
from tests.clinical.world import API, WHEN, expect
from tests.factories import signed_in

PATIENT_FIELDS = {"doctor_id", "scheduled_at", "reason"}
DOCTOR_FIELDS = {"patient_id", "scheduled_at", "reason"}


def _named(body: dict[str, object]) -> set[str]:
    fields = body["fields"]
    assert isinstance(fields, list) and fields
    names = set()
    for problem in fields:
        path = problem["field"].split(".")
        assert path[0] == "body", problem
        names.add(path[1] if len(path) > 1 else "")
    return names


async def test_a_patients_bad_booking_names_only_the_patients_fields(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient")
    for body in ({"doctor_id": "not-a-uuid", "scheduled_at": WHEN, "reason": "Cough"},
                 {"scheduled_at": "tomorrow", "reason": ""},
                 {}):
        answer = expect(await client.post(f"{API}/consultations", headers=patient.headers,
                                          json=body), 422, "validation_error")
        assert _named(answer) <= PATIENT_FIELDS, answer["fields"]
    missing = expect(await client.post(f"{API}/consultations", headers=patient.headers,
                                       json={}), 422)
    assert _named(missing) == PATIENT_FIELDS


async def test_a_patient_sending_the_doctors_form_is_told_the_patients_fields(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient")
    answer = expect(await client.post(f"{API}/consultations", headers=patient.headers, json={
        "patient_id": str(uuid.uuid4()), "scheduled_at": WHEN, "reason": "Cough"}), 422)
    # The doctor_id it lacks, and the patient_id that is no field of a patient's booking.
    assert {p["field"] for p in answer["fields"]} == {"body.doctor_id", "body.patient_id"}


async def test_a_doctors_bad_proposal_names_only_the_doctors_fields(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    doctor = await signed_in(runtime, "doctor")
    answer = expect(await client.post(f"{API}/consultations", headers=doctor.headers,
                                      json={"reason": "x" * 2001}), 422)
    assert _named(answer) == DOCTOR_FIELDS


async def test_a_booking_body_that_is_not_an_object_is_refused(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient")
    for body in ([], "text", 1):
        expect(await client.post(f"{API}/consultations", headers=patient.headers, json=body),
               422, "validation_error")
    malformed = await client.post(f"{API}/consultations", headers={
        **patient.headers, "content-type": "application/json"}, content=b"{")
    expect(malformed, 400, "malformed_json")
    booked = expect(await client.post(f"{API}/consultations", headers=patient.headers, json={
        "doctor_id": str((await signed_in(runtime, "doctor")).id), "scheduled_at": WHEN,
        "reason": "Cough"}), 201)
    assert booked["status"] == "scheduled"
