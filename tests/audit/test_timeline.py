"""The head's timing (audit/timeline.py): a time window's `seq` range never loses an event,
however out of order the chain's times are; the sequencer keeps the timing with the head; a
chain written around the sequencer is searched without it; the migration fills it in."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
from alembic import command
from sqlalchemy import Connection, select

from phivault.audit import search, timeline
from phivault.audit.models import AuditHead
from phivault.audit.schemas import AuditSearch
from phivault.audit.timeline import Timing
from phivault.db.migrate import alembic_config, upgrade
from phivault.runtime import Runtime
from tests.audit.factories import START, write_chain
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


async def test_the_sequencer_keeps_the_timing_with_the_head(runtime: Runtime,
                                                            client: httpx.AsyncClient) -> None:
    for role in ("patient", "doctor", "patient"):
        user = await signed_in(runtime, role)
        assert (await client.get("/api/v1/me", headers=user.headers)).status_code == 200
    await runtime.sequencer.drain()
    head = await _head(runtime)
    assert head.timed_seq == head.seq
    kept = Timing.stored(head.latest_at, head.lateness_us)
    async with runtime.engine.begin() as connection:
        assert await connection.run_sync(timeline.recompute) == kept


async def test_a_chain_written_around_the_sequencer_is_searched_without_the_range(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    at = _disordered(3)
    await write_chain(rt, 500, times=at, timed=False)
    head = await _head(rt)
    assert head.timed_seq != head.seq
    async with rt.sessions() as session:
        assert await timeline.seq_range(session, START, None) is None
        window = AuditSearch(since=START + timedelta(seconds=100),
                             until=START + timedelta(seconds=200))
        page = await search.planned_page_query(session, window, 500, 0)
        seqs = [row.seq for row in (await session.execute(page)).all()]
        assert seqs == [seq for seq in range(500, 0, -1)
                        if window.since <= at(seq) < window.until]  # type: ignore[operator]
    # The sequencer leaves such a head's timing alone: it does not cover the chain.
    user = await signed_in(rt, "patient")
    await rt.sequencer.drain()
    assert user is not None
    moved = await _head(rt)
    assert moved.seq > head.seq and moved.timed_seq == head.timed_seq


async def test_the_migration_fills_in_the_timing_of_an_existing_chain(
        fresh_runtime: Callable[..., Any]) -> None:
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
    assert head.timed_seq == head.seq == 800
    expected = Timing(None, timedelta(0)).after(_disordered(5)(seq) for seq in range(1, 801))
    assert Timing.stored(head.latest_at, head.lateness_us) == expected
