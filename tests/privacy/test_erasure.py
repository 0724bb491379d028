"""Erasure (SPEC §9, GDPR article 17): identity destroyed down to the raw storage, medical
history kept under the pseudonymous id, the authoring doctor's read access kept and nobody
else's; idempotent; the email free again; a live token dead at once."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.auth.models import AuthSession, User
from phivault.auth.schemas import ProfileRectification
from phivault.clinical import consultations
from phivault.clinical.models import Consultation, Notification, PatientProfile
from phivault.clinical.schemas import PatientBooking
from phivault.errors import InvalidToken
from phivault.keys.models import DataKeyRow
from phivault.privacy import consents, rectification
from phivault.privacy import erasure as erasure_service
from phivault.privacy.consents import ConsentChoice
from phivault.privacy.models import Consent
from phivault.runtime import Runtime
from tests.clinical.test_phi_at_rest import encodings
from tests.clinical.world import (
    API,
    BREAK_GLASS_REASON,
    book,
    break_glass,
    expect,
    prescribe,
    upload,
    write_record,
)
from tests.factories import PASSWORD, TestUser, new_email, signed_in
from tests.helpers import cli_env, run_cli
from tests.storage import raw_storage

IDENTITY = {
    "full_name": "Ottilie Quarrington",
    "phone": "+44 20 7946 3141",
    "address": "9 Wrenfield Close, Harrogate HG1 2AB",
    "birth_date": "1958-11-30",
}


async def register(client: httpx.AsyncClient, email: str) -> TestUser:
    created = expect(await client.post(f"{API}/auth/register", json={
        "email": email, "password": PASSWORD, **IDENTITY, "sex": "female",
        "consents": {"marketing": True, "data_sharing": True, "analytics": True}}), 201)
    tokens = expect(await client.post(f"{API}/auth/login", json={
        "email": email, "password": PASSWORD}), 200)
    return TestUser(uuid.UUID(created["id"]), email, PASSWORD, "patient",
                    tokens["access_token"], tokens["refresh_token"])


async def erase(client: httpx.AsyncClient, patient: TestUser,
                password: str = PASSWORD) -> httpx.Response:
    return await client.request("DELETE", f"{API}/me", headers=patient.headers,
                                json={"password": password})


async def test_erasure_keeps_history_for_its_author_and_destroys_identity(
        runtime: Runtime, client: httpx.AsyncClient, tmp_path: Path) -> None:
    email = new_email("ottilie")
    patient = await register(client, email)
    author, colleague, stranger = [await signed_in(runtime, "doctor") for _ in range(3)]
    await book(client, patient, author)
    await book(client, patient, colleague)
    own = await write_record(client, author, patient.id, diagnosis="Atrial fibrillation")
    other = await write_record(client, colleague, patient.id, diagnosis="Osteopenia")
    own_rx = await prescribe(client, author, patient.id)
    await prescribe(client, colleague, patient.id)
    expect(await upload(client, patient, patient.id, b"%PDF-1.7\n" + b"x" * 64,
                        filename="ottilie-quarrington-ecg.pdf",
                        content_type="application/pdf"), 201)
    expect(await break_glass(client, stranger, patient.id), 201)  # a notification
    async with runtime.sessions() as session:
        user = await session.get(User, patient.id)
        assert user is not None and user.email_index is not None
        blind_index, account_key = user.email_index, user.data_key_id
        profile = await session.get(PatientProfile, patient.id)
        assert profile is not None
        profile_key = profile.data_key_id

    # The password again, or nothing happens.
    expect(await erase(client, patient, "not the password at all"), 401, "invalid_credentials")
    expect(await client.get(f"{API}/me", headers=patient.headers), 200)
    expect(await erase(client, patient), 204)

    # Every token of the account is dead at once: the access token and the refresh token.
    expect(await client.get(f"{API}/me", headers=patient.headers), 401, "invalid_token")
    expect(await client.post(f"{API}/auth/refresh",
                             json={"refresh_token": patient.refresh_token}), 401)
    expect(await client.post(f"{API}/auth/login", json={"email": email, "password": PASSWORD}),
           401, "invalid_credentials")

    # The authoring doctor reads what they wrote, and only that.
    expect(await client.get(f"{API}/records/{own['id']}", headers=author.headers), 200)
    expect(await client.get(f"{API}/records/{own['id']}/versions", headers=author.headers), 200)
    listed = expect(await client.get(f"{API}/patients/{patient.id}/records",
                                     headers=author.headers), 200)
    assert [r["id"] for r in listed] == [own["id"]]
    scripts = expect(await client.get(f"{API}/patients/{patient.id}/prescriptions",
                                      headers=author.headers), 200)
    assert [p["id"] for p in scripts] == [own_rx["id"]]
    expect(await client.get(f"{API}/records/{other['id']}", headers=author.headers), 403,
           "no_care_relationship")
    expect(await client.get(f"{API}/patients/{patient.id}/attachments",
                            headers=author.headers), 403, "no_care_relationship")
    expect(await client.patch(f"{API}/records/{own['id']}", headers=author.headers,
                              json={"notes": "more"}), 403, "no_care_relationship")
    expect(await client.post(f"{API}/patients/{patient.id}/records", headers=author.headers,
                             json={"diagnosis": "x", "prescriptions": [], "notes": "y"}),
           403, "no_care_relationship")
    # ... and sees no identity: the patient list gives the pseudonymous id alone.
    patients = expect(await client.get(f"{API}/patients", headers=author.headers), 200)
    assert {"id": str(patient.id), "full_name": None, "birth_year": None} in patients
    assert expect(await client.get(f"{API}/consultations", headers=author.headers), 200) == []

    # Another doctor reads nothing, break-glass included; the colleague keeps their own.
    expect(await client.get(f"{API}/records/{own['id']}", headers=stranger.headers), 403,
           "no_care_relationship")
    expect(await client.get(f"{API}/patients/{patient.id}/records", headers=stranger.headers),
           403, "no_care_relationship")
    expect(await client.post(f"{API}/patients/{patient.id}/break-glass",
                             headers=stranger.headers, json={"reason": BREAK_GLASS_REASON}),
           403, "no_care_relationship")
    expect(await client.get(f"{API}/records/{own['id']}", headers=colleague.headers), 403)
    expect(await client.get(f"{API}/records/{other['id']}", headers=colleague.headers), 200)
    expect(await client.post(f"{API}/consultations", headers=stranger.headers, json={
        "patient_id": str(patient.id), "scheduled_at": "2031-05-04T10:00:00+00:00",
        "reason": "Follow-up"}), 404, "not_found")

    # An admin sees the account as deleted, without an email, and cannot bring it back.
    admin = await signed_in(runtime, "admin")
    expect(await client.patch(f"{API}/users/{patient.id}", headers=admin.headers,
                              json={"status": "active"}), 409, "conflict")
    first = await client.get(f"{API}/users", headers=admin.headers, params={"limit": 1})
    newest = max(0, int(first.headers["x-total-count"]) - 50)  # users are listed oldest first
    listed_users = expect(await client.get(f"{API}/users", headers=admin.headers,
                                           params={"limit": 500, "offset": newest}), 200)
    assert {"id": str(patient.id), "email": None, "role": "patient", "status": "deleted"} in [
        {k: u[k] for k in ("id", "email", "role", "status")} for u in listed_users]

    # The stored account: deleted, no identity, its keys destroyed, history kept.
    async with runtime.sessions() as session:
        user = await session.get(User, patient.id)
        assert user is not None and user.status == "deleted" and user.deleted_at is not None
        assert (user.email, user.email_index, user.password_hash, user.totp_secret) == (
            None, None, None, None)
        profile = await session.get(PatientProfile, patient.id)
        assert profile is not None
        assert (profile.full_name, profile.phone, profile.address) == (None, None, None)
        assert profile.data_key_id != profile_key
        gone = (await session.execute(select(DataKeyRow.id).where(
            DataKeyRow.id.in_([account_key, profile_key])))).scalars().all()
        assert gone == []
        assert (await session.execute(select(Notification).where(
            Notification.user_id == patient.id))).first() is None
        latest = (await session.execute(select(Consent).where(Consent.patient_id == patient.id)
                                        .order_by(Consent.version.desc()))).scalars().all()
        assert (latest[0].marketing, latest[0].data_sharing, latest[0].analytics) == (
            False, False, False)
        assert latest[-1].analytics  # the history stays: proof of what was consented before
        live = (await session.execute(select(AuthSession).where(
            AuthSession.user_id == patient.id, AuthSession.revoked_at.is_(None)))).first()
        assert live is None
        assert all(s.ip is None and s.user_agent is None for s in (await session.execute(
            select(AuthSession).where(AuthSession.user_id == patient.id))).scalars())
        statuses = (await session.execute(select(Consultation.status).where(
            Consultation.patient_id == patient.id))).scalars().all()
        assert statuses and set(statuses) == {"cancelled"}  # both were in the future
        erased = (await session.execute(select(AuditEvent).where(
            AuditEvent.action == "ACCOUNT_ERASED",
            AuditEvent.patient_id == patient.id))).scalars().all()
        assert len(erased) == 1 and erased[0].actor_id == patient.id
        assert erased[0].event_metadata["already_erased"] is False

    # The raw storage holds none of the identity, not even the email's blind index.
    storage = await raw_storage(runtime, tmp_path)
    for secret in [email, *IDENTITY.values(), "ottilie-quarrington-ecg"]:
        assert not any(form in storage for form in encodings(secret)), secret
    assert blind_index not in storage and blind_index.hex().encode() not in storage


async def test_erasing_twice_is_fine_and_the_email_registers_again(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    email = new_email("twice")
    patient = await register(client, email)
    env = cli_env(runtime)
    first = run_cli("gdpr", "erase", str(patient.id), env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"patient {patient.id} erased: 1 sessions ended")
    again = run_cli("gdpr", "erase", str(patient.id), env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"patient {patient.id} was already erased; nothing more to do"
    expect(await client.get(f"{API}/me", headers=patient.headers), 401, "invalid_token")

    newcomer = await register(client, email)  # the same email: a new person
    assert newcomer.id != patient.id
    expect(await client.get(f"{API}/me", headers=newcomer.headers), 200)
    async with runtime.sessions() as session:
        events = (await session.execute(select(AuditEvent.event_metadata).where(
            AuditEvent.action == "ACCOUNT_ERASED", AuditEvent.patient_id == patient.id)
            .order_by(AuditEvent.seq))).scalars().all()
        versions = (await session.execute(select(Consent.version).where(
            Consent.patient_id == patient.id))).scalars().all()
    assert [e["already_erased"] for e in events] == [False, True]
    assert sorted(versions) == [1, 2]  # the second run withdrew nothing more


async def test_only_a_patient_can_be_erased(runtime: Runtime, client: httpx.AsyncClient) -> None:
    doctor = await signed_in(runtime, "doctor")
    env = cli_env(runtime)
    refused = run_cli("gdpr", "erase", str(doctor.id), env=env)
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("phivault: Only a patient account can be erased; disable "
                                      "a staff account instead.")
    unknown = run_cli("gdpr", "erase", str(uuid.uuid4()), env=env)
    assert (unknown.returncode, unknown.stderr.strip()) == (1, "phivault: no such user")
    bad = run_cli("gdpr", "erase", "not-an-id", env=env)
    assert bad.returncode == 2
    # Over the API, erasure is the patient's own: other roles are refused.
    expect(await erase(client, doctor), 403, "forbidden")
    expect(await client.get(f"{API}/me", headers=doctor.headers), 200)


async def test_erasure_refuses_a_careless_body(runtime: Runtime,
                                               client: httpx.AsyncClient) -> None:
    patient = await register(client, new_email("careless"))
    for body in [{}, {"password": PASSWORD, "confirm": True}, {"password": 12345},
                 {"password": ""}]:
        response = await client.request("DELETE", f"{API}/me", headers=patient.headers,
                                        json=body)
        expect(response, 422)
    expect(await client.get(f"{API}/me", headers=patient.headers), 200)


def _me_fields(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in ("full_name", "phone", "address", "birth_date")}


async def test_rectification(runtime: Runtime, client: httpx.AsyncClient) -> None:
    patient = await register(client, new_email("rectify"))
    changed = expect(await client.patch(f"{API}/me", headers=patient.headers, json={
        "full_name": "Ottilie Q. Marsh", "birth_date": "1958-12-01", "phone": None}), 200)
    assert _me_fields(changed) == {"full_name": "Ottilie Q. Marsh", "phone": None,
                                   "address": IDENTITY["address"],
                                   "birth_date": "1958-12-01"}
    assert _me_fields(expect(await client.get(f"{API}/me", headers=patient.headers), 200)) == \
        _me_fields(changed)
    for body, why in [
        ({}, "nothing to change"), ({"birth_date": "1899-12-31"}, "before 1900"),
        ({"birth_date": "2999-01-01"}, "in the future"), ({"birth_date": "30/11/1958"}, "form"),
        ({"birth_date": -1}, "no coercion"), ({"full_name": None}, "a name stays"),
        ({"full_name": ""}, "empty"), ({"phone": "call me maybe"}, "not a phone"),
        ({"address": "x" * 501}, "too long"), ({"email": "new@clinic.example"}, "not here"),
        ({"role": "doctor"}, "unknown field"),
    ]:
        response = await client.patch(f"{API}/me", headers=patient.headers, json=body)
        assert response.status_code == 422, (why, response.text)
        assert response.json()["error"] in ("validation_error", "invalid_request"), why
    async with runtime.sessions() as session:
        events = (await session.execute(select(AuditEvent).where(
            AuditEvent.action == "UPDATE_PROFILE", AuditEvent.patient_id == patient.id)
        )).scalars().all()
    assert [e.event_metadata for e in events] == [{"fields": "birth_date,full_name,phone"}]
    doctor = await signed_in(runtime, "doctor")
    expect(await client.patch(f"{API}/me", headers=doctor.headers, json={"full_name": "X"}),
           403, "forbidden")


async def test_registration_refuses_an_impossible_birth_date(client: httpx.AsyncClient) -> None:
    for birth in ("2999-01-01", "1899-12-31"):
        expect(await client.post(f"{API}/auth/register", json={
            "email": new_email("born"), "password": PASSWORD, "full_name": "Nobody Yet",
            "birth_date": birth}), 422)


async def test_the_consent_in_force_at_a_past_instant(runtime: Runtime,
                                                      client: httpx.AsyncClient) -> None:
    patient = await register(client, new_email("proof"))
    choices = [{"marketing": False, "data_sharing": True, "analytics": False},
               {"marketing": False, "data_sharing": False, "analytics": True}]
    stamps = []
    for choice in choices:
        stamps.append(expect(await client.put(f"{API}/me/consents", headers=patient.headers,
                                              json=choice), 200)["consent_date"])
    history = expect(await client.get(f"{API}/me/consents/history", headers=patient.headers),
                     200)
    assert len(history) == 3 and history[0]["marketing"] is True  # registration: all true
    registered = history[0]["consent_date"]

    async def at(instant: str) -> httpx.Response:
        return await client.get(f"{API}/me/consents", headers=patient.headers,
                                params={"at": instant})

    assert expect(await at(registered), 200)["marketing"] is True
    assert expect(await at(stamps[0]), 200) == {**choices[0], "consent_date": stamps[0]}
    assert expect(await at(stamps[1]), 200) == {**choices[1], "consent_date": stamps[1]}
    assert expect(await at("2999-01-01T00:00:00+00:00"), 200)["analytics"] is True
    expect(await at("2000-01-01T00:00:00Z"), 404, "not_found")
    for bad in ("2026-01-01T00:00:00", "1700000000", "yesterday", "2026-13-01T00:00:00Z"):
        expect(await at(bad), 422)

    # The same for the data-protection officer, from the CLI.
    env = cli_env(runtime)
    proof = run_cli("gdpr", "consents", str(patient.id), "--at", stamps[0], env=env)
    assert proof.returncode == 0, proof.stderr
    assert json.loads(proof.stdout)["data_sharing"] is True
    full = run_cli("gdpr", "consents", str(patient.id), "--history", env=env)
    assert [v["analytics"] for v in json.loads(full.stdout)] == [True, False, True]
    early = run_cli("gdpr", "consents", str(patient.id), "--at", "2000-01-01T00:00:00+00:00",
                    env=env)
    assert (early.returncode, early.stderr.strip()) == (
        1, "phivault: No consent was recorded at that time.")
    naive = run_cli("gdpr", "consents", str(patient.id), "--at", "2026-01-01T00:00:00", env=env)
    assert naive.returncode == 2


# Regressions of the outside review (each failed before its fix).

async def test_an_author_keeps_only_the_versions_they_wrote(runtime: Runtime,
                                                            client: httpx.AsyncClient) -> None:
    """A colleague's amendment stays the colleague's; and amending someone's record buys no
    access to it (the review's "one-character amendment" attack)."""
    patient = await register(client, new_email("versions"))
    author, amender = [await signed_in(runtime, "doctor") for _ in range(2)]
    await book(client, patient, author)
    await book(client, patient, amender)
    record = await write_record(client, author, patient.id, diagnosis="Sarcoidosis")
    kept = await write_record(client, author, patient.id, diagnosis="Uveitis")
    expect(await client.patch(f"{API}/records/{record['id']}", headers=amender.headers,
                              json={"diagnosis": "Tuberculosis, not sarcoidosis"}), 200)
    expect(await erase(client, patient), 204)

    versions = expect(await client.get(f"{API}/records/{record['id']}/versions",
                                       headers=author.headers), 200)
    assert [(v["version"], v["diagnosis"]) for v in versions] == [(1, "Sarcoidosis")]
    # The latest version is the amender's: the author reads theirs through /versions only.
    expect(await client.get(f"{API}/records/{record['id']}", headers=author.headers), 403,
           "no_care_relationship")
    listed = expect(await client.get(f"{API}/patients/{patient.id}/records",
                                     headers=author.headers), 200)
    assert [r["id"] for r in listed] == [kept["id"]]
    for path in (f"/records/{record['id']}", f"/records/{record['id']}/versions",
                 f"/records/{kept['id']}", f"/patients/{patient.id}/records"):
        expect(await client.get(f"{API}{path}", headers=amender.headers), 403,
               "no_care_relationship")


async def test_a_damaged_ciphertext_does_not_block_erasure(runtime: Runtime,
                                                           client: httpx.AsyncClient) -> None:
    patient = await register(client, new_email("damaged"))
    async with runtime.unit_of_work() as session:
        profile = await session.get(PatientProfile, patient.id)
        assert profile is not None and profile.birth_date is not None
        profile.birth_date = profile.birth_date[:-1] + bytes([profile.birth_date[-1] ^ 1])
    expect(await erase(client, patient), 204)
    async with runtime.sessions() as session:
        user = await session.get(User, patient.id)
        profile = await session.get(PatientProfile, patient.id)
    assert user is not None and user.status == "deleted" and user.email is None
    assert profile is not None and (profile.full_name, profile.birth_date) == (None, None)


async def test_writes_racing_an_erasure_cannot_land_after_it(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    """A request checks its token at its start; the erasure may commit before it writes. On
    PostgreSQL each write in the account's name re-checks the account under a lock (SQLite
    runs one writing transaction at a time, so the interleaving cannot happen there)."""
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's READ COMMITTED interleaving; SQLite serialises writers")
    doctor = await signed_in(runtime, "doctor")
    writes = {
        "consents": lambda s, pid: consents.change(s, pid, ConsentChoice(
            marketing=True, data_sharing=True, analytics=True)),
        "rectification": lambda s, pid: rectification.rectify(
            s, runtime.envelope, pid, ProfileRectification(full_name="Back Again")),
        "booking": lambda s, pid: consultations.create(
            s, runtime.envelope, runtime.access_tokens.verify(patient.access_token),
            PatientBooking(doctor_id=doctor.id, scheduled_at=datetime(2031, 5, 4, tzinfo=UTC),
                           reason="Still here?"),
            care_days=runtime.settings.care_relationship_days),
    }
    for name, write in writes.items():
        patient = await register(client, new_email(f"race-{name}"))
        claims = runtime.access_tokens.verify(patient.access_token)
        with pytest.raises(InvalidToken):
            async with runtime.unit_of_work() as session:
                await runtime.authenticator.check_session(session, claims)  # active, at first
                async with runtime.unit_of_work() as other:  # DELETE /me commits meanwhile
                    await erasure_service.erase(other, runtime.envelope, patient.id)
                await write(session, patient.id)
        async with runtime.sessions() as session:
            latest = (await session.execute(select(Consent).where(
                Consent.patient_id == patient.id).order_by(Consent.version.desc()))
            ).scalars().first()
            profile = await session.get(PatientProfile, patient.id)
            booked = (await session.execute(select(Consultation).where(
                Consultation.patient_id == patient.id))).first()
        assert latest is not None and not latest.analytics, name
        assert profile is not None and profile.full_name is None, name
        assert booked is None, name
