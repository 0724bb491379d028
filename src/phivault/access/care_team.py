"""The patient's care team (SPEC §7): which doctors hold a care relationship with them now, and
ending one doctor's relationship at any moment.

A relationship is what the chart gate (`access/care.py`, `granting`) says it is: a consultation
`scheduled`, or `completed` less than `care_days` (`PHIVAULT_CARE_RELATIONSHIP_DAYS`) after its
scheduled time, made after the patient last ended it. Ending it appends a `CareEnding` (every
consultation made until that instant stops counting, completed ones included) and cancels the
open consultations with that doctor; only a consultation made afterwards, which the patient
books or accepts (a doctor's is only `proposed` now), restores it.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.access.care import care_from, deny, granting, has_care_relationship, not_ended
from phivault.access.schemas import CareTeamMember
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.auth.models import StaffProfile, User
from phivault.clinical.models import CareEnding, Consultation
from phivault.db.base import utcnow
from phivault.errors import NotFound

OPEN_STATUSES = ("proposed", "scheduled")
RESOURCE = "care_relationship"


def _run_start(spans: list[tuple[datetime, datetime | None]]) -> datetime:
    """The start of the last unbroken run of `spans` ([start, end), None: open-ended; at least
    one), merged in order of start. A listed doctor's spans include one that reaches the
    present, so that run is the current one."""
    start: datetime | None = None
    end: datetime | None = None
    for span_start, span_end in sorted(spans, key=lambda span: span[0]):
        if span_end is not None and span_end <= span_start:
            continue  # a consultation completed so late that it never kept anything
        if start is None or (end is not None and span_start > end):
            start, end = span_start, span_end
        elif end is not None:
            end = None if span_end is None else max(end, span_end)
    return start if start is not None else min(span_start for span_start, _ in spans)


async def care_team(session: AsyncSession, patient_id: uuid.UUID, limit: int, offset: int, *,
                    care_days: int) -> tuple[list[CareTeamMember], int]:
    """One page of the doctors with whom the patient has a care relationship now (by name),
    and how many there are; writes `VIEW_CARE_TEAM`. `care_days`: the window a completed
    consultation keeps the relationship."""
    now = utcnow()
    window = timedelta(days=care_days)
    c = Consultation
    cared = (select(c.doctor_id).join(StaffProfile, StaffProfile.user_id == c.doctor_id)
             .where(c.patient_id == patient_id, granting(care_from(now, care_days)))
             .group_by(c.doctor_id, StaffProfile.full_name))
    total = int((await session.execute(
        select(func.count()).select_from(cared.subquery()))).scalar_one())
    by_name = (StaffProfile.full_name, c.doctor_id)
    page = (cared.add_columns(func.row_number().over(order_by=by_name).label("rank"))
            .order_by(*by_name).limit(limit).offset(offset).subquery())
    # With the page, in the same statement (one snapshot): every consultation of these doctors
    # that counts (made since the last end), scheduled or completed, lapsed ones too; together
    # they tell when today's unbroken access began.
    rows = (await session.execute(
        select(c.doctor_id, StaffProfile.full_name, StaffProfile.specialty, c.status,
               c.scheduled_at, c.created_at)
        .join(page, page.c.doctor_id == c.doctor_id)
        .join(StaffProfile, StaffProfile.user_id == c.doctor_id)
        .where(c.patient_id == patient_id, c.status.in_(("scheduled", "completed")),
               not_ended()).order_by(page.c.rank))).all()
    spans: dict[uuid.UUID, list[tuple[datetime, datetime | None]]] = defaultdict(list)
    for row in rows:
        spans[row.doctor_id].append(
            (row.created_at, None if row.status == "scheduled" else row.scheduled_at + window))
    names = {row.doctor_id: (row.full_name, row.specialty) for row in rows}  # in page order
    members = []
    for doctor_id, (full_name, specialty) in names.items():
        ends = [end for _, end in spans[doctor_id]]
        until = None if None in ends else max(end for end in ends if end is not None)
        members.append(CareTeamMember(
            id=doctor_id, full_name=full_name, specialty=specialty,
            since=_run_start(spans[doctor_id]), until=until,
            basis="scheduled" if until is None else "completed"))
    audit.record(session, Action.VIEW_CARE_TEAM, resource_type=RESOURCE, patient_id=patient_id,
                 metadata={"count": len(members)})
    return members, total


async def end_care(session: AsyncSession, patient_id: uuid.UUID, doctor_id: uuid.UUID, *,
                   care_days: int) -> int:
    """End the doctor's care relationship with the patient at once: consultations made so far
    grant nothing any more, and the open ones are cancelled (how many is returned). `NotFound`
    when there is no relationship (no such doctor, or none with this patient). Writes
    `DELETE_CARE_RELATIONSHIP`, and `UPDATE_CONSULTATION` for each one cancelled."""
    # The patient's row first, exclusively: a doctor's new consultation for this patient
    # share-locks it (`clinical/consultations.py`), so it comes wholly before or after this.
    await session.execute(select(User.id).where(User.id == patient_id).with_for_update())
    if not await has_care_relationship(session, doctor_id, patient_id, care_days=care_days):
        raise deny(session, NotFound("No doctor of that id is in your care team."), patient_id,
                   RESOURCE, "no_care_relationship")
    now = utcnow()
    session.add(CareEnding(id=uuid.uuid4(), patient_id=patient_id, doctor_id=doctor_id,
                           ended_at=now))
    cancelled = (await session.execute(
        select(Consultation.id, Consultation.status).where(
            Consultation.patient_id == patient_id, Consultation.doctor_id == doctor_id,
            Consultation.status.in_(OPEN_STATUSES)).with_for_update())).all()
    if cancelled:
        await session.execute(
            update(Consultation).where(Consultation.id.in_([row.id for row in cancelled]))
            .values(status="cancelled", updated_at=now)
            .execution_options(synchronize_session=False))
    for row in cancelled:
        audit.record(session, Action.UPDATE_CONSULTATION, resource_type="consultation",
                     resource_id=row.id, patient_id=patient_id,
                     metadata={"from": row.status, "to": "cancelled", "via": "care_team"})
    audit.record(session, Action.DELETE_CARE_RELATIONSHIP, resource_type=RESOURCE,
                 resource_id=doctor_id, patient_id=patient_id,
                 metadata={"consultations_cancelled": len(cancelled)})
    return len(cancelled)
