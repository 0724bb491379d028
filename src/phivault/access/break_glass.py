"""Break-glass: a doctor's emergency read access to a patient's chart for 60 minutes, whatever
the relationship or consent, audited as a BREAK_GLASS event, with a notification to the patient.

The reason the doctor gives is clinical free text, so PHI: it is sealed in the grant under the
grant's own data key, never written to the audit trail. The BREAK_GLASS event names the grant
(`resource_id`), and auditors read the reason through the audit API (`open_reasons`).

The grant row is not tamper-evident (the runtime role may update and delete it), so the event
also holds `reason_mac`, a keyed digest of the grant's id, patient, doctor and reason
(`ReasonMac`): the chain then vouches for the reason, and a reason nulled, swapped, rebound to
another patient or doctor, or deleted with its grant is an integrity failure when read.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.access.care import break_glass_window, deny, patient_status
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.auth.accounts import account_email
from phivault.auth.tokens import AccessClaims
from phivault.clinical import notifications
from phivault.clinical.models import BreakGlassGrant
from phivault.crypto.envelope import Envelope, IntegrityError
from phivault.crypto.keys import derive_key
from phivault.db.base import core_table, utcnow
from phivault.errors import NoCareRelationship, NotFound
from phivault.keys.models import DataKeyRow
from phivault.keys.service import cipher_from_wrapped, new_row_cipher
from phivault.ops.mail import Outbox, break_glass_notice

GRANTS = "break_glass_grants"
REASON_MAC_PURPOSE = "break-glass-reason"


@dataclass(frozen=True, slots=True)
class ReasonMac:
    """HMAC-SHA256 over a grant's id, patient id, doctor id and reason, under a key derived
    from the audit key for this purpose alone; its hex goes in the BREAK_GLASS event."""

    key: bytes = field(repr=False)

    @classmethod
    def from_audit_key(cls, audit_key: bytes) -> ReasonMac:
        return cls(derive_key(audit_key, REASON_MAC_PURPOSE))

    def digest(self, grant_id: uuid.UUID, patient_id: uuid.UUID, doctor_id: uuid.UUID,
               reason: str) -> str:
        # Each part length-prefixed, so no two different tuples share an input.
        message = b"".join(len(part).to_bytes(4, "big") + part for part in (
            grant_id.bytes, patient_id.bytes, doctor_id.bytes, reason.encode("utf-8")))
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def verify(self, expected: str, grant_id: uuid.UUID, patient_id: uuid.UUID,
               doctor_id: uuid.UUID, reason: str) -> None:
        """Raise `IntegrityError` unless `expected` is the digest of these values."""
        actual = self.digest(grant_id, patient_id, doctor_id, reason)
        if not hmac.compare_digest(actual.encode("ascii"), expected.encode("utf-8")):
            raise IntegrityError()


async def break_glass(session: AsyncSession, envelope: Envelope, reason_mac: ReasonMac,
                      claims: AccessClaims, patient_id: uuid.UUID,
                      reason: str, outbox: Outbox | None = None) -> BreakGlassGrant:
    """Grant `claims`' doctor 60 minutes of read access to the patient's chart, seal the reason
    in the grant and bind it in the BREAK_GLASS event (`reason_mac`). With an `outbox` (mail
    configured), the patient is also mailed once the grant has committed: when, and where to
    look; never the reason."""
    status = await patient_status(session, patient_id)
    if status is None:
        raise deny(session, NotFound(), None, "break_glass", "no_such_patient")
    if status == "deleted":
        # Nobody reads an erased patient's chart, in an emergency neither (SPEC §7, §9):
        # there is no living person's care to serve, and no one to notify.
        raise deny(session, NoCareRelationship(), patient_id, "break_glass", "erased")
    now = utcnow()
    grant_id = uuid.uuid4()
    cipher = new_row_cipher(session, envelope, GRANTS, grant_id)
    grant = BreakGlassGrant(id=grant_id, doctor_id=claims.user_id, patient_id=patient_id,
                            created_at=now, expires_at=now + break_glass_window(),
                            data_key_id=cipher.data_key_id,
                            reason=cipher.seal("reason", reason))
    session.add(grant)
    audit.record(session, Action.BREAK_GLASS, resource_type="break_glass",
                 resource_id=grant.id, patient_id=patient_id,
                 metadata={"expires_at": grant.expires_at.isoformat(),
                           "reason_mac": reason_mac.digest(grant_id, patient_id,
                                                           claims.user_id, reason)})
    notifications.notify(
        session, envelope, patient_id, "break_glass",
        "A doctor used emergency (break-glass) access to read your medical records at "
        f"{now:%Y-%m-%d %H:%M} UTC, for 60 minutes. It is in your access log, and auditors "
        "review the reason they gave.")
    if outbox is not None:
        # By mail too, sent once the grant has committed: when, and where to look.
        email = await account_email(session, envelope, patient_id)
        if email is not None:
            outbox.post(break_glass_notice(patient_id, email, now))
    return grant


@dataclass(frozen=True, slots=True)
class GrantReason:
    patient_id: uuid.UUID
    doctor_id: uuid.UUID
    reason: str | None  # None: a grant made before reasons were sealed


_GRANTS, _DATA_KEYS = core_table(BreakGlassGrant), core_table(DataKeyRow)
_REASONS = (
    select(_GRANTS.c.id, _GRANTS.c.patient_id, _GRANTS.c.doctor_id, _GRANTS.c.data_key_id,
           _GRANTS.c.reason, _DATA_KEYS.c.wrapped)
    .select_from(_GRANTS.outerjoin(_DATA_KEYS, _DATA_KEYS.c.id == _GRANTS.c.data_key_id))
)


async def open_reasons(session: AsyncSession, envelope: Envelope,
                       grant_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, GrantReason]:
    """The reasons of the given grants, opened, in one round trip (unknown ids are left out).

    This reads PHI: the caller audits it. A sealed reason whose data key is gone or whose
    ciphertext fails authentication raises `IntegrityError`, as every PHI read does.
    """
    if not grant_ids:
        return {}
    rows = (await session.execute(_REASONS.where(_GRANTS.c.id.in_(list(grant_ids))))).all()
    found = {}
    for row in rows:
        reason = None
        if row.reason is not None:
            cipher = cipher_from_wrapped(envelope, GRANTS, row.id, row.data_key_id, row.wrapped)
            reason = cipher.open("reason", row.reason)
        found[row.id] = GrantReason(row.patient_id, row.doctor_id, reason)
    return found
