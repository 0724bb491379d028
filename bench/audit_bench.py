"""Benchmark the audit trail (SPEC §14): verification, >= 200,000 events/s from PostgreSQL over
1,000,000 events, and from a signed checkpoint a cost proportional to the events after it; then
the append through the queue and the sequencer against plain inserts (>= 0.8) and the merge
delay (bench/audit_append.py).

Run from the repository root: `PYTHONPATH=src python bench/audit_bench.py [--events N]
[--append-transactions N]`. Writes the "verify" and "append" keys of bench/results/audit.json.
PostgreSQL is at PHIVAULT_TEST_DATABASE_URL (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test); the benchmark makes and drops scratch
databases beside it.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from sqlalchemy import insert, select, update

from audit_append import merge_into_result  # type: ignore[import-not-found]
from audit_append import run as append_run  # type: ignore[import-not-found]
from harness import (  # type: ignore[import-not-found]
    PG,
    machine_info,
    pg_admin,
)
from phivault.audit import service
from phivault.audit.chain import GENESIS_HASH, ChainedEvent, canonical_json
from phivault.audit.models import AuditEvent, AuditHead
from phivault.audit.verify import Anchor
from phivault.audit.verify_range import ChainMac
from phivault.config import load_settings
from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.db.base import core_table
from phivault.db.migrate import upgrade
from phivault.runtime import Runtime

RESULT = Path(__file__).parent / "results" / "audit.json"
TARGET = 200_000
# What earlier versions of this script wrote, superseded by the "verify" key.
LEGACY_KEYS = ("in_memory", "target_verify_events_per_second", "meets_target_postgres")
COLUMNS = list(ChainedEvent._fields)


def make_events(key: bytes, count: int) -> Iterator[tuple[Any, ...]]:
    """A realistic trail, chained: doctors reading records (most events), sign-ins and token
    refreshes, and anonymous failed logins with their NULLs; one event in ten carries metadata
    of several keys, stored in the order the code wrote them (not sorted)."""
    mac = ChainMac(key)
    prev = GENESIS_HASH
    start = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)
    doctors = [uuid.uuid4() for _ in range(40)]
    patients = [uuid.uuid4() for _ in range(5000)]
    agents = ["clinic-app/4.2 (iPad; iOS 18.1)", "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
              "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0"]
    for seq in range(1, count + 1):
        kind = seq % 20
        doctor = doctors[seq % 40]
        at = start + datetime.timedelta(microseconds=seq * 2_593_417)
        common = dict(seq=seq, at=at, ip=f"203.0.113.{seq % 250}",
                      user_agent=agents[seq % 3], request_id=uuid.uuid4().hex,
                      prev_hash=prev, hash=b"")
        if kind == 0:
            event = ChainedEvent(actor_id=None, actor_role=None, action="LOGIN_FAILURE",
                                 resource_type=None, resource_id=None, patient_id=None,
                                 outcome="denied", metadata={"reason": "invalid_credentials"},
                                 **common)
        elif kind in (1, 2):
            event = ChainedEvent(actor_id=doctor, actor_role="doctor",
                                 action="LOGIN_SUCCESS" if kind == 1 else "TOKEN_REFRESH",
                                 resource_type=None, resource_id=None, patient_id=None,
                                 outcome="success", metadata={}, **common)
        else:
            metadata: dict[str, Any] = ({"version": seq % 7, "break_glass": False, "basis":
                                         "care"} if kind == 3 else {"version": seq % 7})
            event = ChainedEvent(actor_id=doctor, actor_role="doctor",
                                 action="VIEW_MEDICAL_RECORD", resource_type="medical_record",
                                 resource_id=str(uuid.uuid4()),
                                 patient_id=patients[seq % 5000], outcome="success",
                                 metadata=metadata, **common)
        digest = mac.digest(prev + canonical_json(event))
        yield (*event[:-3], orjson.dumps(event.metadata), prev, digest)
        prev = digest


async def load_postgres(url: str, key: bytes, count: int) -> None:
    """COPY the chain in (not timed), move the head, and ANALYZE."""
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql", 1))
    try:
        await connection.set_type_codec("json", schema="pg_catalog", format="binary",
                                        encoder=lambda raw: raw, decoder=lambda raw: raw)
        batch: list[tuple[Any, ...]] = []
        last: tuple[Any, ...] = ()
        for row in make_events(key, count):
            batch.append(row)
            if len(batch) == 50_000:
                await connection.copy_records_to_table("audit_events", records=batch,
                                                       columns=COLUMNS)
                last, batch = batch[-1], []
        if batch:
            await connection.copy_records_to_table("audit_events", records=batch,
                                                   columns=COLUMNS)
            last = batch[-1]
        await connection.execute("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1",
                                 last[0], last[-1])
        await connection.execute("VACUUM ANALYZE audit_events")
    finally:
        await connection.close()


async def load_rows(rt: Runtime, count: int) -> None:
    """Insert the chain through SQLAlchemy (SQLite)."""
    table = core_table(AuditEvent)
    async with rt.engine.begin() as connection:
        batch: list[dict[str, Any]] = []
        last: dict[str, Any] = {}
        for row in make_events(rt.audit_key, count):
            values = dict(zip(COLUMNS, row, strict=True))
            values["metadata"] = orjson.loads(values["metadata"])
            batch.append(values)
            if len(batch) == 10_000:
                await connection.execute(insert(table), batch)
                last, batch = batch[-1], []
        if batch:
            await connection.execute(insert(table), batch)
            last = batch[-1]
        await connection.execute(update(AuditHead).where(AuditHead.id == 1)
                                 .values(seq=last["seq"], hash=last["hash"]))


async def timed_verify(rt: Runtime, expected: int, rounds: int, **options: Any
                       ) -> dict[str, Any]:
    """Verify `rounds` times; seconds and events/s (median and best), and this process's CPU
    time (the rest runs in the worker processes and the database server)."""
    seconds, cpu = [], []
    for _ in range(rounds):
        wall, own = time.perf_counter(), time.process_time()
        result = await service.verify_snapshot(rt.sessions, rt.audit_key, **options)
        seconds.append(time.perf_counter() - wall)
        cpu.append(time.process_time() - own)
        assert result.ok and result.events == expected, result
    median, best = statistics.median(seconds), min(seconds)
    return {"events": expected, "rounds": rounds, "seconds_median": round(median, 3),
            "seconds_best": round(best, 3),
            "events_per_second_median": round(expected / median),
            "events_per_second_best": round(expected / best),
            "coordinator_cpu_seconds_median": round(statistics.median(cpu), 3)}


async def verify_figures(rt: Runtime, count: int, rounds: int,
                         tails: tuple[int, ...]) -> dict[str, Any]:
    """The whole chain (in parallel ranges, and in one process for comparison), then from
    checkpoints `tails` events before the head."""
    figures: dict[str, Any] = {
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "full": await timed_verify(rt, count, rounds),
        "full_one_process": await timed_verify(rt, count, rounds, processes=1, ranges=1),
    }
    from_checkpoint = []
    for tail in tails:
        # The head a checkpoint taken `tail` events ago signed (its signature check, a few
        # microseconds, is the CLI's and not timed here).
        async with rt.sessions() as session:
            digest = (await session.execute(select(AuditEvent.hash).where(
                AuditEvent.seq == count - tail))).scalar_one()
        measured = await timed_verify(rt, tail, rounds, checkpoint=Anchor(count - tail, digest))
        from_checkpoint.append({"checkpoint_seq": count - tail, **measured})
    figures["from_checkpoint"] = from_checkpoint
    return figures


def settings_for(url: str) -> Any:
    return load_settings(
        database_url=url, master_keys=generate_key_line(KeyKind.MASTER),
        index_key=generate_key_line(KeyKind.INDEX), audit_key=generate_key_line(KeyKind.AUDIT),
        jwt_keys=generate_key_line(KeyKind.JWT))


async def run_postgres(count: int, rounds: int, tails: tuple[int, ...]) -> dict[str, Any]:
    url = PG.rsplit("/", 1)[0] + "/phivault_bench"
    await pg_admin('DROP DATABASE IF EXISTS "phivault_bench" WITH (FORCE)')
    await pg_admin('CREATE DATABASE "phivault_bench"')
    rt = Runtime.from_settings(settings_for(url), pool_size=4)
    try:
        await upgrade(rt.engine)
        started = time.perf_counter()
        await load_postgres(url, rt.audit_key, count)
        print(f"loaded {count} events in {time.perf_counter() - started:.0f} s", flush=True)
        return await verify_figures(rt, count, rounds, tails)
    finally:
        await rt.close()
        await pg_admin('DROP DATABASE IF EXISTS "phivault_bench" WITH (FORCE)')


async def run_sqlite(count: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        rt = Runtime.from_settings(settings_for(f"sqlite+aiosqlite:///{tmp}/b.db"))
        try:
            await upgrade(rt.engine)
            await load_rows(rt, count)
            return {"full": await timed_verify(rt, count, rounds)}
        finally:
            await rt.close()


def write_result(key: str, value: dict[str, Any]) -> dict[str, Any]:
    """Set `key` in bench/results/audit.json, keeping what other benchmarks wrote there."""
    document: dict[str, Any] = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    for legacy in LEGACY_KEYS:
        document.pop(legacy, None)
    for backend in ("sqlite", "postgres"):  # the old layout: {"verify": ..., "append": ...}
        if isinstance(document.get(backend), dict):
            document[backend].pop("verify", None)
    document[key] = value
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(document, indent=2) + "\n")
    return document


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sqlite-events", type=int, default=100_000,
                        help="events for the SQLite figure (0: skip it)")
    parser.add_argument("--append-transactions", type=int, default=10_000,
                        help="one-event transactions per round of the append figure (0: skip)")
    args = parser.parse_args()
    tails = tuple(t for t in (10_000, 100_000) if t < args.events)
    postgres = await run_postgres(args.events, args.rounds, tails)
    full = postgres["full"]["events_per_second_median"]
    figures: dict[str, Any] = {
        "machine": machine_info(),
        "command": (f"PYTHONPATH=src python bench/audit_bench.py --events {args.events} "
                    f"--rounds {args.rounds} --sqlite-events {args.sqlite_events}"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target_events_per_second": TARGET,
        "meets_target_postgres": full >= TARGET,
        "postgres": postgres,
    }
    if args.sqlite_events:
        figures["sqlite"] = await run_sqlite(args.sqlite_events, args.rounds)
    write_result("verify", figures)
    print(json.dumps(figures, indent=2))
    if args.append_transactions:
        # The append figure and the merge delay (bench/audit_append.py), into the same file.
        appended = await append_run(args.append_transactions)
        merge_into_result(appended, "PYTHONPATH=src python bench/audit_bench.py "
                                    f"--append-transactions {args.append_transactions}")
        print(json.dumps(appended, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
