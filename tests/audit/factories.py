"""Chains of audit events written straight into a test database: valid (chained with the
runtime's audit key, as the sequencer would) and quick to make in the tens of thousands, for
tests of verification at scale. Tests of appending go through `record()` instead."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, text, update

from phivault.audit import timeline
from phivault.audit.chain import ChainedEvent, canonical_json, chain_hash
from phivault.audit.models import AuditEvent, AuditHead
from phivault.db.base import core_table
from phivault.runtime import Runtime

_INSERT = insert(core_table(AuditEvent))

START = datetime(2026, 12, 1, 8, 0, 0, tzinfo=UTC)
_USER_AGENTS = ("clinic-app/4.2 (iPad)", "Mozilla/5.0 (X11; Linux x86_64)", None)


def _steady(seq: int) -> datetime:
    return START + timedelta(microseconds=seq * 1010)


def chain_rows(key: bytes, count: int, *, after_seq: int = 0, after_hash: bytes = bytes(32),
               times: Callable[[int], datetime] = _steady) -> Iterator[dict[str, Any]]:
    """`count` events chained after (`after_seq`, `after_hash`), as rows of `audit_events`:
    doctors reading records, logins with no actor, a few NULLs and varied metadata; event
    `seq` happened at `times(seq)`."""
    prev = after_hash
    doctors = [uuid.uuid4() for _ in range(5)]
    patients = [uuid.uuid4() for _ in range(50)]
    for seq in range(after_seq + 1, after_seq + count + 1):
        anonymous = seq % 7 == 0
        metadata: dict[str, Any] = ({"version": seq % 4} if seq % 3 else
                                    {"ok": True, "count": seq, "basis": "care"})
        event = ChainedEvent(
            seq=seq, at=times(seq),
            actor_id=None if anonymous else doctors[seq % 5],
            actor_role=None if anonymous else "doctor",
            action="LOGIN_FAILURE" if anonymous else "VIEW_MEDICAL_RECORD",
            resource_type=None if anonymous else "medical_record",
            resource_id=None if anonymous else str(uuid.uuid4()),
            patient_id=None if anonymous else patients[seq % 50],
            outcome="denied" if anonymous else "success", ip="203.0.113.7",
            user_agent=_USER_AGENTS[seq % 3], request_id=uuid.uuid4().hex, metadata=metadata,
            prev_hash=prev, hash=b"")
        digest = chain_hash(key, prev, canonical_json(event))
        yield event._replace(hash=digest)._asdict()
        prev = digest


async def write_chain(rt: Runtime, count: int, *, batch: int = 5000,
                      times: Callable[[int], datetime] = _steady, timed: bool = True) -> None:
    """Append `count` synthetic events after the current head, and move the head; with
    `timed`, then store the chain's timing in the head, as a restore would
    (`timeline.recompute`), or the head's timing no longer covers the chain."""
    async with rt.engine.begin() as connection:
        seq, prev = (await connection.execute(
            select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1))).one()
        rows: list[dict[str, Any]] = []
        for row in chain_rows(rt.audit_key, count, after_seq=seq, after_hash=prev,
                              times=times):
            rows.append(row)
            if len(rows) == batch:
                await connection.execute(_INSERT, rows)
                seq, prev, rows = row["seq"], row["hash"], []
        if rows:
            await connection.execute(_INSERT, rows)
            seq, prev = rows[-1]["seq"], rows[-1]["hash"]
        await connection.execute(update(AuditHead).where(AuditHead.id == 1)
                                 .values(seq=seq, hash=prev))
        if timed:
            await connection.run_sync(timeline.recompute)


async def tamper(rt: Runtime, sql: str, **params: Any) -> None:
    """Change the stored trail the way someone with database access would: around the ORM and
    the append-only triggers."""
    async with rt.engine.begin() as connection:
        if rt.engine.dialect.name == "postgresql":
            await connection.execute(text("SET LOCAL session_replication_role = replica"))
        else:
            for trigger in ("audit_events_no_update", "audit_events_no_delete",
                            "audit_head_no_delete", "audit_head_follows_chain"):
                await connection.execute(text(f"DROP TRIGGER IF EXISTS {trigger}"))
        await connection.execute(text(sql), params)
