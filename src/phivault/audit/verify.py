"""Verifying the stored chain, whole or from a checkpoint's head, in constant memory (SPEC §8, §14).

Each event's check needs only its predecessor's stored hash, so the chain splits into `seq`
ranges that are checked independently, then joined: range k's first `prev_hash` must be range
k-1's last `hash`. On PostgreSQL the ranges stream out through COPY (`verify_range.py`), a long
chain's in parallel processes that share this transaction's snapshot (`pg_export_snapshot`), so
they all see one state of the chain. On SQLite the events come in batches of rows through
`ChainVerifier`: simple, and fast enough for the deployments SQLite suits.

Either way the answer is the sequential one: the first `seq` at which an event was changed,
removed, inserted or reordered, or at which the stored head disagrees with the events.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from phivault.audit.chain import (
    GENESIS_HASH,
    ChainedEvent,
    ChainVerifier,
    VerifyResult,
    canonical_json,
    chain_hash,
)
from phivault.audit.models import AuditEvent, AuditHead
from phivault.audit.verify_range import RangeResult, check_range
from phivault.db.base import core_table
from phivault.db.engine import READ_ONLY

# Rows per batch on SQLite (about 3 KB each as Python rows).
BATCH = 2000
# A chain shorter than this is checked in this process alone: starting a process costs more.
PARALLEL_MIN_EVENTS = 100_000
# A long chain is cut into ranges of about this many events, each checked by whichever process
# is free next: small enough that the processes finish together, large enough that a range's
# COPY statement costs nothing to speak of.
RANGE_EVENTS = 25_000
# Connection options that belong to SQLAlchemy's adapter, not to asyncpg.connect.
_ADAPTER_OPTIONS = frozenset({"prepared_statement_cache_size", "prepared_statement_name_func",
                              "async_creator_fn"})

_EVENTS = core_table(AuditEvent)
# The event columns in `ChainedEvent`'s order, read as plain Core rows that `ChainVerifier`
# unpacks as they are.
_CHAIN_COLUMNS = tuple(_EVENTS.c[name] for name in ChainedEvent._fields)
_CHAIN_BATCH = select(*_CHAIN_COLUMNS).order_by(_EVENTS.c.seq).limit(BATCH)
_HEAD = select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)


@dataclass(frozen=True, slots=True)
class Anchor:
    """A head verified before (a signed checkpoint's `seq` and `hash`): verification proves
    the event at `seq` still has that hash, then checks only the events after it."""

    seq: int
    hash: bytes


async def verify_chain(session: AsyncSession, key: bytes, *, anchor: Anchor | None = None,
                       processes: int | None = None, ranges: int | None = None) -> VerifyResult:
    """Verify the chain in `session`, which must not have run a query yet, in one snapshot
    (REPEATABLE READ on PostgreSQL; SQLite's read transaction is one already).

    With an `anchor`, `events` counts the events after it. On PostgreSQL, a chain of at least
    `PARALLEL_MIN_EVENTS` events is checked by `processes` processes (default: one per core,
    this one included) that take its `ranges` (default: of `RANGE_EVENTS` events) in turn;
    tests set both for short chains.
    """
    if anchor is not None and anchor.seq == 0:
        # A checkpoint of the empty chain: everything is after it.
        if not hmac.compare_digest(anchor.hash, GENESIS_HASH):
            return VerifyResult(False, 0, 1)
        anchor = None
    postgres = session.bind is not None and session.bind.dialect.name == "postgresql"
    options: dict[str, Any] = {READ_ONLY: True}
    if postgres:
        options.update(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    connection = await session.connection(execution_options=options)
    head = (await connection.execute(_HEAD)).one_or_none()
    head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS_HASH)
    if postgres:
        result = await _verify_postgres(connection, key, head_seq, head_hash, anchor,
                                        processes, ranges)
    else:
        result = await _verify_rows(connection, key, head_seq, head_hash, anchor)
    return replace(result, head_seq=head_seq, head_hash=head_hash)


# SQLite (and any backend): rows in batches.

async def _verify_rows(connection: AsyncConnection, key: bytes, head_seq: int,
                       head_hash: bytes, anchor: Anchor | None) -> VerifyResult:
    verifier = ChainVerifier(key)
    last: int | None = None  # the first batch has no lower bound: a seq <= 0 is tampering too
    if anchor is not None:
        problem = await _anchor_problem(connection, key, anchor)
        if problem is not None:
            return VerifyResult(False, 0, problem)
        verifier = ChainVerifier(key, start_seq=anchor.seq + 1, prev_hash=anchor.hash)
        last = anchor.seq
    while True:
        query = _CHAIN_BATCH if last is None else _CHAIN_BATCH.where(_EVENTS.c.seq > last)
        rows = (await connection.execute(query)).all()
        if not rows:
            return verifier.finish(head_seq, head_hash)
        verifier.feed(rows)
        last = rows[-1].seq


async def _anchor_problem(connection: AsyncConnection, key: bytes, anchor: Anchor
                          ) -> int | None:
    """The first bad seq if the anchor's event is gone, changed, or no longer its hash."""
    row = (await connection.execute(select(*_CHAIN_COLUMNS)
                                    .where(_EVENTS.c.seq == anchor.seq))).one_or_none()
    if row is None:
        return await _first_missing_below(connection, anchor.seq)
    event = ChainedEvent(*row)
    if not (hmac.compare_digest(chain_hash(key, event.prev_hash, canonical_json(event)),
                                event.hash)
            and hmac.compare_digest(event.hash, anchor.hash)):
        return anchor.seq
    return None


async def _first_missing_below(connection: AsyncConnection, seq: int) -> int:
    """The event at `seq` is gone: the first seq missing up to it (one index look-up), which
    for a tail cut off below a checkpoint is the first event cut."""
    below = (await connection.execute(
        select(func.max(_EVENTS.c.seq)).where(_EVENTS.c.seq < seq))).scalar_one()
    return (below or 0) + 1


# PostgreSQL: COPY ranges, in parallel for a long chain.

async def _verify_postgres(connection: AsyncConnection, key: bytes, head_seq: int,
                           head_hash: bytes, anchor: Anchor | None, processes: int | None,
                           ranges: int | None) -> VerifyResult:
    lo = anchor.seq if anchor is not None else 1
    count = head_seq - lo + 1
    if processes is None:
        processes = (os.cpu_count() or 1) if count >= PARALLEL_MIN_EVENTS else 1
    if ranges is None:
        ranges = max(processes, -(-count // RANGE_EVENTS)) if processes > 1 else 1
    bounds = _split(lo, head_seq, max(1, min(ranges, count)))
    processes = max(1, min(processes, len(bounds)))
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection  # asyncpg's own connection, inside this transaction
    # The ranges still to check, taken in seq order by whichever process is free: this one
    # and the others alike, so that none waits while another still has work.
    pending: deque[Range] = deque(
        Range(i, start, end, open_below=anchor is None and i == 0)
        for i, (start, end) in enumerate(bounds))
    results: dict[int, RangeResult] = {}

    async def check_here() -> None:
        while pending:
            job = pending.popleft()
            results[job.index] = await check_range(driver, key, job.lo, job.hi,
                                                   open_below=job.open_below)

    others: list[asyncio.Task[None]] = []
    if processes > 1:
        snapshot = (await connection.exec_driver_sql("SELECT pg_export_snapshot()")).scalar_one()
        header = {"connect": _connect_options(connection), "snapshot": snapshot,
                  "key": base64.b64encode(key).decode()}
        others = [asyncio.create_task(_check_elsewhere(header, pending, results))
                  for _ in range(processes - 1)]
    try:
        await check_here()
        await asyncio.gather(*others)
        # A process that failed gave its range back: check it here, in the same snapshot.
        await check_here()
    finally:
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
    ordered = [results[i] for i in range(len(bounds))]
    if anchor is not None and ordered[0].first_seq != anchor.seq:
        below = await _first_missing_below(connection, anchor.seq)
        return VerifyResult(False, sum(result.events for result in ordered), below)
    return join_ranges(ordered, head_seq, head_hash, anchor)


def _split(lo: int, head_seq: int, count: int) -> list[tuple[int, int | None]]:
    """`count` ranges from `lo` to the head; the last is open above, so that an event past the
    head is read too."""
    span = max(head_seq - lo + 1, 1)
    starts = [lo + span * i // count for i in range(count)]
    return [(start, starts[i + 1] - 1 if i + 1 < count else None)
            for i, start in enumerate(starts)]


def join_ranges(results: Sequence[RangeResult], head_seq: int, head_hash: bytes,
                anchor: Anchor | None = None) -> VerifyResult:
    """The whole chain's answer from its ranges' (in `seq` order): the first range with a bad
    event or a broken join to the range before it, then the head."""
    events = sum(result.events for result in results)
    if anchor is not None and results[0].first_seq == anchor.seq:
        events -= 1  # the anchor's own event is not one "after it"
    previous: bytes | None = GENESIS_HASH if anchor is None else None
    last_seq = (anchor.seq - 1) if anchor is not None else 0
    for result in results:
        if result.first_bad_seq is not None:
            return VerifyResult(False, events, result.first_bad_seq)
        if result.first_seq is not None:
            if previous is not None and result.first_prev != previous:
                return VerifyResult(False, events, result.lo)
            if anchor is not None and result.lo == anchor.seq and result.first_hash != anchor.hash:
                return VerifyResult(False, events, anchor.seq)
            previous = result.last_hash
        last_seq = result.last_seq
    if head_seq != last_seq:
        # Events cut off the end (head ahead) or appended around the head (head behind).
        return VerifyResult(False, events, min(head_seq, last_seq) + 1)
    if previous is not None and previous != head_hash:
        return VerifyResult(False, events, max(last_seq, 1))
    return VerifyResult(True, events, None)


@dataclass(frozen=True, slots=True)
class Range:
    """One range to check: `open_below` for the first of a whole chain (a seq below 1 is read
    too, and is tampering)."""

    index: int
    lo: int
    hi: int | None
    open_below: bool


def _connect_options(connection: AsyncConnection) -> dict[str, Any]:
    """asyncpg.connect's arguments for this engine's database, as its dialect computes them."""
    engine = connection.engine
    _args, options = engine.dialect.create_connect_args(engine.url)
    return {name: value for name, value in options.items()
            if name not in _ADAPTER_OPTIONS and isinstance(value, str | int | float | bool)}


async def _check_elsewhere(header: dict[str, Any], pending: deque[Range],
                           results: dict[int, RangeResult]) -> None:
    """Take ranges from `pending` while there are any, and check each in a process of its own
    (`python -m phivault.audit.verify_range`) that joins this transaction's snapshot.

    The job's header (the audit key among it) goes through a pipe, never the command line.
    If the process cannot start or fails, its range goes back to `pending` and it takes no
    more: the caller checks what is left.
    """
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "phivault.audit.verify_range", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return
    assert process.stdin is not None and process.stdout is not None  # noqa: S101 - PIPEs
    try:
        process.stdin.write(json.dumps(header).encode() + b"\n")
        while pending:
            job = pending.popleft()
            try:
                process.stdin.write(json.dumps([job.lo, job.hi, job.open_below]).encode()
                                    + b"\n")
                await process.stdin.drain()
                results[job.index] = RangeResult.from_json(
                    json.loads(await process.stdout.readline()))
            except (OSError, ValueError, TypeError, KeyError):
                pending.appendleft(job)
                return
        process.stdin.close()
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
