"""The patient's data export (SPEC §9; GDPR articles 15 and 20): everything phivault holds about
one patient, decrypted, as one JSON document or a FHIR R4 Bundle (`privacy/fhir.py` maps it),
streamed in bounded memory, for `GET /me/export` and `phivault gdpr export`.

Allowlists: each section has one serialiser below that picks its fields by name (`FIELDS`
lists them), so a column added to a table never reaches an export unless it is added here.

Paging: the export is read page by page (keyset pagination on each section's order, `PAGE_SIZE`
rows a page), each page in a short read-only transaction of its own that is closed before the
page is decrypted and handed on. No transaction and no pooled connection stays open while a
slow client reads the body, and memory holds one page, whatever the patient's history.

Consistency: the export is as of the instant it begins (`as_of`). Rows added after it are left
out (every section but the profile is append-only or filtered by its creation time, and the
access log is read up to the chain's head at that instant). A consultation's status or notes,
or a notification's `read_at`, changed while the export runs may show the newer value, as the
pages are separate transactions rather than one snapshot; nothing else in the export can
change.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import IO, TYPE_CHECKING, Any, TypeAlias

import orjson
from sqlalchemy import ColumnElement, Row, Select, and_, func, or_, select, union
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from phivault.access.permissions import Role
from phivault.audit import access_log
from phivault.audit import service as audit
from phivault.audit.actions import Action, Outcome
from phivault.audit.models import AuditHead
from phivault.audit.schemas import AccessLogEntry
from phivault.auth.models import StaffProfile, User
from phivault.clinical.models import (
    Attachment,
    Consultation,
    MedicalRecord,
    MedicalRecordVersion,
    Notification,
    PatientProfile,
    Payment,
    Prescription,
)
from phivault.crypto import IntegrityError
from phivault.crypto.envelope import Envelope
from phivault.db.base import core_table, utcnow
from phivault.db.engine import READ_ONLY
from phivault.errors import NotFound
from phivault.keys.models import DataKeyRow
from phivault.keys.service import cipher_from_wrapped
from phivault.observability import get_logger
from phivault.privacy import fhir
from phivault.privacy.models import Consent

if TYPE_CHECKING:
    from phivault.runtime import Runtime

log = get_logger("phivault.export")
AnyRow: TypeAlias = "Row[*tuple[Any, ...]]"

PAGE_SIZE = 500


class ExportFormat(StrEnum):
    JSON = "json"
    FHIR = "fhir"


MEDIA_TYPES = {ExportFormat.JSON: "application/json",
               ExportFormat.FHIR: "application/fhir+json"}

# The documented fields of each section (the README's table): the serialisers below give
# exactly these, and a test holds them to it.
PERSON_FIELDS = ("id", "name")  # a doctor, author or uploader: id, and a staff member's name
FIELDS: dict[str, tuple[str, ...]] = {
    "profile": ("id", "email", "full_name", "birth_date", "sex", "phone", "address", "status",
                "mfa_enabled", "created_at", "deleted_at"),
    "consultations": ("id", "doctor", "scheduled_at", "status", "reason", "notes",
                      "created_at", "updated_at"),
    "medical_records": ("record_id", "version", "author", "diagnosis", "prescriptions", "notes",
                        "created_at"),
    "prescriptions": ("id", "doctor", "medication", "dosage", "instructions", "created_at"),
    "attachments": ("id", "filename", "content_type", "size", "created_at", "uploader"),
    "payments": ("id", "consultation_id", "amount", "currency", "status", "provider_reference",
                 "created_at"),
    "consents": ("version", "marketing", "data_sharing", "analytics", "consent_date"),
    "notifications": ("id", "kind", "text", "created_at", "read_at"),
    "access_log": ("at", "actor_role", "actor_name", "action", "outcome", "break_glass"),
}
SECTIONS = tuple(FIELDS)


class NoSuchPatient(NotFound):
    detail = "No patient has this id."


# Tables, as Core: the export reads many rows and needs no ORM objects.
_USERS, _PROFILES, _STAFF, _KEYS = (core_table(User), core_table(PatientProfile),
                                    core_table(StaffProfile), core_table(DataKeyRow))
_CONSULTATIONS, _RECORDS, _VERSIONS, _PRESCRIPTIONS = (
    core_table(Consultation), core_table(MedicalRecord), core_table(MedicalRecordVersion),
    core_table(Prescription))
_ATTACHMENTS, _PAYMENTS, _CONSENTS, _NOTIFICATIONS = (
    core_table(Attachment), core_table(Payment), core_table(Consent), core_table(Notification))
_USER_KEY, _PROFILE_KEY = _KEYS.alias("user_key"), _KEYS.alias("profile_key")


def _person(person_id: uuid.UUID, name: str | None) -> dict[str, Any]:
    return {"id": person_id, "name": name}


# The serialisers: one per section, each naming the fields it gives.

def _profile(envelope: Envelope, row: AnyRow) -> dict[str, Any]:
    email = None
    if row.email is not None:
        email = cipher_from_wrapped(envelope, "users", row.id, row.data_key_id,
                                    row.user_wrapped).open("email", row.email)
    full_name = birth_date = sex = phone = address = None
    if row.profile_key_id is not None:  # once erased, only the birth year and sex are left
        cipher = cipher_from_wrapped(envelope, "patient_profiles", row.id, row.profile_key_id,
                                     row.profile_wrapped)
        full_name = cipher.open_optional("full_name", row.full_name)
        birth_date = cipher.open_optional("birth_date", row.birth_date)
        sex = cipher.open_optional("sex", row.sex)
        phone = cipher.open_optional("phone", row.phone)
        address = cipher.open_optional("address", row.address)
    return {"id": row.id, "email": email, "full_name": full_name, "birth_date": birth_date,
            "sex": sex, "phone": phone, "address": address, "status": row.status,
            "mfa_enabled": row.totp_enabled, "created_at": row.created_at,
            "deleted_at": row.deleted_at}


def _consultation(envelope: Envelope, row: AnyRow) -> dict[str, Any]:
    cipher = cipher_from_wrapped(envelope, "consultations", row.id, row.data_key_id,
                                 row.wrapped)
    return {"id": row.id, "doctor": _person(row.doctor_id, row.doctor_name),
            "scheduled_at": row.scheduled_at, "status": row.status,
            "reason": cipher.open("reason", row.reason),
            "notes": cipher.open_optional("notes", row.notes), "created_at": row.created_at,
            "updated_at": row.updated_at}


def _record_version(envelope: Envelope, row: AnyRow) -> dict[str, Any]:
    cipher = cipher_from_wrapped(envelope, "medical_record_versions", row.id, row.data_key_id,
                                 row.wrapped)
    return {"record_id": row.record_id, "version": row.version,
            "author": _person(row.author_id, row.author_name),
            "diagnosis": cipher.open("diagnosis", row.diagnosis),
            "prescriptions": json.loads(cipher.open("prescriptions", row.prescriptions)),
            "notes": cipher.open_optional("notes", row.notes), "created_at": row.created_at}


def _prescription(envelope: Envelope, row: AnyRow) -> dict[str, Any]:
    cipher = cipher_from_wrapped(envelope, "prescriptions", row.id, row.data_key_id,
                                 row.wrapped)
    return {"id": row.id, "doctor": _person(row.doctor_id, row.doctor_name),
            "medication": cipher.open("medication", row.medication),
            "dosage": cipher.open("dosage", row.dosage),
            "instructions": cipher.open("instructions", row.instructions),
            "created_at": row.created_at}


def _attachment(envelope: Envelope, row: AnyRow) -> dict[str, Any]:
    """Metadata only: the content stays encrypted at rest (it has its own download)."""
    cipher = cipher_from_wrapped(envelope, "attachments", row.id, row.data_key_id, row.wrapped)
    return {"id": row.id, "filename": cipher.open("filename", row.filename),
            "content_type": row.content_type, "size": row.size, "created_at": row.created_at,
            "uploader": _person(row.uploader_id, row.uploader_name)}


def _payment(_: Envelope, row: AnyRow) -> dict[str, Any]:
    return {"id": row.id, "consultation_id": row.consultation_id, "amount": row.amount,
            "currency": row.currency, "status": row.status,
            "provider_reference": row.provider_reference, "created_at": row.created_at}


def _consent(_: Envelope, row: AnyRow) -> dict[str, Any]:
    return {"version": row.version, "marketing": row.marketing,
            "data_sharing": row.data_sharing, "analytics": row.analytics,
            "consent_date": row.consent_date}


def _notification(envelope: Envelope, row: AnyRow) -> dict[str, Any]:
    cipher = cipher_from_wrapped(envelope, "notifications", row.id, row.data_key_id,
                                 row.wrapped)
    return {"id": row.id, "kind": row.kind, "text": cipher.open("text", row.text),
            "created_at": row.created_at, "read_at": row.read_at}


def _access(entry: AccessLogEntry) -> dict[str, Any]:
    return {"at": entry.at, "actor_role": entry.actor_role, "actor_name": entry.actor_name,
            "action": entry.action, "outcome": entry.outcome, "break_glass": entry.break_glass}


def _practitioner(_: Envelope, row: AnyRow) -> dict[str, Any]:
    """FHIR only: a staff member the export names (directory data, not PHI)."""
    return {"id": row.id, "name": row.full_name, "specialty": row.specialty}


# The queries: each section's rows of one patient up to `as_of`, with each row's wrapped data
# key (an outer join: a missing key is an IntegrityError when opened) and staff names.

def _with_key(table: Any, *joins: tuple[Any, ColumnElement[bool]]) -> Any:
    joined = table.outerjoin(_KEYS, _KEYS.c.id == table.c.data_key_id)
    for other, on in joins:
        joined = joined.outerjoin(other, on)
    return joined


def _consultations(patient_id: uuid.UUID, as_of: datetime) -> Select[Any]:
    t = _CONSULTATIONS
    return (select(t.c.id, t.c.doctor_id, _STAFF.c.full_name.label("doctor_name"),
                   t.c.data_key_id, _KEYS.c.wrapped, t.c.scheduled_at, t.c.status, t.c.reason,
                   t.c.notes, t.c.created_at, t.c.updated_at)
            .select_from(_with_key(t, (_STAFF, _STAFF.c.user_id == t.c.doctor_id)))
            .where(t.c.patient_id == patient_id, t.c.created_at <= as_of))


def _record_versions(patient_id: uuid.UUID, as_of: datetime) -> Select[Any]:
    r, v = _RECORDS, _VERSIONS
    return (select(r.c.created_at.label("record_created_at"), r.c.id.label("record_id"), v.c.id,
                   v.c.version, v.c.author_id, _STAFF.c.full_name.label("author_name"),
                   v.c.data_key_id, _KEYS.c.wrapped, v.c.diagnosis, v.c.prescriptions,
                   v.c.notes, v.c.created_at)
            .select_from(r.join(v, v.c.record_id == r.c.id)
                         .outerjoin(_KEYS, _KEYS.c.id == v.c.data_key_id)
                         .outerjoin(_STAFF, _STAFF.c.user_id == v.c.author_id))
            .where(r.c.patient_id == patient_id, v.c.created_at <= as_of))


def _prescriptions(patient_id: uuid.UUID, as_of: datetime) -> Select[Any]:
    t = _PRESCRIPTIONS
    return (select(t.c.id, t.c.doctor_id, _STAFF.c.full_name.label("doctor_name"),
                   t.c.data_key_id, _KEYS.c.wrapped, t.c.medication, t.c.dosage,
                   t.c.instructions, t.c.created_at)
            .select_from(_with_key(t, (_STAFF, _STAFF.c.user_id == t.c.doctor_id)))
            .where(t.c.patient_id == patient_id, t.c.created_at <= as_of))


def _attachments(patient_id: uuid.UUID, as_of: datetime) -> Select[Any]:
    t = _ATTACHMENTS
    return (select(t.c.id, t.c.uploader_id, _STAFF.c.full_name.label("uploader_name"),
                   t.c.data_key_id, _KEYS.c.wrapped, t.c.filename, t.c.content_type, t.c.size,
                   t.c.created_at)
            .select_from(_with_key(t, (_STAFF, _STAFF.c.user_id == t.c.uploader_id)))
            .where(t.c.patient_id == patient_id, t.c.complete.is_(True),
                   t.c.created_at <= as_of))


def _payments(patient_id: uuid.UUID, as_of: datetime) -> Select[Any]:
    t = _PAYMENTS
    return (select(t.c.id, t.c.consultation_id, t.c.amount, t.c.currency, t.c.status,
                   t.c.provider_reference, t.c.created_at)
            .where(t.c.patient_id == patient_id, t.c.created_at <= as_of))


def _consents(patient_id: uuid.UUID, as_of: datetime) -> Select[Any]:
    t = _CONSENTS
    return (select(t.c.version, t.c.marketing, t.c.data_sharing, t.c.analytics,
                   t.c.consent_date)
            .where(t.c.patient_id == patient_id, t.c.consent_date <= as_of))


def _notifications(patient_id: uuid.UUID, as_of: datetime) -> Select[Any]:
    t = _NOTIFICATIONS
    return (select(t.c.id, t.c.data_key_id, _KEYS.c.wrapped, t.c.kind, t.c.text,
                   t.c.created_at, t.c.read_at)
            .select_from(_with_key(t))
            .where(t.c.user_id == patient_id, t.c.created_at <= as_of))


def _practitioners(patient_id: uuid.UUID, _: datetime) -> Select[Any]:
    named = union(
        select(_CONSULTATIONS.c.doctor_id.label("user_id"))
        .where(_CONSULTATIONS.c.patient_id == patient_id),
        select(_VERSIONS.c.author_id).select_from(
            _RECORDS.join(_VERSIONS, _VERSIONS.c.record_id == _RECORDS.c.id))
        .where(_RECORDS.c.patient_id == patient_id),
        select(_PRESCRIPTIONS.c.doctor_id).where(_PRESCRIPTIONS.c.patient_id == patient_id),
        select(_ATTACHMENTS.c.uploader_id).where(_ATTACHMENTS.c.patient_id == patient_id),
    ).subquery()
    return (select(_USERS.c.id, _STAFF.c.full_name, _STAFF.c.specialty)
            .select_from(_USERS.outerjoin(_STAFF, _STAFF.c.user_id == _USERS.c.id))
            .where(_USERS.c.id.in_(select(named.c.user_id)), _USERS.c.id != patient_id))


@dataclass(frozen=True, slots=True)
class _Section:
    name: str
    query: Callable[[uuid.UUID, datetime], Select[Any]]
    keyset: tuple[str, ...]  # the columns (by name in the query) that order and page it
    item: Callable[[Envelope, AnyRow], dict[str, Any]]


_BY_TIME = ("created_at", "id")
_TABLE_SECTIONS = (
    _Section("consultations", _consultations, _BY_TIME, _consultation),
    _Section("medical_records", _record_versions, ("record_created_at", "record_id", "version"),
             _record_version),
    _Section("prescriptions", _prescriptions, _BY_TIME, _prescription),
    _Section("attachments", _attachments, _BY_TIME, _attachment),
    _Section("payments", _payments, _BY_TIME, _payment),
    _Section("consents", _consents, ("version",), _consent),
    _Section("notifications", _notifications, _BY_TIME, _notification),
)
_PRACTITIONERS = _Section("practitioners", _practitioners, ("id",), _practitioner)


# Reading, a page at a time.

async def _read(sessions: async_sessionmaker[AsyncSession],
                work: Callable[[AsyncSession], Awaitable[Any]]) -> Any:
    """`work` in a short read-only transaction of its own, closed before the result is used
    (a deferred BEGIN on SQLite: an export never waits for writers)."""
    async with sessions() as session:
        await session.connection(execution_options={READ_ONLY: True})
        try:
            return await work(session)
        finally:
            await session.rollback()


def _after(keys: Sequence[ColumnElement[Any]], last: Sequence[Any]) -> ColumnElement[bool]:
    """Rows after `last` in the order of `keys`: (a > x) or (a = x and b > y) or ..."""
    return or_(*(and_(*(keys[j] == last[j] for j in range(i)), keys[i] > last[i])
                 for i in range(len(keys))))


async def _pages(sessions: async_sessionmaker[AsyncSession], query: Select[Any],
                 keyset: Sequence[str], page_size: int) -> AsyncIterator[Sequence[AnyRow]]:
    keys = [query.selected_columns[name] for name in keyset]
    last: tuple[Any, ...] | None = None
    while True:
        page = query if last is None else query.where(_after(keys, last))
        statement = page.order_by(*keys).limit(page_size)

        async def rows(session: AsyncSession, statement: Select[Any] = statement
                       ) -> Sequence[AnyRow]:
            result: Sequence[AnyRow] = (await session.execute(statement)).all()
            return result

        found: Sequence[AnyRow] = await _read(sessions, rows)  # closed before the yield
        if found:
            yield found
        if len(found) < page_size:
            return
        last = tuple(found[-1]._mapping[name] for name in keyset)


@dataclass(frozen=True, slots=True)
class ExportStart:
    """What an export is of, fixed when it begins: the patient's profile (decrypted), the
    instant it is as of, the chain's head then (the access log is read up to it) and the
    consents' newest version then."""

    patient_id: uuid.UUID
    as_of: datetime
    head: int
    latest_consent: int
    profile: dict[str, Any]


async def require_patient(session: AsyncSession, user_id: uuid.UUID) -> None:
    """`NoSuchPatient` unless `user_id` is a patient's account (an erased one included)."""
    role = (await session.execute(select(_USERS.c.role).where(_USERS.c.id == user_id))
            ).scalar_one_or_none()
    if role != Role.PATIENT:
        raise NoSuchPatient()


def record(session: AsyncSession, patient_id: uuid.UUID, fmt: ExportFormat, *,
           via: str | None = None) -> None:
    """Audit the export as `DATA_EXPORT` (its format; no PHI) in the caller's unit of work,
    which commits before the export streams."""
    metadata = {"format": str(fmt)} | ({"via": via} if via else {})
    audit.record(session, Action.DATA_EXPORT, resource_type="data_export",
                 patient_id=patient_id, metadata=metadata)


async def begin(runtime: Runtime, patient_id: uuid.UUID,
                session: AsyncSession | None = None) -> ExportStart:
    """Fix what the export is of and read the profile (`NoSuchPatient` if there is none).
    Chains what is committed first, so the access log holds every access until now.

    With `session` (a request's own), the reads run in it rather than on a second pooled
    connection: a request that held one connection while waiting for another could, in a
    burst, hold the whole pool (and on SQLite the write lock) while every one of them waited."""
    await runtime.sequencer.drain()
    as_of = utcnow()
    profile_query = (
        select(_USERS.c.id, _USERS.c.role, _USERS.c.status, _USERS.c.email,
               _USERS.c.data_key_id, _USER_KEY.c.wrapped.label("user_wrapped"),
               _USERS.c.totp_enabled, _USERS.c.created_at, _USERS.c.deleted_at,
               _PROFILES.c.data_key_id.label("profile_key_id"),
               _PROFILE_KEY.c.wrapped.label("profile_wrapped"), _PROFILES.c.full_name,
               _PROFILES.c.birth_date, _PROFILES.c.sex, _PROFILES.c.phone, _PROFILES.c.address)
        .select_from(_USERS.outerjoin(_USER_KEY, _USER_KEY.c.id == _USERS.c.data_key_id)
                     .outerjoin(_PROFILES, _PROFILES.c.user_id == _USERS.c.id)
                     .outerjoin(_PROFILE_KEY, _PROFILE_KEY.c.id == _PROFILES.c.data_key_id))
        .where(_USERS.c.id == patient_id))

    async def read(session: AsyncSession) -> tuple[AnyRow | None, int, int]:
        row = (await session.execute(profile_query)).one_or_none()
        head = (await session.execute(select(core_table(AuditHead).c.seq))).scalar()
        latest = (await session.execute(select(func.max(_CONSENTS.c.version)).where(
            _CONSENTS.c.patient_id == patient_id, _CONSENTS.c.consent_date <= as_of))).scalar()
        return row, int(head or 0), int(latest or 0)

    row, head, latest = (await read(session) if session is not None
                         else await _read(runtime.sessions, read))
    if row is None or row.role != Role.PATIENT:
        raise NoSuchPatient()
    return ExportStart(patient_id, as_of, head, latest, _profile(runtime.envelope, row))


async def size(runtime: Runtime, start: ExportStart, fmt: ExportFormat) -> int:
    """How many items the export in `fmt` holds (the profile counts one): for a progress bar."""
    async def count(session: AsyncSession) -> int:
        total = 1
        for section in _TABLE_SECTIONS:
            if fmt is ExportFormat.FHIR and section.name not in _FHIR:
                continue
            query = section.query(start.patient_id, start.as_of).subquery()
            total += int((await session.execute(select(func.count()).select_from(query))
                          ).scalar_one())
        return total + await access_log.count_up_to(session, start.patient_id, start.head)

    return int(await _read(runtime.sessions, count))


async def _access_pages(runtime: Runtime, start: ExportStart, page_size: int
                        ) -> AsyncIterator[list[tuple[int, AccessLogEntry]]]:
    after = 0
    while True:
        async def entries(session: AsyncSession, after: int = after
                          ) -> list[tuple[int, AccessLogEntry]]:
            return await access_log.entries_after(session, start.patient_id, after,
                                                  start.head, page_size)

        found: list[tuple[int, AccessLogEntry]] = await _read(runtime.sessions, entries)
        if found:
            yield found
        if len(found) < page_size:
            return
        after = found[-1][0]


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the document, and how many section items it completes."""

    data: bytes
    items: int = 0


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_uuid_text)


def _uuid_text(value: Any) -> str:
    # The PostgreSQL driver gives ids as its own UUID subclass, which orjson does not know.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError


def _join(parts: Sequence[bytes], first: bool) -> bytes:
    return (b"" if first else b",") + b",".join(parts)


async def _json_chunks(runtime: Runtime, start: ExportStart,
                       page_size: int) -> AsyncIterator[Chunk]:
    head = _dumps({"phivault_export": 1, "patient_id": start.patient_id,
                   "as_of": start.as_of, "profile": start.profile})
    yield Chunk(head[:-1], 1)  # the object stays open for the sections
    envelope = runtime.envelope
    for section in _TABLE_SECTIONS:
        yield Chunk(b',"' + section.name.encode() + b'":[')
        first = True
        query = section.query(start.patient_id, start.as_of)
        async for rows in _pages(runtime.sessions, query, section.keyset, page_size):
            parts = [_dumps(section.item(envelope, row)) for row in rows]
            yield Chunk(_join(parts, first), len(parts))
            first = False
        yield Chunk(b"]")
    yield Chunk(b',"access_log":[')
    first = True
    async for entries in _access_pages(runtime, start, page_size):
        parts = [_dumps(_access(entry)) for _, entry in entries]
        yield Chunk(_join(parts, first), len(parts))
        first = False
    yield Chunk(b"]}")


# Each section's FHIR resource; payments have none (see fhir.py).
_FHIR: dict[str, Callable[[ExportStart, dict[str, Any]], bytes]] = {
    "consultations": lambda s, item: fhir.encounter(s.patient_id, item),
    "medical_records": lambda s, item: fhir.condition(s.patient_id, item),
    "prescriptions": lambda s, item: fhir.medication_request(s.patient_id, item),
    "attachments": lambda s, item: fhir.document_reference(s.patient_id, item),
    "consents": lambda s, item: fhir.consent(s.patient_id, item,
                                             current=item["version"] == s.latest_consent),
    "notifications": lambda s, item: fhir.communication(s.patient_id, item),
}


async def _fhir_chunks(runtime: Runtime, start: ExportStart,
                       page_size: int) -> AsyncIterator[Chunk]:
    bundle = _dumps({"resourceType": "Bundle", "id": uuid.uuid4(), "type": "collection",
                     "timestamp": start.as_of})
    yield Chunk(bundle[:-1] + b',"entry":[' + fhir.patient(start.profile) + b","
                + fhir.device(), 1)
    envelope = runtime.envelope
    query = _PRACTITIONERS.query(start.patient_id, start.as_of)
    async for rows in _pages(runtime.sessions, query, _PRACTITIONERS.keyset, page_size):
        yield Chunk(_join([fhir.practitioner(_practitioner(envelope, r)) for r in rows], False))
    for section in _TABLE_SECTIONS:
        resource = _FHIR.get(section.name)
        if resource is None:
            continue
        query = section.query(start.patient_id, start.as_of)
        async for rows in _pages(runtime.sessions, query, section.keyset, page_size):
            parts = [resource(start, section.item(envelope, row)) for row in rows]
            yield Chunk(_join(parts, False), len(parts))
    async for entries in _access_pages(runtime, start, page_size):
        parts = [fhir.audit_event(start.patient_id, seq, _access(entry))
                 for seq, entry in entries]
        yield Chunk(_join(parts, False), len(parts))
    yield Chunk(b"]}")


async def integrity_failure(runtime: Runtime, patient_id: uuid.UUID) -> None:
    """Record `INTEGRITY_FAILURE` for an export cut short by a ciphertext that did not open
    (outside a request's unit of work, which would otherwise record it)."""
    async with runtime.unit_of_work() as session:
        audit.record(session, Action.INTEGRITY_FAILURE, outcome=Outcome.ERROR,
                     resource_type="data_export", patient_id=patient_id)


async def chunks(runtime: Runtime, start: ExportStart, fmt: ExportFormat,
                 page_size: int = PAGE_SIZE) -> AsyncIterator[Chunk]:
    """The export begun at `start`, in `fmt`, a page at a time. A ciphertext that fails to
    open stops it (after `INTEGRITY_FAILURE` is recorded): the document is then incomplete,
    and not valid JSON, so a cut export can never pass for a whole one."""
    build = _json_chunks if fmt is ExportFormat.JSON else _fhir_chunks
    try:
        async for chunk in build(runtime, start, page_size):
            yield chunk
    except IntegrityError:
        log.error("export_integrity_failure", format=str(fmt))
        await integrity_failure(runtime, start.patient_id)
        raise
    except fhir.FhirExportError as exc:
        log.error("export_fhir_mapping_failure", problem=str(exc))
        raise


async def stream(runtime: Runtime, start: ExportStart, fmt: ExportFormat,
                 page_size: int = PAGE_SIZE) -> AsyncIterator[bytes]:
    """`chunks`, as the bytes of a streamed response body."""
    async for chunk in chunks(runtime, start, fmt, page_size):
        if chunk.data:
            yield chunk.data


async def write(runtime: Runtime, start: ExportStart, fmt: ExportFormat, sink: IO[bytes],
                advance: Callable[[int], None] | None = None,
                page_size: int = PAGE_SIZE) -> int:
    """Write the export to `sink`; returns how many items it holds. `advance(n)` after each
    page (a progress bar)."""
    written = 0
    async for chunk in chunks(runtime, start, fmt, page_size):
        sink.write(chunk.data)
        written += chunk.items
        if advance is not None and chunk.items:
            advance(chunk.items)
    return written


__all__ = ["FIELDS", "MEDIA_TYPES", "PAGE_SIZE", "PERSON_FIELDS", "SECTIONS", "Chunk",
           "ExportFormat", "ExportStart", "NoSuchPatient", "begin", "chunks",
           "integrity_failure", "record", "require_patient", "size", "stream", "write"]
