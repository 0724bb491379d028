"""No plaintext PHI in the database or the logs (SPEC §5): known plaintexts go into every PHI
field through the API, then the raw database (SQLite file bytes; a pg_dump of PostgreSQL), the
audit events and the captured log lines are searched for them."""

from __future__ import annotations

import io
import secrets
import uuid
from pathlib import Path

from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.runtime import Runtime
from tests.clinical.world import (
    API,
    book,
    expect,
    propose,
    set_consent,
    upload,
)
from tests.conftest import client_for
from tests.factories import PASSWORD, TestUser, signed_in
from tests.storage import raw_storage


def encodings(plaintext: str) -> list[bytes]:
    """The forms a value would take in the raw storage if it were stored in clear: UTF-8 in
    text columns and SQLite blobs, hex in a pg_dump of a bytea column."""
    raw = plaintext.encode()
    return [raw, raw.hex().encode(), raw.hex().upper().encode()]


def found_in(haystack: bytes, plaintexts: list[str]) -> list[str]:
    return [p for p in plaintexts if any(form in haystack for form in encodings(p))]


async def store_phi(rt: Runtime, tag: str) -> tuple[list[str], list[str]]:
    """Write a known plaintext into every PHI field; return (plaintexts, stored-in-clear
    controls that the scan must find, proving it looks in the right places)."""
    phi = {
        "email": f"zelda.canaryfield.{tag}@clinic.example",
        "full_name": f"Zelda Canaryfield {tag}",
        "birth_date": "1961-07-23",
        "phone": f"+44 20 7946 {int(tag[:4], 16) % 10000:04d}",
        "address": f"17 Larkspur Mews {tag}, Bristol",
        "reason": f"Recurring migraine aura {tag}",
        "notes": f"Photophobia and nausea since March {tag}",
        "diagnosis": f"Vestibular migraine {tag}",
        "line1": f"Propranolol 40mg nightly {tag}",
        "line2": f"Riboflavin 400mg daily {tag}",
        "record_notes": f"Family history of stroke {tag}",
        "amended": f"Amended: also tinnitus {tag}",
        "medication": f"Topiramate {tag}",
        "dosage": f"25 mg twice a day {tag}",
        "instructions": f"Increase slowly, watch for tingling {tag}",
        "filename": f"mri-brain-{tag}.pdf",
        "file_text": f"CANARY-ATTACHMENT-CONTENT-{tag}",
        "second_reason": f"Second opinion on the MRI {tag}",
        "break_glass_reason": f"Found unresponsive, suspected overdose {tag}",
    }
    controls = [f"pay_ref_{tag}"]  # a payment's provider reference is stored in clear
    async with client_for(rt) as client:
        registered = expect(await client.post(f"{API}/auth/register", json={
            "email": phi["email"], "password": PASSWORD, "full_name": phi["full_name"],
            "birth_date": phi["birth_date"], "sex": "female", "phone": phi["phone"],
            "address": phi["address"],
            "consents": {"marketing": False, "data_sharing": True, "analytics": False}}), 201)
        tokens = expect(await client.post(f"{API}/auth/login", json={
            "email": phi["email"], "password": PASSWORD}), 200)
        patient = TestUser(uuid.UUID(registered["id"]), phi["email"], PASSWORD, "patient",
                           tokens["access_token"])
        doctor = await signed_in(rt, "doctor")
        other_doctor = await signed_in(rt, "doctor")
        await set_consent(client, patient, True)

        consultation = await book(client, patient, doctor, reason=phi["reason"])
        expect(await client.patch(f"{API}/consultations/{consultation['id']}",
                                  headers=doctor.headers, json={"notes": phi["notes"]}), 200)
        record = expect(await client.post(
            f"{API}/patients/{patient.id}/records", headers=doctor.headers,
            json={"diagnosis": phi["diagnosis"], "prescriptions": [phi["line1"], phi["line2"]],
                  "notes": phi["record_notes"]}), 201)
        expect(await client.patch(f"{API}/records/{record['id']}", headers=doctor.headers,
                                  json={"notes": phi["amended"]}), 200)
        expect(await client.post(
            f"{API}/patients/{patient.id}/prescriptions", headers=doctor.headers,
            json={"medication": phi["medication"], "dosage": phi["dosage"],
                  "instructions": phi["instructions"]}), 201)
        content = b"%PDF-1.4\n" + (phi["file_text"].encode() + b"\n") * 12_000  # ~0.5 MB
        attachment = expect(await upload(client, patient, patient.id, content,
                                         filename=phi["filename"],
                                         content_type="application/pdf", chunk=50_000), 201)
        got = await client.get(f"{API}/attachments/{attachment['id']}",
                               headers=patient.headers)
        assert got.content == content
        expect(await client.post(f"{API}/consultations/{consultation['id']}/payments",
                                 headers=patient.headers, json={
                                     "amount": 4500, "currency": "EUR",
                                     "provider_reference": controls[0]}), 201)
        # Notifications: a proposal by a new doctor, and a break-glass access.
        expect(await client.post(f"{API}/patients/{patient.id}/break-glass",
                                 headers=other_doctor.headers,
                                 json={"reason": phi["break_glass_reason"]}), 201)
        await propose(client, other_doctor, patient, reason=phi["second_reason"])
        notes = expect(await client.get(f"{API}/me/notifications", headers=patient.headers), 200)
        assert {n["kind"] for n in notes} >= {"break_glass", "consultation_proposed"}

        # Every value reads back (so it was stored), through every read route.
        me = expect(await client.get(f"{API}/me", headers=patient.headers), 200)
        assert me["full_name"] == phi["full_name"] and me["address"] == phi["address"]
        versions = expect(await client.get(f"{API}/records/{record['id']}/versions",
                                           headers=doctor.headers), 200)
        assert [v["notes"] for v in versions] == [phi["record_notes"], phi["amended"]]
        mine = expect(await client.get(f"{API}/consultations", headers=doctor.headers), 200)
        assert mine[0]["notes"] == phi["notes"]
        expect(await client.get(f"{API}/patients/{patient.id}/prescriptions",
                                headers=doctor.headers), 200)
        expect(await client.get(f"{API}/patients/{patient.id}/attachments",
                                headers=doctor.headers), 200)
        expect(await client.get(f"{API}/patients", headers=doctor.headers), 200)
        # The break-glass reason reads back only through the audit API, for auditors.
        auditor = await signed_in(rt, "auditor")
        glass = expect(await client.get(f"{API}/audit", headers=auditor.headers, params={
            "patient_id": str(patient.id), "action": "BREAK_GLASS"}), 200)
        assert [e["break_glass_reason"] for e in glass] == [phi["break_glass_reason"]]
        # A denied and a failed request too: their log lines and events must not leak either.
        expect(await client.post(f"{API}/patients/{patient.id}/records",
                                 headers=other_doctor.headers, json={
                                     "diagnosis": phi["diagnosis"], "prescriptions": []}), 403)
        expect(await client.post(f"{API}/consultations/{consultation['id']}/payments",
                                 headers=patient.headers, json={
                                     "amount": 1, "currency": "EUR",
                                     "provider_reference": controls[0],
                                     "card_holder": phi["full_name"]}), 422)

    texts = [n["text"] for n in notes]
    return [*phi.values(), *texts], controls


async def test_no_plaintext_phi_in_the_database_or_the_logs(
        fresh_runtime: object, tmp_path: Path, captured_logs: io.StringIO) -> None:
    rt: Runtime = await fresh_runtime()  # type: ignore[operator]
    tag = secrets.token_hex(6)
    plaintexts, controls = await store_phi(rt, tag)
    async with rt.sessions() as session:
        chain_hash = (await session.execute(select(AuditEvent.hash).order_by(
            AuditEvent.seq.desc()).limit(1))).scalar_one()

    async with rt.sessions() as session:
        events = (await session.execute(select(AuditEvent))).scalars().all()
    trail = "\n".join(repr([getattr(e, c.key) for c in AuditEvent.__mapper__.column_attrs])
                      for e in events)
    assert str(events[0].seq) in trail  # the scan sees every column of every event
    assert found_in(trail.encode(), plaintexts) == []

    storage = await raw_storage(rt, tmp_path)
    # The scan sees what is stored: a clear text value, and binary values (hex in a pg_dump).
    assert found_in(storage, controls) == controls
    assert any(form in storage for form in (chain_hash, chain_hash.hex().encode()))
    assert found_in(storage, plaintexts) == []

    logs = captured_logs.getvalue()
    assert "request" in logs  # the access log was captured
    assert found_in(logs.encode(), plaintexts) == []
