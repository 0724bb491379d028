"""The head's timing (audit/timeline.py): a time window's `seq` range never loses an event,
however out of order the chain's times are, nor when a batch commits mid-search, nor at the
ends of the calendar; the timing is the chain's own (PostgreSQL's head trigger folds it, so it
cannot be narrowed; SQLite's sequencer does, catching up after a restore); the migration fills
it in."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from alembic import command
from sqlalchemy import Connection, insert, select, text

from phivault.audit import search, timeline
from phivault.audit import service as audit_service
from phivault.audit.actions import Action, Outcome
from phivault.audit.models import AuditEvent, AuditHead, QueuedEvent
from phivault.audit.schemas import AuditSearch
from phivault.audit.timeline import Timing
from phivault.db.migrate import alembic_config, upgrade
from phivault.request_context import Actor
from phivault.runtime import Runtime
from tests.audit.factories import START, write_chain
from tests.conftest import client_for
from tests.factories import signed_in

CHAIN = 3_000


def _disordered(seed: int) -> Callable[[int], datetime]:
    """One event a second, one in twenty late by up to five minutes (a commit held up), and a
    few minutes of silence now and then."""
    rng = random.Random(seed)
    late = {seq: timedelta(seconds=rng.randrange(1, 300)) for seq in range(1, CHAIN + 1)
            if rng.random() < 0.05}

    def at(seq: int) -> datetime:
        return START + timedelta(seconds=seq + 240 * (seq // 700)) - late.get(seq,
                                                                             timedelta(0))
    return at


async def _head(rt: Runtime) -> Any:
    async with rt.sessions() as session:
        return (await session.execute(select(
            AuditHead.seq, AuditHead.timed_seq, AuditHead.latest_at, AuditHead.lateness_us)
        )).one()


def test_timing_follows_the_newest_time_and_the_worst_lateness() -> None:
    t = START
    timing = Timing(None, timedelta(0)).after(
        [t, t + timedelta(seconds=5), t + timedelta(seconds=2), t + timedelta(seconds=7),
         t + timedelta(seconds=1), t + timedelta(seconds=7)])
    assert timing == Timing(t + timedelta(seconds=7), timedelta(seconds=6))
    assert timing.columns() == {"latest_at": t + timedelta(seconds=7), "lateness_us": 6_000_000}
    assert timing.after([t + timedelta(seconds=9)]).lateness == timedelta(seconds=6)


async def test_a_window_answers_alike_with_and_without_its_seq_range(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    at = _disordered(7)
    await write_chain(rt, CHAIN, times=at)
    head = await _head(rt)
    assert head.timed_seq == head.seq == CHAIN
    assert 200 <= head.lateness_us / 1e6 < 300  # the latest of the late commits
    rng = random.Random(11)
    first, last = at(1), at(CHAIN)
    async with rt.sessions() as session:
        for _ in range(60):
            edges = sorted(first + timedelta(seconds=rng.uniform(-60, (last - first)
                                                                 .total_seconds() + 60))
                           for _ in range(2))
            since, until = rng.choice([(edges[0], edges[1]), (edges[0], None),
                                       (None, edges[1])])
            window = AuditSearch(since=since, until=until, order=rng.choice(["asc", "desc"]),
                                 outcome=rng.choice([None, "success", "denied"]))
            seqs = await timeline.seq_range(session, since, until)
            assert seqs is not None
            for limit, offset in ((5, 0), (50, 7), (10_000, 0)):
                ranged = (await session.execute(
                    search.page_query(window, limit, offset, seqs))).all()
                whole = (await session.execute(
                    search.page_query(window, limit, offset, None))).all()
                assert ranged == whole, (window, seqs, limit, offset)
            assert await search.count(session, window, seqs=seqs) == await search.count(
                session, window)
        # A narrow window far from both ends: its range is the window and the lateness around
        # it, not the chain.
        middle = at(CHAIN // 2)
        low, high = await timeline.seq_range(session, middle, middle + timedelta(minutes=5)) \
            or (0, 0)
        assert 300 <= high - low + 1 <= 300 + 2 * 300 + 240, (low, high)


async def _python_fold(rt: Runtime) -> Timing:
    """The timing of the whole chain, folded here in Python from its events."""
    async with rt.sessions() as session:
        times = (await session.execute(select(AuditEvent.at).order_by(AuditEvent.seq))
                 ).scalars().all()
    return Timing(None, timedelta(0)).after(times)


async def test_the_sequencer_keeps_the_timing_with_the_head(runtime: Runtime,
                                                            client: httpx.AsyncClient) -> None:
    """On PostgreSQL the head's trigger folds it, on SQLite the sequencer: both agree with a
    fold of the chain done here."""
    for role in ("patient", "doctor", "patient"):
        user = await signed_in(runtime, role)
        assert (await client.get("/api/v1/me", headers=user.headers)).status_code == 200
    await runtime.sequencer.drain()
    head = await _head(runtime)
    assert head.timed_seq == head.seq
    assert Timing.stored(head.latest_at, head.lateness_us) == await _python_fold(runtime)


async def test_a_chain_written_around_the_sequencer_is_timed_again(
        fresh_runtime: Callable[..., Any]) -> None:
    """A chain written straight into the table (a restore): on PostgreSQL the head's trigger
    folds it as the head moves; on SQLite searches do without the range until the sequencer's
    next batch folds the whole chain. The answers are right throughout."""
    rt = await fresh_runtime()
    at = _disordered(3)
    await write_chain(rt, 500, times=at, timed=False)
    postgres = rt.engine.dialect.name == "postgresql"
    head = await _head(rt)
    assert (head.timed_seq == head.seq) is postgres
    window = AuditSearch(since=START + timedelta(seconds=100),
                         until=START + timedelta(seconds=200))
    async with rt.sessions() as session:
        assert (await timeline.seq_range(session, START, None) is None) is not postgres
        page = await search.planned_page_query(session, window, 500, 0)
        seqs = [row.seq for row in (await session.execute(page)).all()]
        assert seqs == [seq for seq in range(500, 0, -1)
                        if window.since <= at(seq) < window.until]  # type: ignore[operator]
    await signed_in(rt, "patient")  # an audited action: the sequencer moves the head
    await rt.sequencer.drain()
    moved = await _head(rt)
    assert moved.seq > head.seq and moved.timed_seq == moved.seq
    assert Timing.stored(moved.latest_at, moved.lateness_us) == await _python_fold(rt)


def _one_late(seq: int) -> datetime:
    """One event a second; seq 250 was committed about 100 s late."""
    return START + timedelta(seconds=150.5 if seq == 250 else seq)


@pytest.mark.tampers
async def test_the_timing_cannot_be_narrowed_to_hide_a_late_event(
        fresh_runtime: Callable[..., Any]) -> None:
    """Whoever may move the head (PostgreSQL's runtime role) cannot write a lateness that
    would leave a late event out of its window: the head's trigger folds the timing itself.
    (An outside review hid event 250 from every window search, with `verify` ok, by writing
    `lateness_us = 0`.) SQLite has no database roles; its file's owner can do anything."""
    rt = await fresh_runtime()
    if rt.engine.dialect.name != "postgresql":
        pytest.skip("database roles and the head's trigger that folds the timing are "
                    "PostgreSQL's")
    auditor = await signed_in(rt, "auditor")
    await write_chain(rt, 400, times=_one_late)
    honest = await _head(rt)
    window = {"since": (START + timedelta(seconds=100)).isoformat(),
              "until": (START + timedelta(seconds=200)).isoformat(), "limit": "500"}
    for forged in ("UPDATE audit_head SET lateness_us = 0 WHERE id = 1",
                   "UPDATE audit_head SET lateness_us = -86400000000 WHERE id = 1",
                   "UPDATE audit_head SET latest_at = '1970-01-01T00:00:00Z', "
                   "timed_seq = seq WHERE id = 1",
                   "UPDATE audit_head SET lateness_us = 0, timed_seq = seq, seq = seq "
                   "WHERE id = 1"):
        async with rt.engine.begin() as connection:
            await connection.execute(text(forged))
        head = await _head(rt)
        assert head.timed_seq == head.seq
        assert Timing.stored(head.latest_at, head.lateness_us) == await _python_fold(rt)
        assert head.lateness_us >= honest.lateness_us > 99_000_000
        async with client_for(rt) as client:
            answer = await client.get("/api/v1/audit", headers=auditor.headers, params=window)
        assert answer.status_code == 200
        assert 250 in [event["seq"] for event in answer.json()], forged


async def test_a_batch_chained_between_the_head_read_and_the_probes_loses_nothing(
        fresh_runtime: Callable[..., Any]) -> None:
    """READ COMMITTED: each statement sees what committed before it. A batch that commits
    after `seq_range` read the head, chaining a late event, must not push the range past the
    head it read (an outside review emptied a window this way)."""
    rt = await fresh_runtime()
    if rt.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's read transaction is one snapshot")
    await write_chain(rt, 100, times=lambda seq: START + timedelta(seconds=seq))
    since = START + timedelta(seconds=50)

    async def chain_a_late_event() -> None:
        pending = audit_service.PendingEvent(
            actor=Actor(uuid.uuid4(), "doctor"), action=Action.VIEW_MEDICAL_RECORD,
            outcome=Outcome.SUCCESS, resource_type=None, resource_id=None, patient_id=None,
            metadata={}, ip=None, user_agent=None, request_id="late")
        async with rt.engine.begin() as connection:
            await connection.execute(insert(QueuedEvent), [audit_service.queued_row(
                rt.queue_key, pending, START + timedelta(seconds=49.5))])
        await rt.sequencer.sequence_batch(wait=True)

    class Interleaved:
        """The session, with a sequencer batch committing right after its first statement
        (the head's read)."""

        def __init__(self, session: Any) -> None:
            self.session, self.calls = session, 0

        async def execute(self, *args: Any, **kwargs: Any) -> Any:
            result = await self.session.execute(*args, **kwargs)
            self.calls += 1
            if self.calls == 1:
                await chain_a_late_event()
            return result

    async with rt.sessions() as session:
        seqs = await timeline.seq_range(Interleaved(session), since, None)  # type: ignore[arg-type]
        assert seqs is not None and seqs[0] <= seqs[1]
        window = AuditSearch(since=since)
        ranged = (await session.execute(search.page_query(window, 500, 0, seqs))).all()
        whole = (await session.execute(search.page_query(window, 500, 0, None))).all()
        assert len(ranged) == 51 and [r.seq for r in ranged] == [
            r.seq for r in whole if r.seq <= seqs[1]]


@pytest.mark.parametrize("edge", [{"since": "0001-01-01T14:00:00+14:00"},
                                  {"until": "9999-12-31T13:59:59.999999-10:00"},
                                  {"since": "0001-01-01T00:00:00Z"},
                                  {"until": "9999-12-31T23:59:59.999999Z"}])
async def test_windows_at_the_ends_of_the_calendar(fresh_runtime: Callable[..., Any],
                                                   edge: dict[str, str]) -> None:
    """A window's bound moved by the lateness beyond the calendar is no bound (an outside
    review got a 500 from `since` in year 1 at +14:00, whose UTC is year 0)."""
    rt = await fresh_runtime()
    await write_chain(rt, 300, times=_one_late)  # lateness 99.5 s
    auditor = await signed_in(rt, "auditor")
    async with client_for(rt) as client:
        answer = await client.get("/api/v1/audit", headers=auditor.headers,
                                  params={**edge, "limit": "500"})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()) == 300 + 2  # the chain, the auditor's account and sign-in


async def test_a_window_in_a_zone_with_daylight_saving(fresh_runtime: Callable[..., Any]) -> None:
    """The bound is moved in UTC, not on a zone's wall clock (which jumps an hour when daylight
    saving starts: an outside review lost an event that way)."""
    rt = await fresh_runtime()
    day = datetime(2026, 3, 29, tzinfo=UTC)  # Europe/Paris moves to summer time at 01:00Z
    times = {1: day, 2: day + timedelta(minutes=105), 3: day + timedelta(minutes=15)}
    await write_chain(rt, 3, times=lambda seq: times[seq])
    window = AuditSearch(until=datetime(2026, 3, 29, 1, 30, tzinfo=ZoneInfo("Europe/Paris")),
                         order="asc")
    async with rt.sessions() as session:
        seqs = await search.window_seqs(session, window)
        ranged = (await session.execute(search.page_query(window, 50, 0, seqs))).all()
    assert [row.seq for row in ranged] == [1, 3]


async def test_the_migration_fills_in_the_timing_of_an_existing_chain(
        fresh_runtime: Callable[..., Any]) -> None:
    """SQLite: the upgrade folds the chain. PostgreSQL: the upgrade leaves the timing empty
    (no fold under the migration's lock on the table) and the sequencer's next batch folds
    the whole chain under the head's row lock."""
    rt = await fresh_runtime(migrate=False)

    def to(revision: str) -> Callable[[Connection], None]:
        def run(connection: Connection) -> None:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
        return run

    async with rt.engine.begin() as connection:
        await connection.run_sync(to("0006"))
    await write_chain(rt, 800, times=_disordered(5), timed=False)
    await upgrade(rt.engine)
    head = await _head(rt)
    expected = Timing(None, timedelta(0)).after(_disordered(5)(seq) for seq in range(1, 801))
    if rt.engine.dialect.name == "postgresql":
        assert head.timed_seq is None
        async with rt.sessions() as session:
            assert await timeline.seq_range(session, START, None) is None
        await signed_in(rt, "patient")
        await rt.sequencer.drain()
        head = await _head(rt)
        expected = await _python_fold(rt)
    assert head.timed_seq == head.seq
    assert Timing.stored(head.latest_at, head.lateness_us) == expected
