"""The sequencer: moves committed events from `audit_queue` into the chain, in batches.

Requests only insert into the queue, so they never wait for each other (SPEC §8). One batch is
one transaction: it takes the oldest queued events, checks each one's MAC, numbers them
(`seq`, gap-free, in the order taken), chains them (`prev_hash`, `hash`), inserts them into
`audit_events`, deletes them from the queue and moves the head. A crash at any point (even
`kill -9`) therefore loses nothing and duplicates nothing: the transaction commits whole or not
at all.

At most one sequencer works at a time across every process and host: each batch first locks the
head's row (`FOR UPDATE SKIP LOCKED`; released at commit, or when a killed process's connection
drops), which only a role that may UPDATE the head can take (an advisory lock, which SPEC §8
names, can be taken by any role that may connect, so a read-only role could stall the sequencer
with one). On SQLite every write transaction holds the database's one write lock
(`BEGIN IMMEDIATE`). Every server process runs `run_forever`, and whichever gets the lock works;
the others find it taken and try again later. `drain()` waits for the lock instead, so a reader
sees everything committed before it asked.

A queued event whose MAC does not match (edited, forged, unparseable), or a replayed copy of an
event already chained, is never chained (laundering it into the chain would give the edit a valid
hash): it moves, as found, into the append-only `audit_queue_rejected`, where `verify` reports
it, and no such poison row can stall the sequencer.

A database outage stops nothing for good: the background loop logs the error
(`audit_sequencer_error`, with how many failed in a row) and tries again after a pause that
doubles from `RETRY_SECONDS` to `RETRY_MAX_SECONDS`, so a database that is down for an hour
costs a dozen log lines a minute, not a traceback a second; the first batch that works logs
`audit_sequencer_recovered`. A batch cut off by the outage was one transaction, rolled back
whole, so the events it had taken are still queued, and are chained, once each, when the
database is back. `stop` with the database away leaves what is queued for the next sequencer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Text, bindparam, cast, delete, exists, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from phivault.audit import timeline
from phivault.audit.chain import canonical_fields, chain_hash, queue_mac
from phivault.audit.models import AuditEvent, AuditHead, QueuedEvent, RejectedEvent
from phivault.audit.timeline import Timing
from phivault.db.base import core_table, utcnow
from phivault.db.engine import READ_ONLY
from phivault.errors import database_unavailable
from phivault.observability import get_logger
from phivault.ops import metrics

BATCH = 2000
# How long an idle sequencer waits before looking at the queue again. A commit in this process
# wakes it at once; events committed by other processes wait at most this long (plus a batch).
POLL_SECONDS = 0.2
# The pause after a batch, so that under load the next batch gathers many events.
GATHER_SECONDS = 0.02
# The longest an event may wait in the queue under load (SPEC §8's maximum merge delay).
MAX_MERGE_DELAY_SECONDS = 1.0
# After a failed batch (the database away), the loop waits this long before trying again,
# doubling with each failure in a row up to `RETRY_MAX_SECONDS`.
RETRY_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0

_EVENTS = core_table(AuditEvent)
_HEAD = core_table(AuditHead)
_QUEUE = core_table(QueuedEvent)
_REJECTED = core_table(RejectedEvent)
QUEUE_COLUMNS = (_QUEUE.c.id, _QUEUE.c.event_id, _QUEUE.c.at, _QUEUE.c.actor_id,
                 _QUEUE.c.actor_role, _QUEUE.c.action, _QUEUE.c.resource_type,
                 _QUEUE.c.resource_id, _QUEUE.c.patient_id, _QUEUE.c.outcome, _QUEUE.c.ip,
                 _QUEUE.c.user_agent, _QUEUE.c.request_id,
                 # As text, parsed row by row: one unparseable value must not fail the batch.
                 cast(_QUEUE.c.metadata, Text).label("metadata"), _QUEUE.c.mac)
# The oldest queued events, each with whether an event of its id is already chained (a replayed
# copy: its MAC is the original's), in one round trip.
_TAKE = (select(*QUEUE_COLUMNS, exists().where(_EVENTS.c.event_id == _QUEUE.c.event_id)
                .label("chained"))
         .order_by(_QUEUE.c.id).limit(bindparam("batch")))
# The election: the head's row lock, which only a role that may UPDATE the head can take (an
# advisory lock can be taken by any role that may connect, so a read-only role could stall
# the sequencer with one). SKIP LOCKED: another sequencer holds it, step aside.
_HEAD_COLUMNS = (_HEAD.c.seq, _HEAD.c.hash, _HEAD.c.timed_seq, _HEAD.c.latest_at,
                 _HEAD.c.lateness_us)
_TRY_HEAD = (select(*_HEAD_COLUMNS).where(_HEAD.c.id == 1).with_for_update(skip_locked=True))
_WAIT_HEAD = select(*_HEAD_COLUMNS).where(_HEAD.c.id == 1).with_for_update()
_MOVE_HEAD = (update(_HEAD).where(_HEAD.c.id == 1)
              .values(seq=bindparam("new_seq"), hash=bindparam("new_hash")))
# The head's move with its timing (audit/timeline.py), on SQLite; PostgreSQL's trigger folds it.
_MOVE_TIMED_HEAD = _MOVE_HEAD.values(timed_seq=bindparam("new_seq"),
                                     latest_at=bindparam("latest_at"),
                                     lateness_us=bindparam("lateness_us"))
_INSERT_EVENTS = _EVENTS.insert()
_INSERT_REJECTED = _REJECTED.insert()
_DELETE_TAKEN = delete(_QUEUE).where(_QUEUE.c.id.in_(bindparam("ids", expanding=True)))
_PEEK = select(_QUEUE.c.id).limit(1)
# How long a reader waits for the sequencer at work before reading without it.
DRAIN_LOCK_TIMEOUT = "5s"

log = get_logger("phivault.audit.sequencer")


def parse_metadata(text: str | None) -> dict[str, Any] | None:
    """A queued event's metadata, or None when it is not a JSON object phivault could have
    written (then the event is rejected, never chained)."""
    try:
        value = orjson.loads(text or "")
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def queued_event_intact(key: bytes, row: Sequence[Any]) -> bool:
    """Whether a queue row (in `QUEUE_COLUMNS` order, metadata as text) still matches its MAC."""
    (_id, event_id, at, actor_id, actor_role, action, resource_type, resource_id, patient_id,
     outcome, ip, user_agent, request_id, metadata_text, mac) = row
    metadata = parse_metadata(metadata_text)
    if metadata is None or not isinstance(event_id, uuid.UUID) or not isinstance(mac, bytes):
        return False
    try:
        expected = queue_mac(key, event_id, canonical_fields(
            0, at, actor_id, actor_role, action, resource_type, resource_id, patient_id,
            outcome, ip, user_agent, request_id, metadata))
    except (TypeError, ValueError):  # a value no event of phivault's could hold
        return False
    return hmac.compare_digest(mac, expected)


@dataclass
class SequencerStats:
    """What the sequencer has done in this process: batches, events, and recent merge delays
    (seconds from an event's time to its batch's commit), for benchmarks and metrics."""

    batches: int = 0
    events: int = 0
    rejected: int = 0
    delays: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))


class Sequencer:
    """Chains queued events. One per process; see the module docstring."""

    def __init__(self, engine: AsyncEngine, chain_key: bytes, queue_key: bytes, *,
                 inline: bool = False) -> None:
        self._engine = engine
        self._chain_key = chain_key
        self._queue_key = queue_key
        self._postgres = engine.dialect.name == "postgresql"
        # The runtime chains each unit of work's events right after its commit (SQLite).
        self._inline = inline
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self.restarts = 0  # background loops that died and were started again
        self.queued_here = False  # whether this process committed events to the queue
        self.failures = 0  # the background loop's failed tries in a row (an outage)
        # Readers' drains in this process share one flush at a time (see `drain`).
        self._drain_lock = asyncio.Lock()
        self._drain_tickets = 0
        self._drained_through = 0
        self.stats = SequencerStats()

    def __repr__(self) -> str:
        return f"Sequencer(dialect={self._engine.dialect.name!r})"

    async def sequence_batch(self, *, wait: bool = False) -> int | None:
        """Chain up to `BATCH` queued events in one transaction.

        Returns how many queued events it took (chained or rejected), or None when another
        sequencer holds the head (only with `wait=False`: with `wait=True` it waits for that
        one to finish its batch, at most `DRAIN_LOCK_TIMEOUT` on PostgreSQL).
        """
        async with self._engine.begin() as connection:
            if wait and self._postgres:
                await connection.execute(text(f"SET LOCAL lock_timeout = '{DRAIN_LOCK_TIMEOUT}'"))
            head = (await connection.execute(_WAIT_HEAD if wait else _TRY_HEAD)).one_or_none()
            if head is None:
                return None
            taken, times = await self._chain(connection, head)
        # Committed: the events are in the chain.
        if times:
            now = utcnow()
            self.stats.batches += 1
            self.stats.events += len(times)
            delays = [(now - at).total_seconds() for at in times]
            self.stats.delays.extend(delays)
            for delay in delays:
                metrics.MERGE_DELAY.observe(delay)
        return taken

    async def _chain(self, connection: AsyncConnection, head: Any
                     ) -> tuple[int, list[datetime]]:
        """Chain a batch inside `connection`'s transaction, which holds the head's lock, and
        move the head with its timing (audit/timeline.py). Returns how many queued events were
        taken and the chained events' times."""
        seq, prev = int(head.seq), bytes(head.hash)
        rows = (await connection.execute(_TAKE, {"batch": BATCH})).all()
        if not rows:
            return 0, []
        events: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        for row in rows:
            # A replayed copy of an event already chained (its MAC is the original's) is
            # rejected too: chaining it again would fail on the unique event id and stall the
            # sequencer.
            if not queued_event_intact(self._queue_key, row[:-1]):
                rejected.append(self._rejected(row, "mac_mismatch"))
                continue
            if row.chained:
                rejected.append(self._rejected(row, "replayed"))
                continue
            metadata = parse_metadata(row.metadata) or {}  # intact: a JSON object
            seq += 1
            fields = (seq, row.at, row.actor_id, row.actor_role, row.action, row.resource_type,
                      row.resource_id, row.patient_id, row.outcome, row.ip, row.user_agent,
                      row.request_id, metadata)
            digest = chain_hash(self._chain_key, prev, canonical_fields(*fields))
            events.append({
                "seq": seq, "at": row.at, "actor_id": row.actor_id,
                "actor_role": row.actor_role, "action": row.action,
                "resource_type": row.resource_type, "resource_id": row.resource_id,
                "patient_id": row.patient_id, "outcome": row.outcome, "ip": row.ip,
                "user_agent": row.user_agent, "request_id": row.request_id,
                "metadata": metadata, "prev_hash": prev, "hash": digest,
                "event_id": row.event_id,
            })
            prev = digest
        if rejected:
            # Kept for the auditor, out of the queue, so that no poison row stalls the
            # sequencer; `verify` reports every rejected event until someone investigates.
            await connection.execute(_INSERT_REJECTED, rejected)
            self.stats.rejected += len(rejected)
            log.warning("audit_queue_events_rejected", count=len(rejected),
                        queue_ids=[r["id"] for r in rejected])
        if events:
            await connection.execute(_INSERT_EVENTS, events)
            moved = {"new_seq": seq, "new_hash": prev}
            if self._postgres:  # the head's trigger folds the timing (audit/timeline.py)
                await connection.execute(_MOVE_HEAD, moved)
            else:
                timing = (Timing.stored(head.latest_at, head.lateness_us)
                          if head.timed_seq == head.seq else
                          await connection.run_sync(timeline.fold, int(head.seq)))
                await connection.execute(_MOVE_TIMED_HEAD, {
                    **moved, **timing.after(event["at"] for event in events).columns()})
        await connection.execute(_DELETE_TAKEN, {"ids": [row.id for row in rows]})
        return len(rows), [event["at"] for event in events]

    @staticmethod
    def _rejected(row: Any, reason: str) -> dict[str, Any]:
        return {"id": row.id, "event_id": row.event_id, "at": row.at,
                "actor_id": row.actor_id, "actor_role": row.actor_role, "action": row.action,
                "resource_type": row.resource_type, "resource_id": row.resource_id,
                "patient_id": row.patient_id, "outcome": row.outcome, "ip": row.ip,
                "user_agent": row.user_agent, "request_id": row.request_id,
                "metadata_text": row.metadata, "mac": row.mac, "reason": reason,
                "rejected_at": utcnow()}

    async def _queue_has_events(self) -> bool:
        """A read-only peek, so an idle loop takes neither the head's lock nor (on SQLite)
        the write lock."""
        async with self._engine.connect() as connection:
            connection = await connection.execution_options(**{READ_ONLY: True})
            async with connection.begin():
                return (await connection.execute(_PEEK)).first() is not None

    async def drain(self) -> int:
        """Chain everything committed so far, before reading the trail (SPEC §8: callers see
        their own actions). On PostgreSQL it waits for another sequencer at work.

        On SQLite with inline chaining, every committing process (server or CLI) has already
        chained its own events when its commit returned, so there is nothing to wait for; and
        a reader inside a request's unit of work, which holds SQLite's one write lock, must not
        wait for that lock. `flush` chains unconditionally.
        """
        if self._inline and not self._postgres:
            return 0
        # Readers in this process take turns, and a reader whose events a flush that started
        # after it arrived has already chained returns at once: a burst of readers costs one
        # flush, not one connection each. A sequencer busy elsewhere past the lock timeout,
        # or a database error, leaves the reader to read without it (logged).
        self._drain_tickets += 1
        ticket = self._drain_tickets
        async with self._drain_lock:
            if self._drained_through >= ticket:
                return 0
            target = self._drain_tickets
            try:
                chained = await self.flush()
            except DBAPIError as exc:
                log.warning("audit_drain_skipped", error=type(exc.orig).__name__)
                return 0
            self._drained_through = target
            return chained

    async def flush(self) -> int:
        """Chain every committed event, waiting for the lock (never inside a unit of work on
        SQLite: that holds the write lock this needs)."""
        total = 0
        while True:
            taken = await self.sequence_batch(wait=True)
            total += taken or 0
            if not taken or taken < BATCH:
                return total

    def notify(self) -> None:
        """A commit queued events: wake the background loop."""
        self.queued_here = True
        self._wake.set()

    def start(self) -> None:
        """Run `run_forever` in the background of this process's event loop, supervised: a
        loop that ends without `stop` (an error it could not survive, a cancellation from
        elsewhere) is logged as `audit_sequencer_died` and started again after a pause that
        grows with each restart in a row (0.2 s to 5 s). Its events stay queued meanwhile."""
        self._stopped = False
        if self._task is None:
            self._spawn()

    def _spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(self.run_forever(),
                                                      name="audit-sequencer")
        task.add_done_callback(self._ended)
        self._task = task

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._task is not task:  # stopped on purpose
            return
        self._task = None
        reason = ("cancelled" if task.cancelled()
                  else type(task.exception()).__name__ if task.exception() else "returned")
        self.restarts += 1
        pause = min(5.0, 0.2 * 2 ** min(self.restarts - 1, 5))
        log.error("audit_sequencer_died", cause=reason, restarts=self.restarts,
                  restart_in_seconds=pause)
        asyncio.get_running_loop().call_later(pause, self._restart)

    def _restart(self) -> None:
        if not self._stopped and self._task is None:
            log.warning("audit_sequencer_restarted", restarts=self.restarts)
            self._spawn()

    async def stop(self) -> None:
        """Stop the background loop, then chain what this process committed."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.flush()
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            # Committed events wait in the queue for the next sequencer, in any process. Worth
            # a warning only when this process queued some (a CLI command that could not even
            # start is told once, by its own error line).
            if self.queued_here:
                log.warning("audit_sequencer_stopped_unflushed", error=type(exc).__name__)

    def _recovered(self) -> None:
        if self.failures:
            log.warning("audit_sequencer_recovered", failures=self.failures)
            self.failures = 0

    async def run_forever(self) -> None:
        """Chain batches while there is work, in this process's background.

        Woken by this process's commits, or every `POLL_SECONDS` (for events other processes
        committed, after a read-only peek). After a batch it pauses `GATHER_SECONDS`, so that
        under load batches gather many events instead of chasing each commit. When another
        process holds the lock it waits `POLL_SECONDS` before trying again, ignoring wake-ups,
        so the processes that are not sequencing cost the database a try every poll, not one
        per request. A database error (an outage, a failover) is logged and retried after a
        pause that grows while it lasts (the module's docstring): the events stay queued and
        nothing is lost.
        """
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
                woken = True
            except TimeoutError:
                woken = False
            self._wake.clear()
            chained: int | None = None
            try:
                busy = woken or await self._queue_has_events()
                if busy:
                    chained = await self.sequence_batch()
                    self._recovered()  # at the first batch that works, not after the backlog
                    while chained == BATCH:
                        chained = await self.sequence_batch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep sequencing after an outage
                self.failures += 1
                pause = min(RETRY_MAX_SECONDS, RETRY_SECONDS * 2 ** min(self.failures - 1, 8))
                log.warning("audit_sequencer_error", error=type(exc).__name__,
                            failures=self.failures, retry_in_seconds=pause)
                await asyncio.sleep(pause)
                continue
            self._recovered()
            if busy:
                await asyncio.sleep(POLL_SECONDS if chained is None else GATHER_SECONDS)
