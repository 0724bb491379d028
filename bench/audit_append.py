"""Audit append under concurrency on PostgreSQL (SPEC §14: >= 0.8 of plain inserts), and the
sequencer's merge delay under that load.

32 writers each commit one-event transactions. "queued" goes through the real path: the unit of
work queues the event with its MAC at commit, and a background sequencer (elected by the
advisory lock, as in a server) chains it; the run ends when the last event is chained, not just
queued. "plain" inserts the same rows into an unchained table of the same columns, through the
same session machinery. Rounds alternate, so the machine's noise falls on both alike.

Run alone: `PYTHONPATH=src python bench/audit_append.py [--transactions N]`; it merges its
figures into bench/results/audit.json under "append" (bench/audit_bench.py calls it too).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Column, MetaData, Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from harness import PG, machine_info, pg_admin  # type: ignore[import-not-found]
from phivault.audit import service
from phivault.audit.actions import Action, Outcome
from phivault.audit.models import QueuedEvent
from phivault.config import load_settings
from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.db.base import utcnow
from phivault.db.migrate import upgrade
from phivault.request_context import Actor
from phivault.runtime import Runtime

RESULT = Path(__file__).parent / "results" / "audit.json"
DATABASE = "phivault_bench_append"
TARGET = 0.8
WRITERS = 32

# The unchained table: audit_queue's columns and types, none of its triggers or MAC checks.
_plain_metadata = MetaData()
PLAIN = Table("audit_plain", _plain_metadata,
              *(Column(c.name, c.type, primary_key=c.primary_key, autoincrement=c.autoincrement)
                for c in QueuedEvent.__table__.columns))


def _settings(url: str) -> Any:
    return load_settings(
        database_url=url, master_keys=generate_key_line(KeyKind.MASTER),
        index_key=generate_key_line(KeyKind.INDEX), audit_key=generate_key_line(KeyKind.AUDIT),
        jwt_keys=generate_key_line(KeyKind.JWT))


def _pending(i: int) -> service.PendingEvent:
    return service.PendingEvent(
        actor=Actor(None, "doctor"), action=Action.VIEW_MEDICAL_RECORD, outcome=Outcome.SUCCESS,
        resource_type="medical_record", resource_id=f"{i:032x}", patient_id=None,
        metadata={"version": 1}, ip="203.0.113.7", user_agent="clinic-app/4.2 (iPad)",
        request_id=f"{i:032x}")


async def _writers(count: int, one: Any) -> None:
    numbers = iter(range(count))

    async def writer() -> None:
        for i in numbers:
            await one(i)

    await asyncio.gather(*(writer() for _ in range(WRITERS)))


async def queued_round(rt: Runtime, count: int) -> float:
    async def one(i: int) -> None:
        async with rt.unit_of_work() as session:
            service.record(session, Action.VIEW_MEDICAL_RECORD, resource_type="medical_record",
                           resource_id=f"{i:032x}", metadata={"version": 1})

    start = time.perf_counter()
    await _writers(count, one)
    while await rt.sequencer.sequence_batch() is None or await _queued(rt):
        await asyncio.sleep(0.005)  # the background sequencer is finishing the last batch
    return time.perf_counter() - start


async def _queued(rt: Runtime) -> bool:
    async with rt.sessions() as session:
        return (await session.execute(QueuedEvent.__table__.select().limit(1))).first() is not None


async def plain_round(rt: Runtime, count: int) -> float:
    statement = insert(PLAIN)

    async def one(i: int) -> None:
        session: AsyncSession
        async with rt.sessions() as session:
            row = service.queued_row(rt.queue_key, _pending(i), utcnow())
            await session.execute(statement, row)
            await session.commit()

    start = time.perf_counter()
    await _writers(count, one)
    return time.perf_counter() - start


async def append_figures(url: str, transactions: int, rounds: int = 3) -> dict[str, Any]:
    """Alternating rounds of both variants on the database at `url` (migrated here)."""
    rt = Runtime.from_settings(_settings(url), pool_size=WRITERS, chain_after_commit=False)
    try:
        await upgrade(rt.engine)
        async with rt.engine.begin() as connection:
            await connection.run_sync(_plain_metadata.create_all)
        rt.start_background()
        await queued_round(rt, 500)  # warm-up of both
        await plain_round(rt, 500)
        rt.sequencer.stats.delays.clear()
        seconds: dict[str, list[float]] = {"queued": [], "plain": []}
        for _ in range(rounds):
            seconds["plain"].append(await plain_round(rt, transactions))
            seconds["queued"].append(await queued_round(rt, transactions))
        delays = sorted(rt.sequencer.stats.delays)
        verified = await service.verify_snapshot(rt.sessions, rt.audit_key, rt.sequencer,
                                                 rt.queue_key)
        assert verified.ok, verified
    finally:
        await rt.close()
    per_round = [p / q for q, p in zip(seconds["queued"], seconds["plain"], strict=True)]
    ratio = round(statistics.median(per_round), 3)
    return {
        "writers": WRITERS, "transactions_per_round": transactions, "rounds": rounds,
        "queued_and_chained_per_second": round(transactions / statistics.median(seconds["queued"])),
        "plain_inserts_per_second": round(transactions / statistics.median(seconds["plain"])),
        "ratio": ratio, "target_ratio": TARGET, "meets_target": ratio >= TARGET,
        "merge_delay_ms": {
            "p50": round(1000 * delays[len(delays) // 2], 1),
            "p99": round(1000 * delays[int(len(delays) * 0.99)], 1),
            "max": round(1000 * delays[-1], 1), "events": len(delays),
            "target_max_ms": 1000,
        },
        "chain_verified": True,
    }


async def run(transactions: int) -> dict[str, Any]:
    await pg_admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    await pg_admin(f'CREATE DATABASE "{DATABASE}"')
    try:
        return await append_figures(PG.rsplit("/", 1)[0] + "/" + DATABASE, transactions)
    finally:
        await pg_admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')


def merge_into_result(figures: dict[str, Any], command: str) -> None:
    document: dict[str, Any] = {}
    if RESULT.exists():
        document = json.loads(RESULT.read_text())
    document["append"] = {
        "machine": machine_info(), "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "postgres": figures,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(document, indent=2) + "\n")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transactions", type=int, default=10_000)
    args = parser.parse_args()
    figures = await run(args.transactions)
    merge_into_result(figures, "PYTHONPATH=src python bench/audit_append.py "
                               f"--transactions {args.transactions}")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
