"""Erasure (GDPR article 17, SPEC §9): identity destroyed, medical history kept.

One transaction, idempotent. What it does to a patient account:

- identity is destroyed, by crypto-shredding as well as by clearing: the email ciphertext and
  its blind index, the password hash, the TOTP secret, and the profile's name, phone and
  address are set to null, and the data keys that sealed them are deleted, so a copy of those
  ciphertexts (a replica lagging behind, a page not yet overwritten) opens to nothing. The
  birth date is cut to its year and the sex kept, both sealed again under a new data key:
  they are the quasi-identifiers a de-identified research set may carry;
- the account can no longer sign in, every session (and so every refresh and access token)
  is revoked, and the sessions' IP addresses and user agents are cleared;
- notifications are deleted with their data keys; consents are withdrawn (a new, all-false
  version: the history stays, as proof of what was consented to before); open consultations
  in the future are cancelled; an active break-glass grant ends now;
- attachments keep their content (medical history) but lose their original filename, which
  is the patient's own free text: it becomes `attachment.<ext>`;
- medical records, prescriptions, consultations, payments and audit events stay, linked only to
  the pseudonymous id. The access rules for an erased patient live in `access/care.py` and
  `clinical/records.py`: the doctor who wrote a record or prescription keeps read access to
  what they wrote (their records, of each only their own versions, and their prescriptions),
  nobody else reads anything, and nobody sees identity data.

The audit trail keeps the erased person's past events: they hold ids and no PHI, and the
trail's integrity is itself a legal record (see the README, "Erasure").
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from phivault.access.permissions import Role
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.auth.models import AuthSession, User
from phivault.auth.service import revoke_sessions
from phivault.clinical.models import (
    Attachment,
    BreakGlassGrant,
    Consultation,
    Notification,
    PatientProfile,
)
from phivault.crypto.envelope import Envelope, IntegrityError
from phivault.db.base import utcnow
from phivault.errors import Forbidden, NotFound
from phivault.keys.models import DataKeyRow
from phivault.keys.service import new_row_cipher, row_cipher
from phivault.observability import get_logger
from phivault.privacy.models import Consent

log = get_logger("phivault.privacy.erasure")

PROFILES = "patient_profiles"
ATTACHMENTS = "attachments"
OPEN_STATUSES = ("proposed", "scheduled")
EXTENSIONS = {"application/pdf": "pdf", "image/png": "png", "image/jpeg": "jpg",
              "application/dicom": "dcm"}


class NotAPatient(Forbidden):
    detail = "Only a patient account can be erased; disable a staff account instead."


@dataclass(frozen=True, slots=True)
class Erasure:
    """What one erasure did (counts only: the audit event's metadata)."""

    already_erased: bool
    sessions_revoked: int
    notifications_deleted: int
    consultations_cancelled: int
    data_keys_destroyed: int

    def as_metadata(self) -> dict[str, int | bool]:
        return {"already_erased": self.already_erased,
                "sessions_revoked": self.sessions_revoked,
                "notifications_deleted": self.notifications_deleted,
                "consultations_cancelled": self.consultations_cancelled,
                "data_keys_destroyed": self.data_keys_destroyed}


async def erase(session: AsyncSession, envelope: Envelope, user_id: uuid.UUID) -> Erasure:
    """Erase the patient `user_id` in the caller's unit of work (one transaction) and record
    `ACCOUNT_ERASED`. Running it again on an erased account changes nothing more (the event
    says `already_erased`)."""
    # The user's row is locked first: a concurrent login, consent change, booking, payment or
    # rectification share-locks it (`auth.service.lock_active_user`), so it waits and then sees
    # the account deleted.
    # `populate_existing`: the caller may have read the row in an earlier transaction (the
    # password check, `db/phases.py`); what counts is the row as locked now.
    user = (await session.execute(select(User).where(User.id == user_id).with_for_update()
                                  .execution_options(populate_existing=True))
            ).scalar_one_or_none()
    if user is None:
        raise NotFound()
    if user.role != Role.PATIENT:
        raise NotAPatient()
    already = user.status == "deleted"
    now = utcnow()
    shredded: set[uuid.UUID] = set()
    if user.email is not None:
        shredded.add(user.data_key_id)
    user.email = None
    user.email_index = None
    user.password_hash = None
    user.totp_secret = None
    user.totp_enabled = False
    user.totp_last_step = None
    user.setup_token_hash = None
    user.setup_expires_at = None
    user.status = "deleted"
    user.deleted_at = user.deleted_at or now

    profile = await session.get(PatientProfile, user_id, with_for_update=True,
                                populate_existing=True)
    if profile is not None and not already:
        shredded.add(await _cut_profile(session, envelope, profile))

    sessions_revoked = await revoke_sessions(session, AuthSession.user_id == user_id)
    await session.execute(update(AuthSession).where(AuthSession.user_id == user_id)
                          .values(ip=None, user_agent=None)
                          .execution_options(synchronize_session=False))

    notes = (await session.execute(select(Notification.id, Notification.data_key_id).where(
        Notification.user_id == user_id))).all()
    if notes:
        await session.execute(delete(Notification).where(Notification.user_id == user_id)
                              .execution_options(synchronize_session=False))
        shredded.update(key for _, key in notes)

    await _withdraw_consents(session, user_id)
    cancelled = await session.execute(
        update(Consultation).where(Consultation.patient_id == user_id,
                                   Consultation.status.in_(OPEN_STATUSES),
                                   Consultation.scheduled_at > now)
        .values(status="cancelled", updated_at=now).execution_options(synchronize_session=False))
    await session.execute(
        update(BreakGlassGrant).where(BreakGlassGrant.patient_id == user_id,
                                      BreakGlassGrant.expires_at > now)
        .values(expires_at=now).execution_options(synchronize_session=False))
    if not already:
        await _neutral_filenames(session, envelope, user_id)

    if shredded:
        await session.execute(delete(DataKeyRow).where(DataKeyRow.id.in_(shredded))
                              .execution_options(synchronize_session=False))
    result = Erasure(already_erased=already, sessions_revoked=sessions_revoked,
                     notifications_deleted=len(notes),
                     consultations_cancelled=int(cancelled.rowcount),  # type: ignore[attr-defined]
                     data_keys_destroyed=len(shredded))
    audit.record(session, Action.ACCOUNT_ERASED, resource_type="user", resource_id=user_id,
                 patient_id=user_id, metadata=result.as_metadata())
    return result


async def _cut_profile(session: AsyncSession, envelope: Envelope,
                       profile: PatientProfile) -> uuid.UUID:
    """Clear the profile's identity, keep the birth year and sex under a new data key, and
    return the old key's id (for the caller to destroy)."""
    try:
        old = await row_cipher(session, envelope, PROFILES, profile.user_id,
                               profile.data_key_id)
        birth = old.open_optional("birth_date", profile.birth_date)
        sex = old.open_optional("sex", profile.sex)
    except IntegrityError:
        # Erasure never depends on decryption: a damaged value (or key) is dropped with the
        # rest instead of keeping the whole identity alive.
        birth = sex = None
    fresh = new_row_cipher(session, envelope, PROFILES, profile.user_id)
    old_key = profile.data_key_id
    profile.data_key_id = fresh.data_key_id
    profile.full_name = None
    profile.phone = None
    profile.address = None
    profile.birth_date = fresh.seal_optional("birth_date", birth[:4] if birth else None)
    profile.sex = fresh.seal_optional("sex", sex)
    return old_key


async def _withdraw_consents(session: AsyncSession, patient_id: uuid.UUID) -> None:
    """Append an all-false version, unless the current one already is."""
    current = (await session.execute(select(Consent).where(Consent.patient_id == patient_id)
                                     .order_by(Consent.version.desc()).limit(1))
               ).scalar_one_or_none()
    if current is not None and not (current.marketing or current.data_sharing
                                    or current.analytics):
        return
    latest = (await session.execute(select(func.max(Consent.version)).where(
        Consent.patient_id == patient_id))).scalar_one_or_none() or 0
    session.add(Consent(id=uuid.uuid4(), patient_id=patient_id, version=latest + 1,
                        marketing=False, data_sharing=False, analytics=False,
                        consent_date=utcnow()))


async def _neutral_filenames(session: AsyncSession, envelope: Envelope,
                             patient_id: uuid.UUID) -> None:
    rows = (await session.execute(select(Attachment).where(
        Attachment.patient_id == patient_id))).scalars().all()
    for row in rows:
        cipher = await row_cipher(session, envelope, ATTACHMENTS, row.id, row.data_key_id)
        row.filename = cipher.seal("filename",
                                   f"attachment.{EXTENSIONS.get(row.content_type, 'bin')}")


async def forget_on_disk(engine: AsyncEngine) -> None:
    """SQLite only: checkpoint and truncate the write-ahead log after an erasure, so that the
    log's older copies of the erased rows' pages (the blind index among them) leave the disk.
    The main file needs nothing: `secure_delete` zeroes what a write frees. Best effort: with
    a reader in the middle of a transaction, the log is truncated by a later checkpoint."""
    if engine.dialect.name != "sqlite":
        return
    try:
        async with engine.connect() as connection:
            # On the driver's connection: through SQLAlchemy the statement would run inside
            # the BEGIN IMMEDIATE that every unit of work starts, where no checkpoint can.
            driver = (await connection.get_raw_connection()).driver_connection
            if driver is not None:
                await driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except Exception as exc:  # noqa: BLE001 - the erasure is committed; a later checkpoint does it
        log.warning("erasure_checkpoint_failed", error=type(exc).__name__)


__all__ = ["Erasure", "NotAPatient", "erase", "forget_on_disk"]
