"""Recording audit events in the caller's transaction, queueing them at commit, and verifying
the stored chain.

Services call `record(session, ...)`; the events wait in the session until the unit of work
commits, then `enqueue` inserts them, each with its own MAC, into `audit_queue` in that same
transaction. So an action and its events commit or roll back together, and no request waits for
another: the sequencer (`sequencer.py`) chains committed events afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import bindparam, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from phivault.audit.actions import Action, Outcome
from phivault.audit.chain import (
    VerifyResult,
    canonical_fields,
    queue_mac,
)
from phivault.audit.models import AuditEvent, QueuedEvent, RejectedEvent
from phivault.audit.sequencer import (
    MAX_MERGE_DELAY_SECONDS,
    QUEUE_COLUMNS,
    Sequencer,
    queued_event_intact,
)
from phivault.audit.verify import Anchor, verify_chain
from phivault.db.base import core_table, utcnow
from phivault.db.engine import READ_ONLY
from phivault.request_context import Actor, current_actor, current_request

PENDING_KEY = "phivault.audit.pending"
VERIFY_BATCH = 5000

# The only metadata keys an event may carry: ids, counts, codes, flags and times, never free
# text (a break-glass reason is PHI: it is sealed in its grant, not written here; `reason` is a
# denial's code). An allowlist, so a new key is a decision made here, never PHI slipping in under
# a new name. The `filter_*` keys, `since`, `until`, `order` and `limit` record an auditor's
# search (`GET /audit`): ids, enum values and times, validated before they get here.
METADATA_KEYS = frozenset({
    "active", "analytics", "basis", "break_glass", "content_type", "count", "data_sharing",
    "events", "expires_at", "filter_action", "filter_actor_id", "filter_outcome",
    "filter_patient_id", "filter_resource_id", "filter_resource_type", "first_bad_seq", "from",
    "format",  # an export's format (jsonl, fhir)
    "history", "imported", "limit", "listing", "marketing", "mfa_enrollment", "notes_changed",
    "offset", "ok", "order", "reason", "rescheduled", "rewrapped", "failed", "role",
    "session_id", "sessions_revoked", "since", "size", "skipped", "status", "to", "until",
    "version", "versions", "via",
    "accounts", "reindexed",  # `keys reindex`: accounts seen, indexes made again
    "changed", "route",  # the no-op PATCH /users marker; a refused route's template
    # A break-glass grant's HMAC (hex) over its id, patient, doctor and reason: not PHI, for
    # without the key derived from the audit key it cannot be reversed or checked against a
    # guessed reason; it lets the chain vouch for the sealed reason (access/break_glass.py).
    "reason_mac",
    # Data-subject rights (SPEC §9): the names of rectified profile fields (from the request
    # model's field names, never values); proof-of-consent reads (`at`, a flag); what an
    # erasure did (counts); a research export's size (counts and its kind).
    "fields", "at", "already_erased", "notifications_deleted", "consultations_cancelled",
    "data_keys_destroyed", "kind", "patients", "records", "suppressed",
    # How an approved staff account's setup token left (SPEC §6): `mail` or `answer`.
    "delivery",
    # A notification marked read that was read already (its read_at stays): a flag.
    "already_read",
})


class HoldsEvents(Protocol):
    """Where recorded events wait to be written: a unit of work's session, or the work of the
    direct path (`db/direct.py`)."""

    @property
    def info(self) -> dict[Any, Any]: ...


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
    session: HoldsEvents,
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


def take_pending(session: HoldsEvents, *, durable_only: bool = False) -> list[PendingEvent]:
    """Remove and return the events queued in `session`."""
    pending: list[PendingEvent] = session.info.pop(PENDING_KEY, [])
    return [e for e in pending if e.durable] if durable_only else pending


def requeue(session: AsyncSession, events: list[PendingEvent]) -> None:
    """Put events taken by `take_pending` back in front of any queued since."""
    session.info[PENDING_KEY] = events + session.info.get(PENDING_KEY, [])


_EVENTS = core_table(AuditEvent)
_QUEUE = core_table(QueuedEvent)
_REJECTED = core_table(RejectedEvent)
_ENQUEUE = insert(_QUEUE)


def queued_row(key: bytes, pending: PendingEvent, at: datetime) -> dict[str, Any]:
    """The queue row of one event, with its MAC (`queue_mac`) over its id and fields."""
    event_id = uuid.uuid4()
    fields = (0, at, pending.actor.id, pending.actor.role, str(pending.action),
              pending.resource_type, pending.resource_id, pending.patient_id,
              str(pending.outcome), pending.ip, pending.user_agent, pending.request_id,
              pending.metadata)
    return {
        "event_id": event_id, "at": at, "actor_id": pending.actor.id,
        "actor_role": pending.actor.role, "action": str(pending.action),
        "resource_type": pending.resource_type, "resource_id": pending.resource_id,
        "patient_id": pending.patient_id, "outcome": str(pending.outcome), "ip": pending.ip,
        "user_agent": pending.user_agent, "request_id": pending.request_id,
        "metadata": pending.metadata,
        "mac": queue_mac(key, event_id, canonical_fields(*fields)),
    }


async def enqueue(session: AsyncSession, queue_key: bytes, events: list[PendingEvent]) -> None:
    """Insert `events` into the audit queue inside `session`'s transaction (the caller commits).

    Nothing here reads or locks the chain's head, so concurrent requests never wait for each
    other; the sequencer chains the events once they are committed (SPEC §8).
    """
    if not events:
        return
    at = utcnow()
    await session.execute(_ENQUEUE, [queued_row(queue_key, pending, at) for pending in events])


_QUEUE_BATCH = (select(*QUEUE_COLUMNS).where(_QUEUE.c.id > bindparam("after"))
                .order_by(_QUEUE.c.id).limit(VERIFY_BATCH))


async def verify(session: AsyncSession, key: bytes, queue_key: bytes | None = None, *,
                 checkpoint: Anchor | None = None, processes: int | None = None,
                 ranges: int | None = None) -> VerifyResult:
    """Recompute the chain from the database, and (given `queue_key`) check the MAC of every
    event still queued.

    `verify.verify_chain` does the work: streamed in constant memory, in parallel `seq` ranges
    on PostgreSQL, whole or (with a `checkpoint`, a signed head already proven) only after it.
    It runs on one snapshot (REPEATABLE READ on PostgreSQL; SQLite's transaction is one
    already), so events that the sequencer chains meanwhile are neither counted nor mistaken
    for events inserted around the head. Call it on a session that has not run a query yet.
    """
    result = await verify_chain(session, key, anchor=checkpoint, processes=processes,
                                ranges=ranges)
    if queue_key is None:
        return result
    tampered = await tampered_queue_ids(session, queue_key)
    return replace(result, ok=result.ok and not tampered, queue_tampered=tampered)


async def tampered_queue_ids(session: AsyncSession, queue_key: bytes) -> tuple[int, ...]:
    """The queue ids of events the sequencer rejected (kept in `audit_queue_rejected`), and of
    queued events that no longer match their MAC, read in batches."""
    tampered = list((await session.execute(select(_REJECTED.c.id).order_by(_REJECTED.c.id)))
                    .scalars())
    last = 0
    while True:
        rows = (await session.execute(_QUEUE_BATCH, {"after": last})).all()
        if not rows:
            return tuple(tampered)
        tampered.extend(row.id for row in rows if not queued_event_intact(queue_key, row))
        last = rows[-1].id


async def stale_queued(session: AsyncSession) -> int:
    """How many queued events have waited longer than the maximum merge delay (a read-only
    transaction: on SQLite it must not queue for the write lock)."""
    await session.connection(execution_options={READ_ONLY: True})
    cutoff = utcnow() - timedelta(seconds=MAX_MERGE_DELAY_SECONDS)
    return int((await session.execute(
        select(func.count()).select_from(_QUEUE).where(_QUEUE.c.at < cutoff))).scalar_one())


async def verify_snapshot(sessions: async_sessionmaker[AsyncSession], key: bytes,
                          sequencer: Sequencer | None = None,
                          queue_key: bytes | None = None, *, checkpoint: Anchor | None = None,
                          processes: int | None = None, ranges: int | None = None
                          ) -> VerifyResult:
    """Verify in a read-only session of its own, apart from the caller's unit of work.

    With a `sequencer`, it first counts the queued events older than the merge delay, then
    chains everything committed (SPEC §8: readers sequence first), then verifies; with a
    `queue_key` it also checks every event still queued. `checkpoint`, `processes` and
    `ranges` go to `verify`.
    """
    stale = 0
    if sequencer is not None:
        async with sessions() as session:
            stale = await stale_queued(session)
            await session.rollback()
        await sequencer.drain()
    async with sessions() as session:
        try:
            result = await verify(session, key, queue_key, checkpoint=checkpoint,
                                  processes=processes, ranges=ranges)
        finally:
            await session.rollback()
    return replace(result, queue_stale=stale)
