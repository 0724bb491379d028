"""Searching the audit trail for auditors (`GET /audit`, SPEC §8): filters, order and paging
over the chained events, a total whose cost stays bounded however long the trail grows, and the
break-glass reasons opened (and audited) for the auditor.

Each filter column has an index that ends in `seq` (`audit/models.py`). A page is found in two
steps: its `seq`s by an index-only read of that index in `seq` order, stopping after `limit`
entries, then its rows by primary key; so a one-filter page costs the same wherever its events
lie in the trail (measured in bench/audit_search_bench.py). A time window is read within the
`seq` range that holds it (`audit/timeline.py`), not from an end of the chain.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.access.break_glass import GrantReason, ReasonMac, open_reasons
from phivault.audit import service as audit
from phivault.audit import timeline
from phivault.audit.actions import Action
from phivault.audit.models import AuditEvent, AuditHead
from phivault.audit.schemas import AuditEventView, AuditSearch, SortOrder
from phivault.audit.sequencer import Sequencer
from phivault.crypto.envelope import Envelope, IntegrityError
from phivault.db.base import core_table

# The total is exact up to this many matching events. Counting is linear in the matches (an
# index range read), so an exact total over a filter that matches most of a large trail would
# cost more than the page itself; beyond the cap the answer says "at least COUNT_CAP" instead.
# The unfiltered total is always exact: it is the head's `seq` (the chain is gap-free).
COUNT_CAP = 10_000

_EVENTS, _HEAD = core_table(AuditEvent), core_table(AuditHead)
_COLUMNS = (_EVENTS.c.seq, _EVENTS.c.event_id, _EVENTS.c.at, _EVENTS.c.actor_id,
            _EVENTS.c.actor_role, _EVENTS.c.action, _EVENTS.c.resource_type,
            _EVENTS.c.resource_id, _EVENTS.c.patient_id, _EVENTS.c.outcome, _EVENTS.c.ip,
            _EVENTS.c.user_agent, _EVENTS.c.request_id, _EVENTS.c.metadata, _EVENTS.c.hash)


@dataclass(frozen=True, slots=True)
class Total:
    """How many events match: `count` exactly, or (when not `exact`) at least `count`."""

    count: int
    exact: bool


@dataclass(frozen=True, slots=True)
class SearchPage:
    events: list[AuditEventView]
    total: Total


def conditions(search: AuditSearch,
               seqs: tuple[int, int] | None = None) -> list[ColumnElement[bool]]:
    """The WHERE clauses of a search (combined with AND); `seqs`, the `seq` range that holds
    its time window, narrows the index range read (it leaves the matches as they are)."""
    c = _EVENTS.c
    found: list[ColumnElement[bool]] = []
    if search.actor_id is not None:
        found.append(c.actor_id == search.actor_id)
    if search.patient_id is not None:
        found.append(c.patient_id == search.patient_id)
    if search.action is not None:
        found.append(c.action == str(search.action))
    if search.outcome is not None:
        found.append(c.outcome == str(search.outcome))
    if search.resource_type is not None:
        found.append(c.resource_type == search.resource_type)
    if search.resource_id is not None:
        found.append(c.resource_id == str(search.resource_id))
    if search.since is not None:
        found.append(c.at >= search.since)
    if search.until is not None:
        found.append(c.at < search.until)
    if seqs is not None:
        found += [c.seq >= seqs[0], c.seq <= seqs[1]]
    return found


def page_query(search: AuditSearch, limit: int, offset: int,
               seqs: tuple[int, int] | None = None) -> Select[Any]:
    """The statement of one page of a search (also what the benchmark explains).

    Two steps: the page's `seq`s first, then their rows by primary key. The first step reads
    only an index where one filter is given (an index-only scan of `(column, seq)`, however the
    matches are spread over the trail), and a deep offset skips index entries, not rows.
    `seqs` is the `seq` range that holds a time window's events (`timeline.seq_range`): the
    walk starts and stops there, not at the ends of the chain.
    """
    ascending = search.order is SortOrder.ASC
    page = (select(_EVENTS.c.seq.label("seq")).where(*conditions(search, seqs))
            .order_by(_EVENTS.c.seq.asc() if ascending else _EVENTS.c.seq.desc())
            .limit(limit).offset(offset).subquery("page"))
    return (select(*_COLUMNS)
            .select_from(_EVENTS.join(page, page.c.seq == _EVENTS.c.seq))
            .order_by(_EVENTS.c.seq.asc() if ascending else _EVENTS.c.seq.desc()))


async def window_seqs(session: AsyncSession, search: AuditSearch) -> tuple[int, int] | None:
    """The `seq` range that holds the search's time window, if it has one.

    Without it, the planner assumes a window's events are spread evenly over the chain: for a
    broad window far in the past, newest first, it walks every newer event before the first
    match (hundreds of thousands), or reads and sorts the whole window."""
    if search.since is None and search.until is None:
        return None
    return await timeline.seq_range(session, search.since, search.until)


async def planned_page_query(session: AsyncSession, search: AuditSearch, limit: int,
                             offset: int) -> Select[Any]:
    """`page_query` within the `seq` range of the search's time window."""
    return page_query(search, limit, offset, await window_seqs(session, search))


def count_query(search: AuditSearch, cap: int,
                seqs: tuple[int, int] | None = None) -> Select[Any]:
    """Count the matches, stopping at `cap + 1`: the cost is bounded by the cap."""
    matches = select(literal(1).label("one")).where(*conditions(search, seqs)).limit(cap + 1)
    return select(func.count()).select_from(matches.subquery())


async def count(session: AsyncSession, search: AuditSearch, cap: int | None = None,
                seqs: tuple[int, int] | None = None) -> Total:
    """The total of a search: exact without filters (the head's `seq`) or up to `cap`
    (default `COUNT_CAP`) matches; beyond, `cap` and not exact. `seqs` as for `page_query`."""
    cap = COUNT_CAP if cap is None else cap
    if not conditions(search):
        head = (await session.execute(select(_HEAD.c.seq).where(_HEAD.c.id == 1))
                ).scalar_one_or_none()
        return Total(int(head or 0), True)
    counted = int((await session.execute(count_query(search, cap, seqs))).scalar_one())
    return Total(counted, True) if counted <= cap else Total(cap, False)


def _view(row: Any) -> AuditEventView:
    metadata = dict(row.metadata or {})
    if row.action == Action.BREAK_GLASS:
        # Events written before reasons were sealed held the reason here, in clear: it is PHI,
        # so it is answered only as `break_glass_reason`, whose reading is audited.
        metadata.pop("reason", None)
    return AuditEventView(
        seq=row.seq, event_id=row.event_id, at=row.at, actor_id=row.actor_id,
        actor_role=row.actor_role, action=row.action, resource_type=row.resource_type,
        resource_id=row.resource_id, patient_id=row.patient_id, outcome=row.outcome,
        ip=row.ip, user_agent=row.user_agent, request_id=row.request_id, metadata=metadata,
        hash=bytes(row.hash).hex())


def _grant_id(resource_id: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(resource_id) if resource_id else None
    except ValueError:
        return None


def _check_reason(reason_mac: ReasonMac, expected: Any, grant_id: uuid.UUID | None,
                  grant: GrantReason | None) -> None:
    """The grant row is outside the chain: an event that carries `reason_mac` vouches for its
    grant's reason, so a grant deleted, a reason nulled or swapped, or a grant moved to another
    patient or doctor raises `IntegrityError` rather than answering no reason."""
    if (not isinstance(expected, str) or grant_id is None or grant is None
            or grant.reason is None):
        raise IntegrityError()
    reason_mac.verify(expected, grant_id, grant.patient_id, grant.doctor_id, grant.reason)


async def _add_break_glass_reasons(session: AsyncSession, envelope: Envelope,
                                   reason_mac: ReasonMac, rows: list[Any],
                                   views: list[AuditEventView]) -> None:
    """Open the reason of each BREAK_GLASS event of the page, check it against the event's
    `reason_mac` (events from before it was written have none), and audit each reason read as
    the auditor's access to that patient's PHI (so it shows in the patient's access log)."""
    glass = [(row, view, _grant_id(row.resource_id)) for row, view in zip(rows, views, strict=True)
             if row.action == Action.BREAK_GLASS]
    grants = await open_reasons(session, envelope, {g for _, _, g in glass if g is not None})
    for row, view, grant_id in glass:
        grant = grants.get(grant_id) if grant_id is not None else None
        if "reason_mac" in (row.metadata or {}):
            _check_reason(reason_mac, row.metadata["reason_mac"], grant_id, grant)
        reason = grant.reason if grant is not None else None
        if reason is None:
            legacy = (row.metadata or {}).get("reason")
            reason = legacy if isinstance(legacy, str) else None
        if reason is None:
            continue
        view.break_glass_reason = reason
        audit.record(session, Action.VIEW_BREAK_GLASS_REASON, resource_type="break_glass",
                     resource_id=row.resource_id,
                     patient_id=grant.patient_id if grant is not None else row.patient_id)


def _filters_used(search: AuditSearch, limit: int, offset: int) -> dict[str, Any]:
    used: dict[str, Any] = {"order": str(search.order), "limit": limit, "offset": offset}
    for name, value in (("filter_actor_id", search.actor_id),
                        ("filter_patient_id", search.patient_id),
                        ("filter_action", search.action), ("filter_outcome", search.outcome),
                        ("filter_resource_type", search.resource_type),
                        ("filter_resource_id", search.resource_id),
                        ("since", search.since), ("until", search.until)):
        if value is not None:
            used[name] = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return used


async def search_events(session: AsyncSession, sequencer: Sequencer, envelope: Envelope,
                        reason_mac: ReasonMac, search: AuditSearch, limit: int,
                        offset: int) -> SearchPage:
    """One page of the events matching `search`, in `seq` order (`search.order`), and the
    total (exact up to `COUNT_CAP`). Chains what is committed first, so the caller sees their
    own actions. Audited as `VIEW_AUDIT_TRAIL` with the filters used; each break-glass reason
    answered is audited as `VIEW_BREAK_GLASS_REASON` with the patient's id; one that fails its
    `reason_mac` check raises `IntegrityError`."""
    await sequencer.drain()
    seqs = await window_seqs(session, search)
    rows = list((await session.execute(page_query(search, limit, offset, seqs))).all())
    total = await count(session, search, seqs=seqs)
    views = [_view(row) for row in rows]
    await _add_break_glass_reasons(session, envelope, reason_mac, rows, views)
    audit.record(session, Action.VIEW_AUDIT_TRAIL, resource_type="audit_trail",
                 metadata={**_filters_used(search, limit, offset), "count": len(views)})
    return SearchPage(views, total)
