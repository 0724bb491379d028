"""Consents: the current choice and its append-only history (SPEC §9)."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, StrictBool
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.auth.models import User
from phivault.db.base import utcnow
from phivault.errors import InvalidToken, NotFound
from phivault.privacy.models import Consent
from phivault.schemas import RequestModel, examples


class ConsentChoice(RequestModel):
    model_config = examples({"marketing": False, "data_sharing": True, "analytics": False})

    marketing: StrictBool
    data_sharing: StrictBool
    analytics: StrictBool


class ConsentView(BaseModel):
    marketing: bool
    data_sharing: bool
    analytics: bool
    consent_date: datetime


def _view(row: Consent) -> ConsentView:
    return ConsentView(marketing=row.marketing, data_sharing=row.data_sharing,
                       analytics=row.analytics, consent_date=row.consent_date)


async def current(session: AsyncSession, patient_id: uuid.UUID) -> ConsentView:
    row = (await session.execute(select(Consent).where(Consent.patient_id == patient_id)
                                 .order_by(Consent.version.desc()).limit(1))
           ).scalar_one_or_none()
    if row is None:
        raise NotFound()
    audit.record(session, Action.VIEW_CONSENT, resource_type="consent", patient_id=patient_id)
    return _view(row)


async def at(session: AsyncSession, patient_id: uuid.UUID, instant: datetime) -> ConsentView:
    """The consents in force at `instant`: the latest version given at or before it (proof of
    consent, GDPR article 7(1)). `NotFound` before the first version."""
    row = (await session.execute(select(Consent).where(
        Consent.patient_id == patient_id, Consent.consent_date <= instant)
        .order_by(Consent.version.desc()).limit(1))).scalar_one_or_none()
    if row is None:
        raise NotFound("No consent was recorded at that time.")
    audit.record(session, Action.VIEW_CONSENT, resource_type="consent", resource_id=row.id,
                 patient_id=patient_id, metadata={"at": True})
    return _view(row)


async def history(session: AsyncSession, patient_id: uuid.UUID) -> list[ConsentView]:
    rows = (await session.execute(select(Consent).where(Consent.patient_id == patient_id)
                                  .order_by(Consent.version))).scalars().all()
    audit.record(session, Action.VIEW_CONSENT, resource_type="consent", patient_id=patient_id,
                 metadata={"history": True})
    return [_view(row) for row in rows]


async def change(session: AsyncSession, patient_id: uuid.UUID,
                 choice: ConsentChoice) -> ConsentView:
    """A new version of the consents; earlier ones stay, as history."""
    # Lock the patient's row so that concurrent changes number their versions one by one, and
    # so that a change racing an erasure cannot land after it.
    status = (await session.execute(select(User.status).where(User.id == patient_id)
                                    .with_for_update())).scalar_one_or_none()
    if status != "active":
        raise InvalidToken()
    latest = (await session.execute(select(func.max(Consent.version)).where(
        Consent.patient_id == patient_id))).scalar_one_or_none() or 0
    row = Consent(id=uuid.uuid4(), patient_id=patient_id, version=latest + 1,
                  marketing=choice.marketing,
                  data_sharing=choice.data_sharing, analytics=choice.analytics,
                  consent_date=utcnow())
    session.add(row)
    audit.record(session, Action.CONSENT_CHANGED, resource_type="consent",
                 resource_id=row.id, patient_id=patient_id,
                 metadata={"marketing": choice.marketing, "data_sharing": choice.data_sharing,
                           "analytics": choice.analytics})
    return _view(row)
