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
to which `seq` the two facts hold; searches do without the range when it is not the head's.

Who keeps the timing, so that nobody can narrow it and hide events from searches:
- On PostgreSQL the head's trigger (migration 0007) computes it on every move of the head from
  the events the head moves past, whatever the UPDATE says: the runtime role, which may move
  the head, cannot write a lateness that would leave a late event outside its window (an
  outside review showed that writing `lateness_us = 0` hid such an event from every window
  search while `verify` said ok). An UPDATE that sets `timed_seq` to NULL makes it fold the
  whole chain again (`recompute`).
- On SQLite (embedded: no database roles) the sequencer folds it in Python (`Timing.after`),
  and catches up over the whole chain when the head's timing is behind (`fold`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

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


def fold(connection: Connection, upto: int) -> Timing:
    """The timing of the chain's events up to `upto`, read in `seq` order in batches (constant
    memory)."""
    timing, after = Timing(None, timedelta(0)), 0
    while after < upto:
        times = connection.execute(
            select(_EVENTS.c.seq, _EVENTS.c.at)
            .where(_EVENTS.c.seq > after, _EVENTS.c.seq <= upto)
            .order_by(_EVENTS.c.seq).limit(_RECOMPUTE_BATCH)).all()
        if not times:
            break
        timing = timing.after(at for _, at in times)
        after = times[-1][0]
    return timing


def recompute(connection: Connection) -> Timing:
    """Store the whole chain's timing in the head (after a chain was written around the
    sequencer: a restore, a test's synthetic chain); returns it. On PostgreSQL the head's
    trigger folds the chain itself, asked by a NULL `timed_seq`; elsewhere it is read here.
    The head's row is locked while it runs."""
    if connection.dialect.name == "postgresql":
        connection.execute(update(_HEAD).where(_HEAD.c.id == 1).values(timed_seq=None))
    else:
        head = connection.execute(select(_HEAD.c.seq).where(_HEAD.c.id == 1)
                                  .with_for_update()).scalar_one()
        connection.execute(update(_HEAD).where(_HEAD.c.id == 1)
                           .values(timed_seq=head, **fold(connection, head).columns()))
    stored = connection.execute(select(_HEAD.c.latest_at, _HEAD.c.lateness_us)
                                .where(_HEAD.c.id == 1)).one()
    return Timing.stored(stored.latest_at, stored.lateness_us)


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
    last = int(head.seq)
    low, high = 1, last
    # In UTC: an offset's wall clock near the ends of the calendar, or a zone's daylight-saving
    # jump, must not move the bound. A bound beyond the calendar is no bound at all.
    until_bound = _shifted(until, lateness)
    since_bound = _shifted(since, -lateness)
    # Each probe stays within the head read above: a batch chained since then may hold a
    # late event beyond it, which the timing read does not yet cover.
    if until_bound is not None:
        beyond = (await session.execute(
            select(_EVENTS.c.seq).where(_EVENTS.c.at >= until_bound, _EVENTS.c.seq <= last)
            .order_by(_EVENTS.c.at).limit(1))).scalar_one_or_none()
        if beyond is not None:
            high = int(beyond) - 1
    if since_bound is not None:
        before = (await session.execute(
            select(_EVENTS.c.seq).where(_EVENTS.c.at < since_bound, _EVENTS.c.seq <= last)
            .order_by(_EVENTS.c.at.desc()).limit(1))).scalar_one_or_none()
        if before is not None:
            low = int(before) + 1
    return low, high


def _shifted(instant: datetime | None, by: timedelta) -> datetime | None:
    """`instant` moved `by`, in UTC; None when there is no instant or the result is beyond the
    calendar (or so close to its ends that the database could not hold it)."""
    if instant is None:
        return None
    try:
        moved = instant.astimezone(UTC) + by
    except OverflowError:
        return None
    if not (datetime(2, 1, 1, tzinfo=UTC) <= moved <= datetime(9998, 12, 31, tzinfo=UTC)):
        return None
    return moved
