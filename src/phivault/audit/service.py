"""Recording audit events in the caller's transaction, appending them to the chain at commit,
and verifying the stored chain.

Services call `record(session, ...)`; the events wait in the session until the unit of work
commits, then `append_pending` locks the chain head, numbers and MACs them and inserts them in
that same transaction. So an action and its events commit or roll back together, and the head's
row lock is held only for the last moment of the transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from phivault.audit.actions import Action, Outcome
from phivault.audit.chain import (
    GENESIS_HASH,
    ChainedEvent,
    ChainVerifier,
    VerifyResult,
    canonical_json,
    chain_hash,
)
from phivault.audit.models import AuditEvent, AuditHead
from phivault.db.base import core_table, utcnow
from phivault.db.engine import READ_ONLY
from phivault.request_context import Actor, current_actor, current_request

PENDING_KEY = "phivault.audit.pending"
VERIFY_BATCH = 5000

# The only metadata keys an event may carry: ids, counts, codes, flags, and the reason of a
# denial or a break-glass (free text the doctor writes knowing it is audited). An allowlist, so
# a new key is a decision made here, never PHI slipping in under a new name.
METADATA_KEYS = frozenset({
    "active", "analytics", "basis", "break_glass", "content_type", "count", "data_sharing",
    "events", "expires_at", "first_bad_seq", "from", "history", "imported", "listing",
    "marketing", "mfa_enrollment", "notes_changed", "offset", "ok", "reason", "rescheduled",
    "rewrapped", "failed", "role", "session_id", "sessions_revoked", "size", "skipped", "status",
    "to", "version", "versions", "via",
})


class AuditMetadataError(ValueError):
    """Metadata that could carry PHI or secrets was offered to the audit trail."""


@dataclass(slots=True)
class PendingEvent:
    actor: Actor
    action: Action
    outcome: Outcome
    resource_type: str | None
    resource_id: str | None
    patient_id: uuid.UUID | None
    metadata: dict[str, Any]
    ip: str | None
    user_agent: str | None
    request_id: str
    durable: bool = field(default=False)


def _check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in metadata.items():
        if key not in METADATA_KEYS:
            raise AuditMetadataError(f"audit metadata key {key!r} is not in METADATA_KEYS")
        if not (value is None or isinstance(value, str | int | bool)) or isinstance(value, float):
            raise AuditMetadataError(f"audit metadata {key!r} must be a str, int, bool or None")
        if isinstance(value, str) and len(value) > 1000:
            raise AuditMetadataError(f"audit metadata {key!r} is longer than 1000 characters")
        clean[key] = value
    return clean


def record(
    session: AsyncSession,
    action: Action,
    *,
    actor: Actor | None = None,
    outcome: Outcome = Outcome.SUCCESS,
    resource_type: str | None = None,
    resource_id: str | uuid.UUID | None = None,
    patient_id: uuid.UUID | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Queue an event in `session`; it is appended to the chain when the unit of work commits.

    Events whose outcome is not `success` (denials, failed logins, integrity failures) are
    durable: if the unit of work rolls back, they are still appended in a transaction of their
    own, because the failed attempt is exactly what an auditor needs to see.
    """
    ctx = current_request()
    actor = actor or current_actor()
    pending: list[PendingEvent] = session.info.setdefault(PENDING_KEY, [])
    pending.append(PendingEvent(
        actor=actor, action=action, outcome=outcome, resource_type=resource_type,
        resource_id=str(resource_id) if resource_id is not None else None,
        patient_id=patient_id, metadata=_check_metadata(metadata or {}),
        ip=ctx.ip, user_agent=(ctx.user_agent or None) and ctx.user_agent[:256],
        request_id=ctx.request_id, durable=outcome is not Outcome.SUCCESS,
    ))


def take_pending(session: AsyncSession, *, durable_only: bool = False) -> list[PendingEvent]:
    """Remove and return the events queued in `session`."""
    pending: list[PendingEvent] = session.info.pop(PENDING_KEY, [])
    return [e for e in pending if e.durable] if durable_only else pending


def requeue(session: AsyncSession, events: list[PendingEvent]) -> None:
    """Put events taken by `take_pending` back in front of any queued since."""
    session.info[PENDING_KEY] = events + session.info.get(PENDING_KEY, [])


# The append's three statements, built once (they run in every unit of work that audits), as
# Core statements on the tables: events are written, never loaded back as ORM objects.
_EVENTS = core_table(AuditEvent)
_HEAD = core_table(AuditHead)
_LOCK_HEAD = select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1).with_for_update()
_INSERT_EVENTS = insert(_EVENTS)
_MOVE_HEAD = (update(_HEAD).where(_HEAD.c.id == 1)
              .values(seq=bindparam("new_seq"), hash=bindparam("new_hash")))
# PostgreSQL: the last event and the head's move in one statement (a data-modifying CTE), one
# round trip less while the head is locked. SQLite has no such CTE and runs the two.
_INSERT_LAST_MOVING_HEAD = insert(_EVENTS).add_cte(_MOVE_HEAD.cte("moved_head"))


async def append(session: AsyncSession, key: bytes, events: list[PendingEvent]) -> None:
    """Append `events` to the chain inside `session`'s transaction (the caller commits).

    The head row is read `FOR UPDATE`: on PostgreSQL concurrent appenders wait for each other's
    commit, so `seq` has no gaps and every event names the true predecessor. On SQLite the
    transaction already holds the database's write lock (BEGIN IMMEDIATE).
    """
    if not events:
        return
    seq, prev = (await session.execute(_LOCK_HEAD)).one()
    at = utcnow()
    rows: list[dict[str, Any]] = []
    for pending in events:
        seq += 1
        event = ChainedEvent(
            seq=seq, at=at, actor_id=pending.actor.id, actor_role=pending.actor.role,
            action=str(pending.action), resource_type=pending.resource_type,
            resource_id=pending.resource_id, patient_id=pending.patient_id,
            outcome=str(pending.outcome), ip=pending.ip, user_agent=pending.user_agent,
            request_id=pending.request_id, metadata=pending.metadata, prev_hash=prev,
            hash=b"",
        )
        digest = chain_hash(key, prev, canonical_json(event))
        rows.append(event._replace(hash=digest)._asdict())  # the fields are the column names
        prev = digest
    *earlier, last = rows
    if earlier:
        await session.execute(_INSERT_EVENTS, earlier)
    head = {"new_seq": seq, "new_hash": prev}
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        await session.execute(_INSERT_LAST_MOVING_HEAD, {**last, **head})
    else:
        await session.execute(_INSERT_EVENTS, last)
        await session.execute(_MOVE_HEAD, head)


# The event columns in `ChainedEvent`'s order, read as plain Core rows that the verifier unpacks
# as they are: verification is a hot loop (SPEC §14: 200,000 events/s), too hot for ORM objects
# or a copy of each row.
_CHAIN_COLUMNS = tuple(_EVENTS.c[name] for name in ChainedEvent._fields)
_CHAIN_BATCH = select(*_CHAIN_COLUMNS).order_by(_EVENTS.c.seq).limit(VERIFY_BATCH)


async def verify(session: AsyncSession, key: bytes) -> VerifyResult:
    """Recompute the whole chain from the database, in `seq` order and constant memory.

    Runs on one snapshot (REPEATABLE READ on PostgreSQL; SQLite's transaction is one already),
    so events that other transactions append meanwhile are neither counted nor mistaken for
    events inserted around the head. Call it on a session that has not run a query yet.
    """
    options: dict[str, Any] = {READ_ONLY: True}
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        options["isolation_level"] = "REPEATABLE READ"
    await session.connection(execution_options=options)
    head = (await session.execute(select(AuditHead.seq, AuditHead.hash)
                                  .where(AuditHead.id == 1))).one_or_none()
    head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS_HASH)
    verifier = ChainVerifier(key)
    last: int | None = None  # the first batch has no lower bound: a seq <= 0 is tampering too
    while True:
        query = _CHAIN_BATCH if last is None else _CHAIN_BATCH.where(_EVENTS.c.seq > last)
        rows = (await session.execute(query)).all()
        if not rows:
            break
        verifier.feed(rows)
        last = rows[-1].seq
    return verifier.finish(head_seq, head_hash)


async def verify_snapshot(sessions: async_sessionmaker[AsyncSession], key: bytes) -> VerifyResult:
    """`verify` in a read-only session of its own, apart from the caller's unit of work."""
    async with sessions() as session:
        try:
            return await verify(session, key)
        finally:
            await session.rollback()
