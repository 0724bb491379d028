"""The audit queue and its sequencer (SPEC §8): requests queue, one sequencer at a time chains,
nothing is lost or duplicated, an edited queued event is found and never chained."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import func, select, text

from phivault.audit import service
from phivault.audit.actions import Action
from phivault.audit.models import AuditEvent, AuditHead, QueuedEvent, RejectedEvent
from phivault.audit.sequencer import BATCH, Sequencer
from phivault.runtime import Runtime
from tests.audit.factories import write_chain
from tests.helpers import ROOT, cli_env


async def _queue(rt: Runtime, units: int, per_unit: int = 1) -> None:
    async def one(i: int) -> None:
        async with rt.unit_of_work() as session:
            for j in range(per_unit):
                service.record(session, Action.VIEW_PRESCRIPTION, resource_type="prescription",
                               resource_id=uuid.uuid4(), metadata={"count": i * per_unit + j})

    await asyncio.gather(*(one(i) for i in range(units)))


async def _count(rt: Runtime, model: type[Any]) -> int:
    async with rt.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(model)))
                   .scalar_one())


async def _raw(rt: Runtime, sql: str, **params: Any) -> None:
    """Tamper around the triggers, as someone with the database owner's rights could."""
    async with rt.engine.begin() as connection:
        if rt.engine.dialect.name == "postgresql":
            await connection.execute(text("SET LOCAL session_replication_role = replica"))
            await connection.execute(text(sql), params)
        else:
            await connection.execute(text("DROP TRIGGER audit_queue_no_update"))
            await connection.execute(text(sql), params)
            await connection.execute(text(
                "CREATE TRIGGER audit_queue_no_update BEFORE UPDATE ON audit_queue BEGIN "
                "SELECT RAISE(ABORT, 'audit_queue is append-only: UPDATE refused'); END"))


async def _verify(rt: Runtime) -> service.VerifyResult:
    return await service.verify_snapshot(rt.sessions, rt.audit_key, rt.sequencer, rt.queue_key)


async def test_requests_queue_and_the_sequencer_chains(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(chain_after_commit=False)
    await _queue(rt, 30, per_unit=2)
    assert await _count(rt, QueuedEvent) == 60
    assert await _count(rt, AuditEvent) == 0
    assert await rt.sequencer.drain() == 60
    assert await _count(rt, QueuedEvent) == 0
    async with rt.sessions() as session:
        events = (await session.execute(select(AuditEvent).order_by(AuditEvent.seq))).scalars()
        chained = list(events)
    assert [e.seq for e in chained] == list(range(1, 61))
    assert sorted(e.event_metadata["count"] for e in chained) == list(range(60))
    assert len({e.event_id for e in chained}) == 60
    assert (await _verify(rt)).as_dict() == {"ok": True, "events": 60, "first_bad_seq": None}


async def test_an_edited_queued_event_is_found_and_never_chained(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(chain_after_commit=False)
    await _queue(rt, 3)
    async with rt.sessions() as session:
        victim = (await session.execute(select(QueuedEvent.id).order_by(QueuedEvent.id)
                                        .limit(1))).scalar_one()
    await _raw(rt, "UPDATE audit_queue SET action = 'LOGIN_SUCCESS' WHERE id = :id", id=victim)
    result = await _verify(rt)
    assert (result.ok, result.first_bad_seq, result.queue_tampered) == (False, None, (victim,))
    assert result.events == 2  # the two intact ones were chained
    # The edited event left the queue for the rejected events, kept as found for the auditor,
    # and verification keeps reporting it; the chain itself holds and goes on.
    assert await _count(rt, QueuedEvent) == 0
    async with rt.sessions() as session:
        kept = (await session.execute(select(RejectedEvent))).scalar_one()
    assert (kept.id, kept.action, kept.reason) == (victim, "LOGIN_SUCCESS", "mac_mismatch")
    await _queue(rt, 2)
    again = await _verify(rt)
    assert (again.events, again.queue_tampered, again.first_bad_seq) == (4, (victim,), None)


async def test_a_copied_queued_event_does_not_verify(fresh_runtime: Callable[..., Any]) -> None:
    """A queued row copied under a new id (a replayed event) no longer matches its MAC."""
    rt = await fresh_runtime(chain_after_commit=False)
    await _queue(rt, 1)
    new_id: Any = uuid.uuid4()
    if rt.engine.dialect.name == "sqlite":
        new_id = new_id.hex  # how SQLAlchemy's Uuid stores it there
    columns = ("at, actor_id, actor_role, action, resource_type, resource_id, patient_id, "
               "outcome, ip, user_agent, request_id, metadata, mac")
    await _raw(rt, f"INSERT INTO audit_queue (event_id, {columns}) "  # noqa: S608
               f"SELECT :new_id, {columns} FROM audit_queue", new_id=new_id)
    result = await _verify(rt)
    assert not result.ok and len(result.queue_tampered) == 1
    assert result.events == 1


async def test_poison_rows_never_stall_the_sequencer(fresh_runtime: Callable[..., Any]) -> None:
    """A replayed copy of a chained event (its MAC intact), metadata that does not parse, and a
    row with a forged MAC are each rejected, and the events behind them are chained."""
    rt = await fresh_runtime(chain_after_commit=False)
    await _queue(rt, 1)
    columns = ("event_id, at, actor_id, actor_role, action, resource_type, resource_id, "
               "patient_id, outcome, ip, user_agent, request_id, metadata, mac")
    async with rt.engine.begin() as connection:  # a copy of the queued row, taken before
        await connection.execute(text(f"CREATE TABLE stash AS SELECT {columns} "  # noqa: S608
                                      "FROM audit_queue"))
    assert await rt.sequencer.drain() == 1
    async with rt.engine.begin() as connection:
        await connection.execute(text(f"INSERT INTO audit_queue ({columns}) "  # noqa: S608
                                      f"SELECT {columns} FROM stash"))
        await connection.execute(text("DROP TABLE stash"))
    for metadata in ("[1]", '{"a": 1e400}', '"text"'):
        await _raw(rt, f"INSERT INTO audit_queue ({columns}) SELECT :new_id, at, "  # noqa: S608
                   "actor_id, actor_role, action, resource_type, resource_id, patient_id, "
                   "outcome, ip, user_agent, request_id, :metadata, hash FROM audit_events "
                   "WHERE seq = 1", new_id=_uuid_param(rt), metadata=metadata)
    await _queue(rt, 3)
    await rt.sequencer.drain()
    async with rt.sessions() as session:
        reasons = sorted((await session.execute(select(RejectedEvent.reason))).scalars())
    assert reasons == ["mac_mismatch"] * 3 + ["replayed"]
    for statement in ("DELETE FROM audit_queue_rejected", "UPDATE audit_queue_rejected SET "
                      "reason = 'x'"):
        with pytest.raises(Exception, match="append-only"):
            async with rt.engine.begin() as connection:
                await connection.execute(text(statement))
    result = await _verify(rt)
    assert (result.ok, result.events, len(result.queue_tampered)) == (False, 4, 4)
    assert await _count(rt, QueuedEvent) == 0


def _uuid_param(rt: Runtime) -> Any:
    new_id = uuid.uuid4()
    return new_id.hex if rt.engine.dialect.name == "sqlite" else new_id


async def test_the_queue_and_head_refuse_edits_and_unchained_deletes(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(chain_after_commit=False)
    await _queue(rt, 2)

    async def refused(statements: dict[str, str]) -> None:
        for statement, message in statements.items():
            with pytest.raises(Exception, match=message):
                async with rt.engine.begin() as connection:
                    await connection.execute(text(statement))

    postgres = rt.engine.dialect.name == "postgresql"
    await refused({
        "UPDATE audit_queue SET action = 'X'": "append-only",
        "DELETE FROM audit_queue": "not yet chained",
        "DELETE FROM audit_head": "kept",
        **({"TRUNCATE audit_head": "kept", "TRUNCATE audit_queue": "append-only"}
           if postgres else {}),
    })
    # Once chained, the sequencer's own delete goes through (it ran inside drain()).
    assert await rt.sequencer.drain() == 2
    assert await _count(rt, QueuedEvent) == 0
    # The head names the chain's last event and nothing else: no jump ahead (a gap), no
    # rewind over a tail (even to a real event's hash), no return to the genesis.
    await refused({
        "UPDATE audit_head SET seq = 5": "last event",
        "UPDATE audit_head SET seq = 1, hash = (SELECT hash FROM audit_events WHERE seq = 1)":
            "last event",
        "UPDATE audit_head SET seq = 0": "last event",
    })
    assert (await _verify(rt)).ok


class _Recording(Sequencer):
    """A sequencer that notes when it works inside its locked transaction."""

    def __init__(self, rt: Runtime, spans: list[tuple[str, float, float]], name: str) -> None:
        super().__init__(rt.engine, rt.audit_key, rt.queue_key)
        self._spans, self._name = spans, name

    async def _chain(self, connection: Any, head: Any) -> tuple[int, list[datetime]]:
        started = time.monotonic()
        taken, times = await super()._chain(connection, head)
        await asyncio.sleep(0.005)  # widen the window an overlap would show in
        if times:
            self._spans.append((self._name, started, time.monotonic()))
        return taken, times


async def test_two_sequencers_never_work_at_once(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(chain_after_commit=False)
    # A second runtime: its own engine and pool, as another process would have.
    other = await fresh_runtime(database_url=rt.settings.database_url_value,
                                chain_after_commit=False)
    await _queue(rt, 50, per_unit=int(BATCH / 25))  # 4,000 events: several batches
    spans: list[tuple[str, float, float]] = []
    first, second = _Recording(rt, spans, "a"), _Recording(other, spans, "b")

    async def work(sequencer: Sequencer) -> None:
        for _ in range(20):
            await sequencer.sequence_batch()
            await asyncio.sleep(0)

    await asyncio.gather(work(first), work(second), work(first), work(second))
    await rt.sequencer.drain()
    spans.sort(key=lambda span: span[1])
    for (_, _, ended), (_, started, _) in zip(spans, spans[1:], strict=False):
        assert started >= ended, "two sequencers chained at the same time"
    result = await _verify(rt)
    assert result.as_dict() == {"ok": True, "events": 4000, "first_bad_seq": None}


async def test_the_head_lock_elects_one_sequencer(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(chain_after_commit=False)
    if rt.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's one write lock is the election; the test above covers it")
    await _queue(rt, 5)
    async with rt.engine.connect() as holder:
        await holder.execute(text("BEGIN"))
        await holder.execute(text("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE"))
        # Another process is the sequencer: a background batch steps aside at once...
        assert await rt.sequencer.sequence_batch() is None
        # ...and a reader's drain waits for it.
        waiting = asyncio.ensure_future(rt.sequencer.drain())
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await holder.execute(text("COMMIT"))
        assert await asyncio.wait_for(waiting, 10) == 5


async def test_the_background_sequencer_chains_without_being_asked(
        fresh_runtime: Callable[..., Any]) -> None:
    """Nobody drains: the background loop chains on its own. (The merge delay's figure, <= 1 s
    under load, is measured by bench/audit_append.py, not timed here.)"""
    rt = await fresh_runtime(chain_after_commit=False)
    rt.start_background()
    try:
        await _queue(rt, 20)
        deadline = time.monotonic() + 30
        while await _count(rt, AuditEvent) < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert await _count(rt, AuditEvent) == 20
        assert rt.sequencer.stats.events == 20 and len(rt.sequencer.stats.delays) == 20
    finally:
        await rt.sequencer.stop()
    assert (await _verify(rt)).ok


SEQUENCER = """
import asyncio, sys
from phivault.audit import sequencer as module
from phivault.config import load_settings
from phivault.runtime import Runtime

module.BATCH = 50  # many small transactions, so the kill lands inside one

async def main() -> None:
    rt = Runtime.from_settings(load_settings(), pool_size=2, chain_after_commit=False)
    print("ready", flush=True)
    while True:
        print(await rt.sequencer.sequence_batch(wait=True), flush=True)

asyncio.run(main())
"""


@pytest.mark.slow
async def test_kill_9_while_sequencing_loses_and_duplicates_nothing(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(chain_after_commit=False)
    total = 3000
    await _queue(rt, 100, per_unit=total // 100)
    process = subprocess.Popen([sys.executable, "-c", SEQUENCER], env=cli_env(rt), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    # Kill it part-way: once it has committed a few batches (of 50), not all 60.
    for _ in range(3):
        assert process.stdout.readline().strip() == "50"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    chained_at_kill = await _count(rt, AuditEvent)
    assert 0 < chained_at_kill < total, "the kill did not land while sequencing"
    assert chained_at_kill + await _count(rt, QueuedEvent) == total
    await rt.sequencer.drain()
    async with rt.sessions() as session:
        counts = list((await session.execute(select(AuditEvent.event_metadata))).scalars())
        head = (await session.execute(select(AuditHead.seq))).scalar_one()
    assert sorted(m["count"] for m in counts) == list(range(total))
    assert head == total
    assert (await _verify(rt)).as_dict() == {"ok": True, "events": total, "first_bad_seq": None}


class _Fatal(BaseException):
    """Not an `Exception`: the loop's own retry does not catch it, so the task dies."""


async def test_a_sequencer_loop_that_dies_is_restarted_and_logged(
        fresh_runtime: Callable[..., Any], captured_logs: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 (supervision): the background loop dies twice (a fatal error, then a
    cancellation from elsewhere); each time it is logged and started again, and the events
    queued meanwhile are chained without anyone draining."""
    rt = await fresh_runtime(chain_after_commit=False)
    real = rt.sequencer.sequence_batch
    failures = [_Fatal()]

    async def failing_once(*args: Any, **kwargs: Any) -> int | None:
        if failures:
            raise failures.pop()
        return await real(*args, **kwargs)

    monkeypatch.setattr(rt.sequencer, "sequence_batch", failing_once)
    rt.start_background()
    try:
        await _queue(rt, 5)
        deadline = time.monotonic() + 30
        while await _count(rt, AuditEvent) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await _count(rt, AuditEvent) == 5 and rt.sequencer.restarts == 1
        first = rt.sequencer._task
        assert first is not None
        first.cancel()  # killed from elsewhere
        await _queue(rt, 5)
        deadline = time.monotonic() + 30
        while await _count(rt, AuditEvent) < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await _count(rt, AuditEvent) == 10 and rt.sequencer.restarts == 2
    finally:
        await rt.sequencer.stop()
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines() if line]
    died = [line for line in lines if line.get("event") == "audit_sequencer_died"]
    assert [line["cause"] for line in died] == ["_Fatal", "cancelled"]
    assert sum(line.get("event") == "audit_sequencer_restarted" for line in lines) == 2
    # Stopped on purpose: not restarted.
    await asyncio.sleep(0.5)
    assert rt.sequencer._task is None and rt.sequencer.restarts == 2
    assert (await _verify(rt)).ok


async def test_moving_the_head_never_scans_the_trail(fresh_runtime: Callable[..., Any]) -> None:
    """The head's guard (a trigger: the head names the chain's last event) is one probe of the
    primary key, even in the generic plan PL/pgSQL switches to after a few runs: its first
    form scanned the whole trail on every sequencer batch (150 ms at 1,000,000 events)."""
    rt = await fresh_runtime()
    if rt.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's trigger reads the rowid b-tree; PL/pgSQL plans are PostgreSQL's")
    await write_chain(rt, 20_000)
    async with rt.engine.begin() as connection:
        await connection.execute(text("SET LOCAL plan_cache_mode = force_generic_plan"))
        for _ in range(3):
            await connection.execute(text("UPDATE audit_head SET seq = seq WHERE id = 1"))
        scans = (await connection.execute(text(
            "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'audit_events'"
        ))).scalar_one()
    assert scans == 0
