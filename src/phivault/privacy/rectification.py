"""Rectification (GDPR article 16, SPEC §9): a patient corrects their own profile."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.auth.schemas import ProfileRectification
from phivault.auth.service import require_active_user
from phivault.clinical.models import PatientProfile
from phivault.crypto.envelope import Envelope
from phivault.errors import InvalidRequest, NotFound
from phivault.keys.service import row_cipher

PROFILES = "patient_profiles"


async def rectify(session: AsyncSession, envelope: Envelope, patient_id: uuid.UUID,
                  change: ProfileRectification) -> list[str]:
    """Seal the fields the body sent (a null removes an optional one) under the profile's
    data key, record `UPDATE_PROFILE` with the names of the fields (never their values), and
    return those names."""
    fields = sorted(change.model_fields_set)
    if not fields:
        raise InvalidRequest("Send at least one of full_name, phone, address and birth_date.")
    if "full_name" in fields and change.full_name is None:
        raise InvalidRequest("full_name cannot be removed, only corrected.")
    await require_active_user(session, patient_id)  # not after an erasure that just won
    profile = await session.get(PatientProfile, patient_id, with_for_update=True)
    if profile is None:
        raise NotFound()
    cipher = await row_cipher(session, envelope, PROFILES, patient_id, profile.data_key_id)
    if "full_name" in fields and change.full_name is not None:
        profile.full_name = cipher.seal("full_name", change.full_name)
    if "phone" in fields:
        profile.phone = cipher.seal_optional("phone", change.phone)
    if "address" in fields:
        profile.address = cipher.seal_optional("address", change.address)
    if "birth_date" in fields:
        profile.birth_date = cipher.seal_optional(
            "birth_date", change.birth_date.isoformat() if change.birth_date else None)
    audit.record(session, Action.UPDATE_PROFILE, resource_type="patient_profile",
                 resource_id=patient_id, patient_id=patient_id,
                 metadata={"fields": ",".join(fields)})
    return fields


__all__ = ["rectify"]
