"""Benchmark the audit chain: verification rate (SPEC §14: >= 200,000 events/s) and the rate of
concurrent appends through the unit of work, on SQLite and PostgreSQL.

Run from the repository root: `PYTHONPATH=src python bench/audit_bench.py [--events N]`.
Writes bench/results/audit.json. PostgreSQL is at PHIVAULT_TEST_DATABASE_URL (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test); the benchmark makes and drops a database
`phivault_bench` beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import insert, update

from harness import (  # type: ignore[import-not-found]
    PG,
    machine_info,
    pg_admin,
)
from phivault.audit import service
from phivault.audit.actions import Action
from phivault.audit.chain import (
    GENESIS_HASH,
    ChainedEvent,
    ChainVerifier,
    canonical_json,
    chain_hash,
)
from phivault.audit.models import AuditEvent, AuditHead
from phivault.config import load_settings
from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.db.migrate import upgrade
from phivault.runtime import Runtime

RESULT = Path(__file__).parent / "results" / "audit.json"
TARGET = 200_000


def make_events(key: bytes, count: int) -> list[ChainedEvent]:
    """A realistic chain: a doctor reading records of patients, from one address."""
    events, prev = [], GENESIS_HASH
    at = datetime.datetime.now(datetime.UTC)
    actor, patients = uuid.uuid4(), [uuid.uuid4() for _ in range(100)]
    for seq in range(1, count + 1):
        event = ChainedEvent(
            seq=seq, at=at, actor_id=actor, actor_role="doctor",
            action="VIEW_MEDICAL_RECORD", resource_type="medical_record",
            resource_id=str(uuid.uuid4()), patient_id=patients[seq % 100], outcome="success",
            ip="203.0.113.7", user_agent="clinic-app/4.2 (iPad)", request_id=uuid.uuid4().hex,
            metadata={"version": 1}, prev_hash=prev, hash=b"",
        )
        digest = chain_hash(key, prev, canonical_json(event))
        events.append(event._replace(hash=digest))
        prev = digest
    return events


async def load(rt: Runtime, events: list[ChainedEvent]) -> None:
    rows = [{
        "seq": e.seq, "at": e.at, "actor_id": e.actor_id, "actor_role": e.actor_role,
        "action": e.action, "resource_type": e.resource_type, "resource_id": e.resource_id,
        "patient_id": e.patient_id, "outcome": e.outcome, "ip": e.ip,
        "user_agent": e.user_agent, "request_id": e.request_id,
        "event_metadata": dict(e.metadata), "prev_hash": e.prev_hash, "hash": e.hash,
    } for e in events]
    async with rt.sessions() as session:
        for start in range(0, len(rows), 10_000):
            await session.execute(insert(AuditEvent), rows[start:start + 10_000])
        await session.execute(update(AuditHead).where(AuditHead.id == 1)
                              .values(seq=events[-1].seq, hash=events[-1].hash))
        await session.commit()


async def verify_rate(rt: Runtime, count: int, rounds: int = 3) -> dict[str, Any]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = await service.verify_snapshot(rt.sessions, rt.audit_key)
        times.append(time.perf_counter() - start)
        assert result.ok and result.events == count, result
    best = min(times)
    return {"events": count, "seconds_median": round(statistics.median(times), 3),
            "events_per_second_median": round(count / statistics.median(times)),
            "events_per_second_best": round(count / best)}


async def append_rate(rt: Runtime, count: int, concurrency: int) -> dict[str, Any]:
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            async with rt.unit_of_work() as session:
                service.record(session, Action.VIEW_PRESCRIPTION, metadata={"count": i})

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return {"transactions": count, "concurrency": concurrency,
            "transactions_per_second": round(count / seconds)}


def settings_for(url: str) -> Any:
    return load_settings(
        database_url=url, master_keys=generate_key_line(KeyKind.MASTER),
        index_key=generate_key_line(KeyKind.INDEX), audit_key=generate_key_line(KeyKind.AUDIT),
        jwt_keys=generate_key_line(KeyKind.JWT))


async def run_backend(name: str, url: str, count: int) -> dict[str, Any]:
    rt = Runtime.from_settings(settings_for(url), pool_size=16)
    try:
        await upgrade(rt.engine)
        events = make_events(rt.audit_key, count)
        await load(rt, events)
        verified = await verify_rate(rt, count)
        appended = await append_rate(rt, 2000, 32)
        return {"verify": verified, "append": appended}
    finally:
        await rt.close()


def in_memory_rate(count: int) -> dict[str, Any]:
    key = os.urandom(32)
    events = make_events(key, count)
    times = []
    for _ in range(3):
        verifier = ChainVerifier(key)
        start = time.perf_counter()
        verifier.feed(events)
        result = verifier.finish(count, events[-1].hash)
        times.append(time.perf_counter() - start)
        assert result.ok
    return {"events": count, "events_per_second_median": round(count / statistics.median(times))}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    results: dict[str, Any] = {"in_memory": in_memory_rate(args.events)}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = await run_backend("sqlite", f"sqlite+aiosqlite:///{tmp}/b.db",
                                              args.events)
    await pg_admin('DROP DATABASE IF EXISTS "phivault_bench" WITH (FORCE)')
    await pg_admin('CREATE DATABASE "phivault_bench"')
    try:
        results["postgres"] = await run_backend(
            "postgres", PG.rsplit("/", 1)[0] + "/phivault_bench", args.events)
    finally:
        await pg_admin('DROP DATABASE IF EXISTS "phivault_bench" WITH (FORCE)')
    best = results["postgres"]["verify"]["events_per_second_median"]
    document = {
        "machine": machine_info(),
        "command": f"PYTHONPATH=src python bench/audit_bench.py --events {args.events}",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target_verify_events_per_second": TARGET,
        "meets_target_postgres": best >= TARGET,
        **results,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
