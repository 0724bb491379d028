"""Benchmark the patient's data export (SPEC §9, `GET /me/export`, `phivault gdpr export`): time
and peak memory of the JSON and the FHIR export of a patient with 1,000 and one with 10,000
medical records, on PostgreSQL. Memory must not grow with the history.

Run from the repository root: `PYTHONPATH=src python bench/export_bench.py [--records
1000,10000]`. Writes bench/results/export.json. PostgreSQL is at PHIVAULT_TEST_DATABASE_URL
(default postgresql+asyncpg://postgres@127.0.0.1:5432/test); the benchmark makes a scratch
database beside it and drops it at the end.

- Data: for a patient with N records, written through the same sealing recipe as the services
  (a data key per row): N records (one in five amended, so 1.2 N versions), N/5 prescriptions,
  N/10 consultations each with a payment, N/100 attachments (metadata) and notifications, three
  consent versions, and the doctor's CREATE_MEDICAL_RECORD event of each record in the chain
  (an access log of N entries).
- Each figure comes from a fresh subprocess (`--child`) that builds a runtime, exports a small
  patient once to warm the code paths, then streams the export (`privacy.export.stream`, what
  the route sends) into a byte counter. One child per case reads `resource.getrusage()`'s
  `ru_maxrss` around the export (no tracing: the real resident peak, and the time); another
  measures tracemalloc's peak over the export alone.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text

from harness import machine_info, pg_admin, pg_url  # type: ignore[import-not-found]
from phivault.access.permissions import Role
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.clinical.models import (
    Attachment,
    Consultation,
    MedicalRecord,
    MedicalRecordVersion,
    Notification,
    Payment,
    Prescription,
)
from phivault.config import load_settings
from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.db.base import utcnow
from phivault.db.migrate import upgrade
from phivault.keys.service import new_row_cipher
from phivault.privacy import export
from phivault.privacy.export import ExportFormat
from phivault.privacy.models import Consent
from phivault.request_context import Actor
from phivault.runtime import Runtime

RESULT = Path(__file__).parent / "results" / "export.json"
PASSWORD = "correct horse battery staple 42"  # noqa: S105 - a throwaway database's
BATCH = 1000
FLAT_FACTOR = 1.5  # the 10x history may peak at most this much above the small one (+ slack)
NOTES = ("Patient reports intermittent wheezing, worse at night and after exercise. "
         "Auscultation: scattered expiratory wheeze, no crackles. Peak flow 78 % of predicted. "
         "Plan: inhaled corticosteroid, review technique, spirometry in six weeks. ") * 2


def settings_from_env(database_url: str) -> Any:
    return load_settings(database_url=database_url, argon2_memory_kib=8, argon2_time_cost=1,
                         log_level="warning")


async def seed(rt: Runtime, records: int) -> uuid.UUID:
    """A patient with `records` records and the rest of a history in proportion (see above)."""
    tag = uuid.uuid4().hex[:8]
    async with rt.unit_of_work() as session:
        doctor = await rt.accounts.create_with_password(
            session, f"dr.{tag}@clinic.example", Role.DOCTOR, "Dr Bench", "General practice",
            PASSWORD)
        patient = await rt.accounts.create_with_password(
            session, f"patient.{tag}@clinic.example", Role.PATIENT, "Bea Bench", None,
            PASSWORD)
    doctor_id, patient_id = doctor.id, patient.id
    envelope = rt.envelope
    actor = Actor(doctor_id, Role.DOCTOR)
    for first in range(0, records, BATCH):
        async with rt.unit_of_work() as session:
            now = utcnow()
            for n in range(first, min(first + BATCH, records)):
                record = MedicalRecord(id=uuid.uuid4(), patient_id=patient_id,
                                       author_id=doctor_id, latest_version=1, created_at=now,
                                       updated_at=now)
                session.add(record)
                versions = 2 if n % 5 == 0 else 1
                for version in range(1, versions + 1):
                    row_id = uuid.uuid4()
                    cipher = new_row_cipher(session, envelope, "medical_record_versions", row_id)
                    session.add(MedicalRecordVersion(
                        id=row_id, record_id=record.id, version=version, author_id=doctor_id,
                        data_key_id=cipher.data_key_id,
                        diagnosis=cipher.seal("diagnosis", f"Mild persistent asthma ({n})"),
                        prescriptions=cipher.seal("prescriptions", json.dumps(
                            ["Budesonide 200 mcg twice daily", "Salbutamol as needed"])),
                        notes=cipher.seal("notes", NOTES), created_at=now))
                record.latest_version = versions
                audit.record(session, Action.CREATE_MEDICAL_RECORD, actor=actor,
                             resource_type="medical_record", resource_id=record.id,
                             patient_id=patient_id, metadata={"version": 1})
                if n % 5 == 0:
                    row_id = uuid.uuid4()
                    cipher = new_row_cipher(session, envelope, "prescriptions", row_id)
                    session.add(Prescription(
                        id=row_id, patient_id=patient_id, doctor_id=doctor_id,
                        data_key_id=cipher.data_key_id,
                        medication=cipher.seal("medication", "Budesonide"),
                        dosage=cipher.seal("dosage", "200 mcg"),
                        instructions=cipher.seal("instructions", "Twice a day, rinse mouth"),
                        created_at=now))
                if n % 10 == 0:
                    row_id = uuid.uuid4()
                    cipher = new_row_cipher(session, envelope, "consultations", row_id)
                    session.add(Consultation(
                        id=row_id, patient_id=patient_id, doctor_id=doctor_id,
                        data_key_id=cipher.data_key_id, scheduled_at=now, status="completed",
                        reason=cipher.seal("reason", "Follow-up of asthma control"),
                        notes=cipher.seal("notes", NOTES), created_by=patient_id,
                        created_at=now, updated_at=now))
                    await session.flush()
                    session.add(Payment(id=uuid.uuid4(), patient_id=patient_id,
                                        consultation_id=row_id, amount=4500, currency="EUR",
                                        status="pending", provider_reference=f"pi_{n}",
                                        created_at=now))
                if n % 100 == 0:
                    row_id = uuid.uuid4()
                    cipher = new_row_cipher(session, envelope, "attachments", row_id)
                    session.add(Attachment(
                        id=row_id, patient_id=patient_id, uploader_id=doctor_id,
                        data_key_id=cipher.data_key_id,
                        filename=cipher.seal("filename", f"spirometry-{n}.pdf"),
                        content_type="application/pdf", size=250_000, segments=4,
                        complete=True, created_at=now))
                    row_id = uuid.uuid4()
                    cipher = new_row_cipher(session, envelope, "notifications", row_id)
                    session.add(Notification(
                        id=row_id, user_id=patient_id, data_key_id=cipher.data_key_id,
                        kind="consultation_proposed",
                        text=cipher.seal("text", "A doctor proposed a consultation."),
                        created_at=now, read_at=None))
    async with rt.unit_of_work() as session:
        for version in (2, 3):
            session.add(Consent(id=uuid.uuid4(), patient_id=patient_id, version=version,
                                marketing=False, data_sharing=True, analytics=version == 3,
                                consent_date=utcnow()))
    return patient_id


def current_rss_kib() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


async def child(database_url: str, patient: str, warm: str, fmt: ExportFormat,
                mode: str) -> dict[str, Any]:
    rt = Runtime.from_settings(settings_from_env(database_url), pool_size=2)
    try:
        async def run(patient_id: uuid.UUID) -> tuple[int, int]:
            start = await export.begin(rt, patient_id)
            size = items = 0
            async for chunk in export.chunks(rt, start, fmt):  # what `stream` sends
                size += len(chunk.data)
                items += chunk.items
            return size, items

        await run(uuid.UUID(warm))
        gc.collect()
        rss_before = current_rss_kib()
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if mode == "tracemalloc":
            tracemalloc.start()
        started = time.perf_counter()
        size, items = await run(uuid.UUID(patient))
        seconds = time.perf_counter() - started
        traced = tracemalloc.get_traced_memory()[1] if mode == "tracemalloc" else None
        tracemalloc.stop()
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        answer: dict[str, Any] = {"bytes": size, "items": items, "seconds": round(seconds, 3),
                                  "items_per_second": round(items / seconds)}
        if traced is not None:
            answer["tracemalloc_peak_bytes"] = traced
        else:
            answer.update({
                "megabytes_per_second": round(size / 1e6 / seconds, 2),
                "rss_before_export_kib": rss_before,
                "ru_maxrss_after_export_kib": maxrss_after,
                # ru_maxrss can lag the current RSS by a few pages: never below zero.
                "peak_over_rss_before_kib": max(0, maxrss_after - rss_before),
                "ru_maxrss_growth_kib": maxrss_after - maxrss_before,
            })
        return answer
    finally:
        await rt.close()


def run_child(env: dict[str, str], database_url: str, patient: uuid.UUID, warm: uuid.UUID,
              fmt: ExportFormat, mode: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", "--database-url", database_url, "--patient",
         str(patient), "--warm", str(warm), "--format", str(fmt), "--mode", mode],
        capture_output=True, text=True, env=env, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr[-3000:]}")
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


async def prepare(database_url: str, counts: list[int]) -> tuple[dict[int, uuid.UUID],
                                                                   uuid.UUID, str, float]:
    rt = Runtime.from_settings(settings_from_env(database_url), chain_after_commit=True)
    try:
        await upgrade(rt.engine)
        seeded = time.perf_counter()
        warm = await seed(rt, 20)
        patients = {count: await seed(rt, count) for count in counts}
        seconds = time.perf_counter() - seeded
        async with rt.sessions() as session:
            server = str((await session.execute(text("SHOW server_version"))).scalar_one())
    finally:
        await rt.close()
    return patients, warm, server, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", default="1000,10000",
                        help="Comma-separated record counts, one patient each.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--patient", help=argparse.SUPPRESS)
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    parser.add_argument("--format", choices=[f.value for f in ExportFormat],
                        help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("rss", "tracemalloc"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.database_url, args.patient, args.warm,
                                           ExportFormat(args.format), args.mode))))
        return

    counts = [int(part) for part in args.records.split(",")]
    load = os.getloadavg()  # a shared machine: its other work slows the figures down
    database = f"phivault_bench_export_{uuid.uuid4().hex[:8]}"
    keys = {"PHIVAULT_MASTER_KEYS": generate_key_line(KeyKind.MASTER),
            "PHIVAULT_INDEX_KEY": generate_key_line(KeyKind.INDEX),
            "PHIVAULT_AUDIT_KEY": generate_key_line(KeyKind.AUDIT),
            "PHIVAULT_JWT_KEYS": generate_key_line(KeyKind.JWT)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
    env.update(keys)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent / "src"),
                                         str(Path(__file__).parent)])
    os.environ.update(keys)
    url = pg_url(database)
    asyncio.run(pg_admin(f'CREATE DATABASE "{database}"'))
    try:
        patients, warm, server, seeding = asyncio.run(prepare(url, counts))
        print(f"seeded {sum(counts)} records in {seeding:.1f} s", flush=True)
        figures: dict[str, Any] = {}
        for count, patient in patients.items():
            per_format: dict[str, Any] = {}
            for fmt in ExportFormat:
                rss = run_child(env, url, patient, warm, fmt, "rss")
                traced = run_child(env, url, patient, warm, fmt, "tracemalloc")
                per_format[str(fmt)] = {
                    **rss, "tracemalloc_peak_bytes": traced["tracemalloc_peak_bytes"],
                    "tracemalloc_run_seconds": traced["seconds"]}
                print(count, fmt, json.dumps(per_format[str(fmt)]), flush=True)
            figures[str(count)] = {
                "records": count, "record_versions": count + (count + 4) // 5,
                "access_log_entries": count, **per_format}
    finally:
        asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))

    small, large = figures[str(min(counts))], figures[str(max(counts))]
    flat = {}
    for fmt in ExportFormat:
        a, b = small[str(fmt)], large[str(fmt)]
        flat[str(fmt)] = {
            "tracemalloc_peak_ratio_large_to_small": round(
                b["tracemalloc_peak_bytes"] / a["tracemalloc_peak_bytes"], 2),
            "rss_peak_growth_kib": {"small": a["peak_over_rss_before_kib"],
                                    "large": b["peak_over_rss_before_kib"]},
            "document_ratio_large_to_small": round(b["bytes"] / a["bytes"], 2),
            "memory_flat": b["tracemalloc_peak_bytes"] <= FLAT_FACTOR
            * a["tracemalloc_peak_bytes"] + 256 * 1024
            and b["peak_over_rss_before_kib"] <= FLAT_FACTOR * a["peak_over_rss_before_kib"]
            + 4096,
        }
    result = {
        "machine": {**machine_info(postgresql=server),
                    "load_average_at_start": [round(x, 2) for x in load]},
        "command": "PYTHONPATH=src python bench/export_bench.py"
                   + (f" --records {args.records}" if args.records != "1000,10000" else ""),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "page_size": export.PAGE_SIZE,
        "method": (
            "Each case in a fresh subprocess: a warm-up export of a 20-record patient, then "
            "the export streamed (privacy.export.stream, what GET /me/export sends) into a byte "
            "counter. 'rss' child: time and ru_maxrss around the export, untraced; "
            "'tracemalloc' child: tracemalloc's peak over the export alone (slower). PostgreSQL "
            "through asyncpg on the same host; a scratch database, dropped afterwards."),
        "flat_factor": FLAT_FACTOR,
        "memory": flat,
        "memory_flat": all(entry["memory_flat"] for entry in flat.values()),
        "patients": figures,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"memory": flat, "memory_flat": result["memory_flat"]}, indent=2))


if __name__ == "__main__":
    main()
