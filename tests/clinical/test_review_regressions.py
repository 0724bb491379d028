"""Cases a security review found: each was a defect, each stays fixed."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.runtime import Runtime
from tests.clinical.world import API, WHEN, book, expect, file_of, upload
from tests.factories import signed_in


@pytest.mark.parametrize("filename", ["résumé.pdf", "€.pdf", "日本.pdf"])
async def test_unicode_filenames_round_trip(client: httpx.AsyncClient, runtime: Runtime,
                                            filename: str) -> None:
    patient = await signed_in(runtime, "patient")
    response = await upload(client, patient, patient.id, file_of("application/pdf", 100),
                            filename=filename, content_type="application/pdf")
    assert expect(response, 201)["filename"] == filename


@pytest.mark.parametrize("when", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00",
                                  "1899-12-31T23:00:00+00:00"])
async def test_extreme_dates_are_422(client: httpx.AsyncClient, runtime: Runtime,
                                     when: str) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    response = await client.post(f"{API}/consultations", headers=patient.headers, json={
        "doctor_id": str(doctor.id), "scheduled_at": when, "reason": "check-up"})
    expect(response, 422, "validation_error")


@pytest.mark.parametrize("reference", [
    "4111.1111.1111.1111", "4111_1111_1111_1111", "4111:1111:1111:1111",
    "card:4111.1111.1111.1111:exp:12.30", "4111/1111/1111/1111"])
async def test_card_numbers_with_any_separator_are_refused(
        client: httpx.AsyncClient, runtime: Runtime, reference: str) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    consultation = await book(client, patient, doctor)
    response = await client.post(f"{API}/consultations/{consultation['id']}/payments",
                                 headers=patient.headers, json={
                                     "amount": 100, "currency": "EUR",
                                     "provider_reference": reference.replace("/", "-")})
    expect(response, 422)
    assert reference not in response.text


async def test_consent_versions_are_numbered_not_clocked(client: httpx.AsyncClient,
                                                         runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient")
    choices = [{"marketing": False, "data_sharing": bool(i % 2), "analytics": False}
               for i in range(6)]
    for choice in choices:
        expect(await client.put(f"{API}/me/consents", headers=patient.headers, json=choice), 200)
    current = expect(await client.get(f"{API}/me/consents", headers=patient.headers), 200)
    assert current["data_sharing"] is choices[-1]["data_sharing"]  # the last change wins
    history = expect(await client.get(f"{API}/me/consents/history",
                                      headers=patient.headers), 200)
    assert [h["data_sharing"] for h in history] == [False] + [bool(i % 2) for i in range(6)]


async def test_each_listed_patient_sees_the_list_read(client: httpx.AsyncClient,
                                                      runtime: Runtime) -> None:
    doctor = await signed_in(runtime, "doctor")
    patients = [await signed_in(runtime, "patient") for _ in range(2)]
    for patient in patients:
        await book(client, patient, doctor)
    response = await client.get(f"{API}/patients", headers=doctor.headers)
    expect(response, 200)
    async with runtime.sessions() as session:
        seen = set((await session.execute(select(AuditEvent.patient_id).where(
            AuditEvent.request_id == response.headers["x-request-id"],
            AuditEvent.action == "VIEW_PATIENT_LIST"))).scalars())
    assert {p.id for p in patients} <= seen


async def test_probing_unknown_ids_is_audited(client: httpx.AsyncClient,
                                              runtime: Runtime) -> None:
    doctor, patient = await signed_in(runtime, "doctor"), await signed_in(runtime, "patient")
    probes = [
        await client.post(f"{API}/consultations", headers=doctor.headers, json={
            "patient_id": str(uuid.uuid4()), "scheduled_at": WHEN, "reason": "probe"}),
        await client.post(f"{API}/consultations", headers=patient.headers, json={
            "doctor_id": str(patient.id), "scheduled_at": WHEN, "reason": "probe"}),
    ]
    async with runtime.sessions() as session:
        for response in probes:
            expect(response, 404, "not_found")
            actions = (await session.execute(select(AuditEvent.action).where(
                AuditEvent.request_id == response.headers["x-request-id"]))).scalars().all()
            assert actions == ["ACCESS_DENIED"]


async def test_a_setup_token_is_redeemed_once_under_concurrency(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    admin = await signed_in(runtime, "admin")
    created = expect(await client.post(f"{API}/users", headers=admin.headers, json={
        "email": f"doc.{uuid.uuid4().hex[:8]}@clinic.example", "full_name": "Dr Race",
        "role": "doctor"}), 201)
    answers = await asyncio.gather(*(client.post(f"{API}/auth/setup", json={
        "setup_token": created["setup_token"], "password": f"a concurrent passphrase {i}"})
        for i in range(4)))
    assert sorted(a.status_code for a in answers) == [204, 401, 401, 401]
