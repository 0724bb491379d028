"""`phivault research export` (SPEC §9): a de-identified JSON-lines data set of the patients
whose current analytics consent is true, with no identifier of HIPAA Safe Harbor, keyed
pseudonyms, years for dates, "90+" for the oldest, and k-anonymity on request.

A small clinic is made through the real API in a database of its own (the export reads every
patient there is), identifiers are planted in every field, and the file's raw bytes are
searched for them."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import secrets
import stat
import string
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, update

from phivault.audit import service as audit_service
from phivault.audit.actions import Action
from phivault.audit.models import AuditEvent
from phivault.auth.models import User
from phivault.clinical.models import MedicalRecord, MedicalRecordVersion
from phivault.crypto.keys import derive_key, generate_key
from phivault.crypto.pseudonym import PseudonymSpace
from phivault.db.base import utcnow
from phivault.keys.models import DataKeyRow
from phivault.privacy.research import (
    IdentityScreen,
    ResearchExportChanged,
    ResearchPseudonyms,
    ResearchSummary,
    count_groups,
    traits,
    write_research_export,
)
from phivault.runtime import Runtime
from tests.clinical.world import API, WHEN, book, expect
from tests.conftest import client_for, generate_keys
from tests.factories import PASSWORD, TestUser, signed_in
from tests.helpers import cli_env, run_cli

YEAR = utcnow().year


@dataclass
class Clinic:
    rt: Runtime
    patients: dict[str, TestUser] = field(default_factory=dict)
    planted: list[str] = field(default_factory=list)  # must never be in an export
    ids: list[uuid.UUID] = field(default_factory=list)  # real ids, none may be in an export

    def pseudonym(self, name: str, study: str | None = None) -> str:
        spaces = ResearchPseudonyms.from_index_key(self.rt.settings.index_key_bytes, study)
        return spaces.patients.of(self.patients[name].id)


async def _register(client: httpx.AsyncClient, clinic: Clinic, name: str, *, birth: str,
                    sex: str | None, analytics: bool) -> TestUser:
    tag = "".join(secrets.choice(string.ascii_lowercase) for _ in range(8))
    number = secrets.randbelow(10_000)
    identity = {"email": f"{name}.{tag}@home.example", "full_name": f"{name.title()} Q{tag}",
                "phone": f"+44 20 7946 {number:04d}",
                "address": f"{number} Larkspur Mews {tag.title()}, Bristol"}
    body: dict[str, Any] = {**identity, "password": PASSWORD, "birth_date": birth, "consents": {
        "marketing": True, "data_sharing": True, "analytics": analytics}}
    if sex is not None:
        body["sex"] = sex
    created = expect(await client.post(f"{API}/auth/register", json=body), 201)
    tokens = expect(await client.post(f"{API}/auth/login", json={
        "email": identity["email"], "password": PASSWORD}), 200)
    patient = TestUser(uuid.UUID(created["id"]), identity["email"], PASSWORD, "patient",
                       tokens["access_token"], extra={"full_name": identity["full_name"]})
    clinic.patients[name] = patient
    clinic.planted += [*identity.values(), birth]
    clinic.ids.append(patient.id)
    return patient


async def _consent(client: httpx.AsyncClient, patient: TestUser, analytics: bool) -> None:
    expect(await client.put(f"{API}/me/consents", headers=patient.headers, json={
        "marketing": False, "data_sharing": True, "analytics": analytics}), 200)


async def _chart(client: httpx.AsyncClient, clinic: Clinic, doctor: TestUser, patient: TestUser,
                 diagnoses: list[str]) -> None:
    """A booking (with a reason and notes), records (with notes, amended once) and a
    prescription (with instructions): every free text holds a planted identifier."""
    tag = secrets.token_hex(4)
    free = {"reason": f"Headaches since the crash on the M4 {tag}",
            "notes": f"Lives with daughter Imogen {tag}", "line": f"Rest at 9 Elm Row {tag}",
            "record_notes": f"Works at Acme Bank, account 55-{tag}",
            "amended": f"Amended: call him on his mobile {tag}",
            "instructions": f"Ask the pharmacist at Grove Street {tag}"}
    consultation = await book(client, patient, doctor, reason=free["reason"])
    expect(await client.patch(f"{API}/consultations/{consultation['id']}",
                              headers=doctor.headers, json={"notes": free["notes"]}), 200)
    clinic.ids.append(uuid.UUID(consultation["id"]))
    for diagnosis in diagnoses:
        record = expect(await client.post(f"{API}/patients/{patient.id}/records",
                                          headers=doctor.headers, json={
                                              "diagnosis": diagnosis, "prescriptions": [
                                                  free["line"]],
                                              "notes": free["record_notes"]}), 201)
        expect(await client.patch(f"{API}/records/{record['id']}", headers=doctor.headers,
                                  json={"notes": free["amended"]}), 200)
        clinic.ids.append(uuid.UUID(record["id"]))
    prescription = expect(await client.post(
        f"{API}/patients/{patient.id}/prescriptions", headers=doctor.headers, json={
            "medication": "Topiramate", "dosage": "25 mg twice a day",
            "instructions": free["instructions"]}), 201)
    clinic.ids.append(uuid.UUID(prescription["id"]))
    clinic.planted += free.values()


@pytest.fixture
async def clinic(fresh_runtime: Callable[..., Any]) -> Clinic:
    """Five patients to export and three not to:

    - ada (1961, female), analytics at registration; two records (one diagnosis names her);
    - cyd (95 years old, male), analytics given later; one record;
    - fay, gia, hal (1980, female), analytics at registration; fay has one record;
    - bea gave analytics at registration and withdrew it; dan never gave it; eve gave it but
      her account is erased (status `deleted`)."""
    rt: Runtime = await fresh_runtime()
    clinic = Clinic(rt)
    doctor = await signed_in(rt, "doctor", full_name="Dr Hildegard Quillfeather")
    clinic.planted.append("Hildegard Quillfeather")
    clinic.ids.append(doctor.id)
    async with client_for(rt) as client:
        ada = await _register(client, clinic, "ada", birth="1961-07-23", sex="female",
                              analytics=True)
        surname = ada.extra["full_name"].split()[-1]
        await _chart(client, clinic, doctor, ada,
                     ["Vestibular migraine", f"Cluster headache ({surname} family pattern)"])
        cyd = await _register(client, clinic, "cyd", birth=f"{YEAR - 95}-01-15", sex="male",
                              analytics=False)
        await _consent(client, cyd, True)
        await _chart(client, clinic, doctor, cyd, ["Atrial fibrillation"])
        for name in ("fay", "gia", "hal"):
            patient = await _register(client, clinic, name, birth="1980-02-29", sex="female",
                                      analytics=True)
            if name == "fay":
                await _chart(client, clinic, doctor, patient, ["Asthma"])
        bea = await _register(client, clinic, "bea", birth="1980-03-01", sex="female",
                              analytics=True)
        await _chart(client, clinic, doctor, bea, ["Eczema"])
        await _consent(client, bea, False)
        await _register(client, clinic, "dan", birth="1980-03-02", sex=None, analytics=False)
        await _register(client, clinic, "eve", birth="1980-03-03", sex="female", analytics=True)
    # An erasure withdraws consents; the export leaves out `deleted` accounts all the same.
    async with rt.unit_of_work() as session:
        await session.execute(update(User).where(User.id == clinic.patients["eve"].id)
                              .values(status="deleted"))
    return clinic


async def _export(rt: Runtime, k: int = 1) -> tuple[bytes, ResearchSummary]:
    """The export made in this process, reading patients two at a time."""
    pseudonyms = ResearchPseudonyms.from_index_key(rt.settings.index_key_bytes)
    sink = io.BytesIO()
    groups = await count_groups(rt.sessions, rt.envelope, YEAR, page=2)
    summary = await write_research_export(rt.sessions, rt.envelope, pseudonyms, groups, sink,
                                          year=YEAR, k=k, page=2)
    return sink.getvalue(), summary


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def _export_events(rt: Runtime, action: Action = Action.RESEARCH_EXPORT
                         ) -> list[dict[str, Any]]:
    async with rt.sessions() as session:
        events = (await session.execute(select(AuditEvent).where(
            AuditEvent.action == action).order_by(AuditEvent.seq))).scalars().all()
    return [{"actor_role": e.actor_role, "patient_id": e.patient_id, "outcome": e.outcome,
             "resource_type": e.resource_type, "metadata": e.event_metadata} for e in events]


async def _chain_holds(rt: Runtime) -> None:
    result = await audit_service.verify_snapshot(rt.sessions, rt.audit_key, rt.sequencer,
                                                 rt.queue_key)
    assert result.ok


def test_help_explains_the_export() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = run_cli("research", "export", "--help", env=env)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for phrase in ("Safe Harbor", "analytics consent", "--k", "--out", "--study", "90+",
                   "pseudonyms", "0600", "RESEARCH_EXPORT"):
        assert phrase in text, phrase


async def test_the_export_holds_no_identifier_and_only_consenting_patients(
        clinic: Clinic, tmp_path: Path) -> None:
    out = tmp_path / "research.jsonl"
    result = run_cli("research", "export", "--out", str(out), env=cli_env(clinic.rt))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"research export: 5 patients, 4 records, 0 suppressed "
                                     f"(k=1), 1 values withheld; written to {out}")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    raw = out.read_bytes()
    forbidden = [*clinic.planted, *(str(i) for i in clinic.ids), *(i.hex for i in clinic.ids)]
    assert [text for text in forbidden if text.lower().encode() in raw.lower()] == []
    assert re.search(rb"\d{4}-\d{2}|T\d{2}:", raw) is None  # no date finer than a year
    assert b"Eczema" not in raw  # bea's diagnosis: she withdrew her consent

    lines = _lines(out)
    by_patient = {line["patient"]: line for line in lines}
    assert set(by_patient) == {clinic.pseudonym(n) for n in ("ada", "cyd", "fay", "gia", "hal")}
    assert [line["patient"] for line in lines] == sorted(by_patient)  # not in real-id order
    ada = by_patient[clinic.pseudonym("ada")]
    assert {k: v for k, v in ada.items() if k != "records"} == {
        "patient": clinic.pseudonym("ada"), "birth_year": 1961, "age": YEAR - 1961,
        "sex": "female",
        "prescriptions": [{"year": YEAR, "medication": "Topiramate",
                           "dosage": "25 mg twice a day"}],
        "consultations": [{"year": int(WHEN[:4]), "status": "scheduled"}]}
    # Her second diagnosis names her: withheld, the record itself stays.
    assert sorted((r["diagnosis"] or "", r["versions"], r["year"]) for r in ada["records"]) == [
        ("", 2, YEAR), ("Vestibular migraine", 2, YEAR)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", r["record"]) for r in ada["records"])
    cyd = by_patient[clinic.pseudonym("cyd")]
    assert (cyd["birth_year"], cyd["age"], cyd["sex"]) == (None, "90+", "male")
    assert b'"birth_year":' + str(YEAR - 95).encode() not in raw
    hal = by_patient[clinic.pseudonym("hal")]
    assert hal == {"patient": clinic.pseudonym("hal"), "birth_year": 1980, "age": YEAR - 1980,
                   "sex": "female", "records": [], "prescriptions": [], "consultations": []}

    assert await _export_events(clinic.rt) == [{
        "actor_role": "system", "patient_id": None, "outcome": "success",
        "resource_type": "research_export",
        "metadata": {"kind": "research", "format": "jsonl", "patients": 5, "records": 4,
                     "suppressed": 0}}]
    await _chain_holds(clinic.rt)


async def test_pseudonyms_are_keyed_stable_and_per_study(clinic: Clinic, tmp_path: Path) -> None:
    env = cli_env(clinic.rt)
    first, study = tmp_path / "first.jsonl", tmp_path / "study.jsonl"
    for path, extra in ((first, []), (study, ["--study", "trial-7"])):
        result = run_cli("research", "export", "--out", str(path), *extra, env=env)
        assert result.returncode == 0, result.stderr
    # Another run, in pages of two: the same pseudonyms, in the same order.
    assert (await _export(clinic.rt))[0] == first.read_bytes()

    ada = clinic.patients["ada"].id
    key = derive_key(clinic.rt.settings.index_key_bytes, "pseudonym/research/patient")
    expected = hmac.new(key, ada.bytes, hashlib.sha256).hexdigest()[:32]
    assert clinic.pseudonym("ada") == expected != ada.hex

    plain = {line["patient"] for line in _lines(first)}
    scoped = {line["patient"] for line in _lines(study)}
    assert scoped == {clinic.pseudonym(n, "trial-7") for n in ("ada", "cyd", "fay", "gia", "hal")}
    assert plain.isdisjoint(scoped)
    records = [{r["record"] for line in _lines(path) for r in line["records"]}
               for path in (first, study)]
    assert len(records[0]) == 4 and records[0].isdisjoint(records[1] | plain)
    await _chain_holds(clinic.rt)


async def test_k_suppresses_small_groups_and_the_summary_counts_them(
        clinic: Clinic, tmp_path: Path) -> None:
    out = tmp_path / "k2.jsonl"
    result = run_cli("research", "export", "--out", str(out), "--k", "2",
                     env=cli_env(clinic.rt))
    assert result.returncode == 0, result.stderr
    # ada (1961, female) and cyd (90+, male) are alone in their groups.
    assert result.stdout.strip() == (f"research export: 3 patients, 1 records, 2 suppressed "
                                     f"(k=2), 0 values withheld; written to {out}")
    lines = _lines(out)
    assert {line["patient"] for line in lines} == {clinic.pseudonym(n)
                                                   for n in ("fay", "gia", "hal")}
    groups = Counter((line["birth_year"] or line["age"], line["sex"]) for line in lines)
    assert groups == {(1980, "female"): 3}
    assert (await _export_events(clinic.rt))[-1]["metadata"] == {
        "kind": "research", "format": "jsonl", "patients": 3, "records": 1, "suppressed": 2}

    assert await _export(clinic.rt, k=4) == (b"", ResearchSummary(0, 0, 5, 0))
    await _chain_holds(clinic.rt)


async def test_a_group_that_shrinks_between_the_passes_writes_nothing(clinic: Clinic) -> None:
    rt = clinic.rt
    pseudonyms = ResearchPseudonyms.from_index_key(rt.settings.index_key_bytes)
    groups = await count_groups(rt.sessions, rt.envelope, YEAR, page=2)
    assert groups == {(1961, "female"): 1, ("90+", "male"): 1, (1980, "female"): 3}
    async with client_for(rt) as client:
        await _consent(client, clinic.patients["gia"], False)
    sink = io.BytesIO()
    with pytest.raises(ResearchExportChanged):
        await write_research_export(rt.sessions, rt.envelope, pseudonyms, groups, sink,
                                    year=YEAR, k=3, page=2)
    assert sink.getvalue() == b""
    # Run again, both passes agree: gia is gone, fay and hal stay at k=2.
    assert (await _export(rt, k=2))[1] == ResearchSummary(2, 1, 2, 0)


async def test_a_value_that_fails_authentication_writes_nothing_and_is_audited(
        clinic: Clinic, tmp_path: Path) -> None:
    # The data key of the latest version of fay's record is gone (a corrupted database).
    async with clinic.rt.sessions() as session:
        key_id = (await session.execute(
            select(MedicalRecordVersion.data_key_id).join(
                MedicalRecord, (MedicalRecord.id == MedicalRecordVersion.record_id)
                & (MedicalRecord.latest_version == MedicalRecordVersion.version))
            .where(MedicalRecord.patient_id == clinic.patients["fay"].id))).scalar_one()
        await session.execute(delete(DataKeyRow).where(DataKeyRow.id == key_id))
        await session.commit()
    (folder := tmp_path / "out").mkdir()
    result = run_cli("research", "export", "--out", str(folder / "research.jsonl"),
                     env=cli_env(clinic.rt))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "phivault: a stored value failed authentication (integrity failure, audited); "
        "nothing was written")
    assert list(folder.iterdir()) == []  # not even the part file
    assert await _export_events(clinic.rt) == []
    assert await _export_events(clinic.rt, Action.INTEGRITY_FAILURE) == [{
        "actor_role": "system", "patient_id": None, "outcome": "error",
        "resource_type": "research_export", "metadata": {}}]
    await _chain_holds(clinic.rt)


def test_bad_arguments_fail_with_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", **generate_keys(),
           "PHIVAULT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/none.db"}
    out = tmp_path / "x.jsonl"
    study = run_cli("research", "export", "--out", str(out), "--study", "Trial/7", env=env)
    assert study.returncode == 2 and study.stdout == ""
    assert study.stderr.splitlines() == [
        "phivault: --study: a study name is 1 to 64 characters of a-z 0-9 . _ -, starting "
        "with a letter or digit"]
    missing = tmp_path / "no" / "such" / "dir.jsonl"
    nowhere = run_cli("research", "export", "--out", str(missing), env=env)
    assert nowhere.returncode == 2 and len(nowhere.stderr.splitlines()) == 1
    zero = run_cli("research", "export", "--out", str(out), "--k", "0", env=env)
    assert zero.returncode == 2
    assert sorted(tmp_path.iterdir()) == []  # no file, and no database was even opened


# The pieces, without a database.

@pytest.mark.parametrize(("birth", "sex", "expected"), [
    ("1961-07-23", "female", (1961, YEAR - 1961, "female")),
    (f"{YEAR - 89}-12-31", "male", (YEAR - 89, 89, "male")),
    (f"{YEAR - 90}-12-31", "other", (None, "90+", "other")),  # 89 until December: still 90+
    (f"{YEAR - 104}-01-01", "unknown", (None, "90+", None)),
    ("1975", None, (1975, YEAR - 1975, None)),  # an erased profile keeps the year only
    (None, "female", (None, None, "female")),
])
def test_traits_keep_the_year_only_and_band_the_oldest(
        birth: str | None, sex: str | None, expected: tuple[Any, ...]) -> None:
    found = traits(birth, sex, YEAR)
    assert (found.birth_year, found.age, found.sex) == expected
    assert found.group == (found.age if found.age == "90+" else found.birth_year, found.sex)


def test_the_screen_withholds_identifiers_and_passes_clinical_terms() -> None:
    screen = IdentityScreen("Zelda Mae Canaryfield", "zc1961@mail.example",
                            "17 Larkspur Mews, Bristol")
    for clinical in ("Vestibular migraine", "Amoxicillin", "500 mg three times a day",
                     "Type 2 diabetes mellitus", "J45.9 asthma", "1-0-1 for 10 days",
                     "Zelena-like rash"):
        assert screen.passes(clinical), clinical
    for leak in ("Canaryfield syndrome", "seen with zelda", "mail zc1961 please",
                 "see www.example.org", "call +44 20 7946 0018", "NHS 943 476 5919",
                 "since 23/07/1961", "onset 2024-03-01", "write to x@y.org",
                 "near 17 Larkspur Mews", "from 10.0.0.12"):
        assert not screen.passes(leak), leak
    assert IdentityScreen(None, None, None).passes("Influenza")


def test_pseudonym_spaces_are_apart_and_keyed() -> None:
    root, value = generate_key(), uuid.uuid4()
    patients = PseudonymSpace(root, "research/patient")
    assert patients.of(value) == PseudonymSpace(root, "research/patient").of(value)
    assert re.fullmatch(r"[0-9a-f]{32}", patients.of(value))
    assert patients.of(value) != PseudonymSpace(root, "research/record").of(value)
    assert patients.of(value) != PseudonymSpace(generate_key(), "research/patient").of(value)
    assert "masked" in repr(patients) and root.hex() not in repr(patients)
    for bad in ("", "Research", "a//b", "/a", "a b"):
        with pytest.raises(ValueError):
            PseudonymSpace(root, bad)
    with pytest.raises(ValueError):
        ResearchPseudonyms.from_index_key(root, "x" * 65)
