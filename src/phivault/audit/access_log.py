"""A patient's access log (SPEC §8, `GET /me/access-log`): every event about the patient's data
made by someone else (staff, the system, anyone but the patient), newest first, with who acted
and whether it was an emergency (break-glass) access. Kept apart from the route so that the
privacy portal and the data export read the same log.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, Row, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.audit import search
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.audit.models import AuditEvent
from phivault.audit.schemas import AccessLogEntry
from phivault.audit.sequencer import Sequencer
from phivault.auth.models import StaffProfile
from phivault.db.base import core_table

_EVENTS, _STAFF = core_table(AuditEvent), core_table(StaffProfile)


def _about(patient_id: uuid.UUID) -> list[ColumnElement[bool]]:
    # "Someone else" includes the system (a null actor), hence IS DISTINCT FROM, not !=.
    return [_EVENTS.c.patient_id == patient_id,
            _EVENTS.c.actor_id.is_distinct_from(patient_id)]


def is_break_glass(action: str, metadata: Mapping[str, Any] | None) -> bool:
    """The break-glass itself, or an access its grant allowed (records.py marks those)."""
    metadata = metadata or {}
    return (action == Action.BREAK_GLASS or metadata.get("break_glass") is True
            or metadata.get("basis") == "break_glass")


async def read(session: AsyncSession, sequencer: Sequencer, patient_id: uuid.UUID,
               limit: int, offset: int) -> tuple[list[AccessLogEntry], search.Total]:
    """One page of the patient's access log, newest first (by `seq`), and its total: exact up
    to `search.COUNT_CAP` entries, beyond that the cap and not exact (as `GET /audit` counts).

    Chains what is committed first, so an access that just happened is listed. Records no
    event: the caller audits its own purpose (`view` for the log itself, `DATA_EXPORT` ...).
    """
    await sequencer.drain()
    where = _about(patient_id)
    # The total and the page's seqs come from the patient's index alone (it carries actor_id,
    # migration 0004); then the page's rows, by primary key, with the staff names. The count
    # stops past the cap, so a patient with a million events costs no more than one with 10,000.
    cap = search.COUNT_CAP
    matches = select(literal(1).label("one")).where(*where).limit(cap + 1).subquery()
    counted = int((await session.execute(
        select(func.count()).select_from(matches))).scalar_one())
    total = search.Total(counted, True) if counted <= cap else search.Total(cap, False)
    page = (select(_EVENTS.c.seq.label("seq")).where(*where).order_by(_EVENTS.c.seq.desc())
            .limit(limit).offset(offset).subquery("page"))
    rows = (await session.execute(
        select(*_ENTRY_COLUMNS)
        .select_from(_EVENTS.join(page, page.c.seq == _EVENTS.c.seq)
                     .outerjoin(_STAFF, _STAFF.c.user_id == _EVENTS.c.actor_id))
        .order_by(_EVENTS.c.seq.desc()))).all()
    return [_entry(row) for row in rows], total


_ENTRY_COLUMNS = (_EVENTS.c.seq, _EVENTS.c.at, _EVENTS.c.actor_role, _STAFF.c.full_name,
                  _EVENTS.c.action, _EVENTS.c.outcome, _EVENTS.c.metadata)


def _entry(row: Row[*tuple[Any, ...]]) -> AccessLogEntry:
    return AccessLogEntry(at=row.at, actor_role=row.actor_role, actor_name=row.full_name,
                          action=row.action, outcome=row.outcome,
                          break_glass=is_break_glass(row.action, row.metadata))


async def entries_after(session: AsyncSession, patient_id: uuid.UUID, after_seq: int,
                        up_to_seq: int, limit: int) -> list[tuple[int, AccessLogEntry]]:
    """The log oldest first, a page at a time by `seq` (keyset pagination), for readers that
    walk all of it (the data export): the entries with `after_seq < seq <= up_to_seq`, each
    with its `seq`. Neither sequences nor records an event: as `read`, the caller does."""
    rows = (await session.execute(
        select(*_ENTRY_COLUMNS)
        .select_from(_EVENTS.outerjoin(_STAFF, _STAFF.c.user_id == _EVENTS.c.actor_id))
        .where(*_about(patient_id), _EVENTS.c.seq > after_seq, _EVENTS.c.seq <= up_to_seq)
        .order_by(_EVENTS.c.seq).limit(limit))).all()
    return [(row.seq, _entry(row)) for row in rows]


async def view(session: AsyncSession, sequencer: Sequencer, patient_id: uuid.UUID,
               limit: int, offset: int) -> tuple[list[AccessLogEntry], search.Total]:
    """`read`, audited as the patient's `VIEW_ACCESS_LOG`."""
    entries, total = await read(session, sequencer, patient_id, limit, offset)
    audit.record(session, Action.VIEW_ACCESS_LOG, resource_type="access_log",
                 patient_id=patient_id, metadata={"count": len(entries), "offset": offset})
    return entries, total


async def count_up_to(session: AsyncSession, patient_id: uuid.UUID, up_to_seq: int) -> int:
    """How many entries `entries_after` walks through up to `up_to_seq` (exact, uncapped: an
    export counts what it will write)."""
    return int((await session.execute(
        select(func.count()).select_from(_EVENTS)
        .where(*_about(patient_id), _EVENTS.c.seq <= up_to_seq))).scalar_one())
