"""Break-glass: a doctor's emergency read access to a patient's chart for 60 minutes, whatever
the relationship or consent, with the reason in a BREAK_GLASS audit event and a notification to
the patient."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from phivault.access.care import break_glass_window, deny, is_patient
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.auth.tokens import AccessClaims
from phivault.clinical import notifications
from phivault.clinical.models import BreakGlassGrant
from phivault.crypto.envelope import Envelope
from phivault.db.base import utcnow
from phivault.errors import NotFound


async def break_glass(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                      patient_id: uuid.UUID, reason: str) -> BreakGlassGrant:
    if not await is_patient(session, patient_id):
        raise deny(session, NotFound(), None, "break_glass", "no_such_patient")
    now = utcnow()
    grant = BreakGlassGrant(id=uuid.uuid4(), doctor_id=claims.user_id, patient_id=patient_id,
                            created_at=now, expires_at=now + break_glass_window())
    session.add(grant)
    audit.record(session, Action.BREAK_GLASS, resource_type="break_glass",
                 resource_id=grant.id, patient_id=patient_id,
                 metadata={"reason": reason, "expires_at": grant.expires_at.isoformat()})
    notifications.notify(
        session, envelope, patient_id, "break_glass",
        "A doctor used emergency (break-glass) access to read your medical records at "
        f"{now:%Y-%m-%d %H:%M} UTC, for 60 minutes. The reason they gave is in your access "
        "log and is reviewed by auditors.")
    return grant
