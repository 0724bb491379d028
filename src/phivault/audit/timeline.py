"""How the chain's times follow its order: the bound that turns a time window into a `seq` range.

An event's `at` is taken just before its request's transaction commits, and the sequencer
chains events in the order they were queued, so time follows `seq` closely but not exactly: an
event whose commit came late is chained after newer ones. The head keeps two facts about that
disorder, moved by the sequencer with the head itself (`Timing`):

- `latest_at`: the newest `at` chained so far;
- `lateness`: the most any event's `at` fell behind the newest `at` chained before it.

With `L` the lateness, a time window `[since, until)` lies inside a `seq` range found by two
probes of the `at` index (`seq_range`):

- every event with `at < until` comes before any event `e` with `at >= until + L`: one that came
  after `e` was chained when `e`'s time was already chained, more than `L` behind it;
- every event with `at >= since` comes after any event `f` with `at < since - L`: otherwise `f`
  came after it, more than `L` behind it.

So a search over a window far from both ends of a long trail walks only the window's part of
the chain (SPEC §8's search over 1,000,000 events, measured in bench/audit_search_bench.py),
and its answer is exact whatever the disorder, which only widens the range. `timed_seq` says up
to which `seq` the two facts are kept: the sequencer keeps it equal to the head's `seq`; events
written around the sequencer (a restore, a test's synthetic chain) leave it behind until
`recompute` runs, and meanwhile searches do without the range.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.audit.models import AuditEvent, AuditHead
from phivault.db.base import core_table

_EVENTS, _HEAD = core_table(AuditEvent), core_table(AuditHead)
_ONE = timedelta(microseconds=1)
# Rows read per round trip by `recompute`.
_RECOMPUTE_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class Timing:
    """The head's `latest_at` and `lateness` (see the module's docstring)."""

    latest_at: datetime | None
    lateness: timedelta

    @classmethod
    def stored(cls, latest_at: datetime | None, lateness_us: int | None) -> Timing:
        return cls(latest_at, timedelta(microseconds=lateness_us or 0))

    def after(self, times: Iterable[datetime]) -> Timing:
        """The timing once events of `times` (in `seq` order) are chained after the head."""
        latest, lateness = self.latest_at, self.lateness
        for at in times:
            if latest is None or at > latest:
                latest = at
            elif latest - at > lateness:
                lateness = latest - at
        return Timing(latest, lateness)

    def columns(self) -> dict[str, object]:
        """The head's columns that store this timing."""
        return {"latest_at": self.latest_at, "lateness_us": self.lateness // _ONE}


def recompute(connection: Connection) -> Timing:
    """Read the whole chain's times in `seq` order and store its timing in the head, up to the
    head's `seq` (`timed_seq`). For a migration and for chains written around the sequencer;
    reads in batches, so memory stays constant. Call it where nothing else moves the head (the
    head's row is locked while it runs)."""
    head = connection.execute(select(_HEAD.c.seq).where(_HEAD.c.id == 1)
                              .with_for_update()).scalar_one()
    timing, after = Timing(None, timedelta(0)), 0
    while after < head:
        times = connection.execute(
            select(_EVENTS.c.seq, _EVENTS.c.at)
            .where(_EVENTS.c.seq > after, _EVENTS.c.seq <= head)
            .order_by(_EVENTS.c.seq).limit(_RECOMPUTE_BATCH)).all()
        if not times:
            break
        timing = timing.after(at for _, at in times)
        after = times[-1][0]
    connection.execute(update(_HEAD).where(_HEAD.c.id == 1)
                       .values(timed_seq=head, **timing.columns()))
    return timing


async def seq_range(session: AsyncSession, since: datetime | None,
                    until: datetime | None) -> tuple[int, int] | None:
    """The `seq` range that holds every event of the window `[since, until)`, or None when the
    head's timing does not cover the whole chain (then the caller searches without it)."""
    head = (await session.execute(select(
        _HEAD.c.seq, _HEAD.c.timed_seq, _HEAD.c.latest_at, _HEAD.c.lateness_us)
        .where(_HEAD.c.id == 1))).one_or_none()
    if head is None or head.timed_seq != head.seq:
        return None
    lateness = Timing.stored(head.latest_at, head.lateness_us).lateness
    low, high = 1, int(head.seq)
    try:
        until_bound = None if until is None else until + lateness
        since_bound = None if since is None else since - lateness
    except OverflowError:  # a window at the ends of the calendar: no bound is needed there
        return None
    if until_bound is not None:
        beyond = (await session.execute(
            select(_EVENTS.c.seq).where(_EVENTS.c.at >= until_bound)
            .order_by(_EVENTS.c.at).limit(1))).scalar_one_or_none()
        if beyond is not None:
            high = int(beyond) - 1
    if since_bound is not None:
        before = (await session.execute(
            select(_EVENTS.c.seq).where(_EVENTS.c.at < since_bound)
            .order_by(_EVENTS.c.at.desc()).limit(1))).scalar_one_or_none()
        if before is not None:
            low = int(before) + 1
    return low, high
