"""Medical records (versioned: an amendment adds a version, none is ever overwritten) and
prescriptions. Every read and write passes `require_chart_access` and is audited; reads made
under break-glass say so in their audit event."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, exists, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.access.care import (
    CHART_FACT_NAMES,
    CHART_FACTS,
    Basis,
    chart_decision,
    chart_facts,
    chart_parameters,
    deny,
    require_chart_access,
)
from phivault.access.permissions import Role
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.audit.service import HoldsEvents
from phivault.auth.tokens import AccessClaims
from phivault.clinical.models import MedicalRecord, MedicalRecordVersion, Prescription
from phivault.clinical.schemas import (
    PrescriptionCreate,
    PrescriptionView,
    RecordAmend,
    RecordCreate,
    RecordView,
)
from phivault.crypto.envelope import Envelope
from phivault.db.base import core_table, utcnow
from phivault.db.direct import DirectWork, event_cte, insert_cte, prefixed
from phivault.db.paging import fetch_page
from phivault.errors import InvalidRequest, NoCareRelationship, NotFound
from phivault.keys.models import DataKeyRow
from phivault.keys.service import RowCipher, cipher_from_wrapped, new_row_cipher, row_cipher

VERSIONS = "medical_record_versions"
PRESCRIPTIONS = "prescriptions"


def basis_metadata(basis: Basis) -> dict[str, str | bool]:
    return {"basis": str(basis), "break_glass": basis is Basis.BREAK_GLASS}


def _sealed_version(cipher: RowCipher, diagnosis: str, prescriptions: list[str],
                    notes: str | None) -> dict[str, bytes | None]:
    """A version's sealed columns."""
    return {"diagnosis": cipher.seal("diagnosis", diagnosis),
            "prescriptions": cipher.seal("prescriptions", json.dumps(prescriptions)),
            "notes": cipher.seal_optional("notes", notes)}


def _seal_version(session: AsyncSession, envelope: Envelope, record: MedicalRecord,
                  version: int, author: uuid.UUID, diagnosis: str, prescriptions: list[str],
                  notes: str | None) -> MedicalRecordVersion:
    row_id = uuid.uuid4()
    cipher = new_row_cipher(session, envelope, VERSIONS, row_id)
    row = MedicalRecordVersion(
        id=row_id, record_id=record.id, version=version, author_id=author,
        data_key_id=cipher.data_key_id, created_at=utcnow(),
        **_sealed_version(cipher, diagnosis, prescriptions, notes))
    session.add(row)
    return row


async def _open_version(session: AsyncSession, envelope: Envelope, record: MedicalRecord,
                        row: MedicalRecordVersion) -> RecordView:
    """The view of one version of `record`."""
    cipher = await row_cipher(session, envelope, VERSIONS, row.id, row.data_key_id)
    return _view(cipher, record.id, record.patient_id, record.created_at, row)


def _view(cipher: RowCipher, record_id: uuid.UUID, patient_id: uuid.UUID,
          created_at: datetime, row: MedicalRecordVersion | Row[*tuple[Any, ...]]) -> RecordView:
    """Open a version's fields (an ORM row, or a `_LATEST` row with the same field names)."""
    return RecordView(id=record_id, patient_id=patient_id, author_id=row.author_id,
                      version=row.version, diagnosis=cipher.open("diagnosis", row.diagnosis),
                      prescriptions=json.loads(cipher.open("prescriptions", row.prescriptions)),
                      notes=cipher.open_optional("notes", row.notes), created_at=created_at,
                      updated_at=row.created_at)


def _open_latest(envelope: Envelope, row: Row[*tuple[Any, ...]]) -> RecordView:
    """The view of a `_LATEST` row: its data key came with it, so no further round trip."""
    cipher = cipher_from_wrapped(envelope, VERSIONS, row.id, row.data_key_id, row.wrapped)
    return _view(cipher, row.record_id, row.patient_id, row.record_created_at, row)


def _record_viewed(work: HoldsEvents, view: RecordView, basis: Basis) -> None:
    audit.record(work, Action.VIEW_MEDICAL_RECORD, resource_type="medical_record",
                 resource_id=view.id, patient_id=view.patient_id,
                 metadata={"version": view.version, **basis_metadata(basis)})


def _record_created(work: HoldsEvents, record_id: uuid.UUID, patient_id: uuid.UUID,
                    basis: Basis) -> None:
    audit.record(work, Action.CREATE_MEDICAL_RECORD, resource_type="medical_record",
                 resource_id=record_id, patient_id=patient_id,
                 metadata={"version": 1, **basis_metadata(basis)})


async def create_record(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                        patient_id: uuid.UUID, body: RecordCreate, *,
                        care_days: int) -> RecordView:
    basis = await require_chart_access(session, claims, patient_id, write=True,
                                       resource_type="medical_record", care_days=care_days)
    now = utcnow()
    record = MedicalRecord(id=uuid.uuid4(), patient_id=patient_id, author_id=claims.user_id,
                           latest_version=1, created_at=now, updated_at=now)
    session.add(record)
    await session.flush()
    row = _seal_version(session, envelope, record, 1, claims.user_id, body.diagnosis,
                        body.prescriptions, body.notes)
    _record_created(session, record.id, patient_id, basis)
    return await _open_version(session, envelope, record, row)


# A record with its latest version and that version's wrapped data key, in one round trip and
# as plain columns (Core, no ORM objects): this runs on every record read. The version's own
# columns keep their names, so `_view` opens a row of it like a `MedicalRecordVersion`.
_RECORDS, _VERSIONS, _DATA_KEYS = (
    core_table(MedicalRecord), core_table(MedicalRecordVersion), core_table(DataKeyRow))
_LATEST = (
    select(_RECORDS.c.id.label("record_id"), _RECORDS.c.patient_id,
           _RECORDS.c.author_id.label("record_author_id"),
           _RECORDS.c.created_at.label("record_created_at"), _VERSIONS.c.id,
           _VERSIONS.c.version, _VERSIONS.c.author_id, _VERSIONS.c.data_key_id,
           _VERSIONS.c.diagnosis, _VERSIONS.c.prescriptions, _VERSIONS.c.notes,
           _VERSIONS.c.created_at, _DATA_KEYS.c.wrapped)
    .select_from(_RECORDS.join(_VERSIONS, (_VERSIONS.c.record_id == _RECORDS.c.id)
                               & (_VERSIONS.c.version == _RECORDS.c.latest_version))
                 .outerjoin(_DATA_KEYS, _DATA_KEYS.c.id == _VERSIONS.c.data_key_id))
)
_LATEST_BY_ID = _LATEST.where(_RECORDS.c.id == bindparam("record_id"))
# For a doctor, the chart decision's facts about the record's patient come in the same round
# trip (`care.chart_facts`): a record read is one statement before its audit event.
_LATEST_BY_ID_WITH_CHART = _LATEST_BY_ID.add_columns(*chart_facts(_RECORDS.c.patient_id))


def _written_by(doctor_id: uuid.UUID) -> Any:
    """Records the doctor created. What a doctor keeps of an erased patient (`Basis.AUTHOR`),
    and of each only the versions they wrote: SPEC §9's "the records they wrote themselves, and
    nothing else" (an outside review showed that counting any version let a one-character
    amendment buy another doctor's notes)."""
    return MedicalRecord.author_id == doctor_id


async def _require_written(session: AsyncSession, claims: AccessClaims, basis: Basis,
                           record_id: uuid.UUID, patient_id: uuid.UUID) -> None:
    """Under `Basis.AUTHOR`, refuse a record the caller did not create."""
    if basis is not Basis.AUTHOR:
        return
    wrote = (await session.execute(select(exists().where(
        MedicalRecord.id == record_id, _written_by(claims.user_id))))).scalar()
    if not wrote:
        raise deny(session, NoCareRelationship(), patient_id, "medical_record", "erased")


async def _latest(session: AsyncSession, record: MedicalRecord) -> MedicalRecordVersion:
    return (await session.execute(select(MedicalRecordVersion).where(
        MedicalRecordVersion.record_id == record.id,
        MedicalRecordVersion.version == record.latest_version))).scalar_one()


async def _record_for(session: AsyncSession, claims: AccessClaims, record_id: uuid.UUID,
                      *, write: bool, care_days: int) -> tuple[MedicalRecord, Basis]:
    record = await session.get(MedicalRecord, record_id, with_for_update=write)
    if record is None:
        # The same answer a patient gets for another patient's record: ids reveal nothing.
        raise deny(session, NotFound(), None, "medical_record", "no_such_record")
    basis = await require_chart_access(session, claims, record.patient_id, write=write,
                                       resource_type="medical_record", care_days=care_days,
                                       authored=True)
    await _require_written(session, claims, basis, record.id, record.patient_id)
    return record, basis


async def list_records(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                       patient_id: uuid.UUID, limit: int, offset: int, *,
                       care_days: int) -> tuple[list[RecordView], int]:
    """The latest version of each of the patient's records."""
    basis = await require_chart_access(session, claims, patient_id, write=False,
                                       resource_type="medical_record", care_days=care_days,
                                       authored=True)
    where = [MedicalRecord.patient_id == patient_id]
    if basis is Basis.AUTHOR:
        where.append(_written_by(claims.user_id))
    total = int((await session.execute(
        select(func.count()).select_from(MedicalRecord).where(*where))).scalar_one())
    # Under `Basis.AUTHOR`: the records the caller created whose latest version is theirs too
    # (the others' versions stay theirs: `/versions` gives the caller's own).
    chosen = (_LATEST.where(_RECORDS.c.id.in_(select(MedicalRecord.id).where(*where)),
                            _VERSIONS.c.author_id == claims.user_id)
              if basis is Basis.AUTHOR else _LATEST.where(_RECORDS.c.patient_id == patient_id))
    if basis is Basis.AUTHOR:
        total = int((await session.execute(
            select(func.count()).select_from(chosen.subquery()))).scalar_one())
    rows = (await session.execute(
        chosen.order_by(_RECORDS.c.created_at.desc(), _RECORDS.c.id).limit(limit).offset(offset)
    )).all()
    views = [_open_latest(envelope, row) for row in rows]
    for view in views:
        audit.record(session, Action.VIEW_MEDICAL_RECORD, resource_type="medical_record",
                     resource_id=view.id, patient_id=patient_id,
                     metadata={"version": view.version, **basis_metadata(basis)})
    return views, total


async def read_record(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                      record_id: uuid.UUID, *, care_days: int) -> RecordView:
    # The record, its latest version, that version's data key and (for a doctor) the chart
    # decision's facts in one round trip; nothing is opened before the access check.
    doctor = claims.role == Role.DOCTOR
    found = (await session.execute(
        _LATEST_BY_ID_WITH_CHART if doctor else _LATEST_BY_ID,
        {"record_id": record_id, **(chart_parameters(claims, care_days) if doctor else {})},
    )).one_or_none()
    if found is None:
        raise deny(session, NotFound(), None, "medical_record", "no_such_record")
    basis = await require_chart_access(
        session, claims, found.patient_id, write=False, resource_type="medical_record",
        care_days=care_days, authored=True,
        facts=(found.chart_status, found.chart_glass, found.chart_care, found.chart_sharing)
        if doctor else None)
    await _require_written(session, claims, basis, found.record_id, found.patient_id)
    if basis is Basis.AUTHOR and found.author_id != claims.user_id:
        # The latest version is another doctor's: the caller reads their own through /versions.
        raise deny(session, NoCareRelationship(), found.patient_id, "medical_record", "erased")
    view = _open_latest(envelope, found)
    _record_viewed(session, view, basis)
    return view


# The direct path (`db/direct.py`, PostgreSQL): a record read and a record's creation in the
# common case, granted by the same `chart_decision`; everything else is declined (None) before
# anything is written, and the unit-of-work functions above answer it.

async def read_record_direct(work: DirectWork, envelope: Envelope, claims: AccessClaims,
                             record_id: uuid.UUID, *, care_days: int) -> RecordView | None:
    """`read_record`: one statement for the record, its key and the chart facts; the record
    opened; one statement for the audit event, committed before the record is returned.

    The two statements are not wrapped in BEGIN and COMMIT: at PostgreSQL's READ COMMITTED
    each statement of a transaction takes its own snapshot and a SELECT takes no lock, so the
    wrapper would change nothing anyone can observe, and its two round trips cost the worker
    8 % of a read and PostgreSQL a third of its work (bench/results/api.json). What SPEC §8's
    one transaction is for holds: the SELECT reads only ciphertext, the PHI is accessed when it
    is opened and returned, and it is returned only once its event has committed; an event
    that cannot be written fails the request (`Runtime.try_direct`'s unit of work then does
    the whole read again, with its event in its transaction)."""
    return await _read_record_direct(work, envelope, claims, record_id, care_days=care_days)


async def _read_record_direct(work: DirectWork, envelope: Envelope, claims: AccessClaims,
                              record_id: uuid.UUID, *, care_days: int) -> RecordView | None:
    doctor = claims.role == Role.DOCTOR
    found = await work.fetchrow(_LATEST_BY_ID_WITH_CHART if doctor else _LATEST_BY_ID,
                                record_id=record_id,
                                **(chart_parameters(claims, care_days) if doctor else {}))
    if found is None:
        return None
    facts = tuple(found[name] for name in CHART_FACT_NAMES) if doctor else None
    basis = chart_decision(claims, found.patient_id, facts, write=False)
    if not isinstance(basis, Basis):
        return None
    view = _open_latest(envelope, found)
    _record_viewed(work, view, basis)
    await work.enqueue()
    return view


# A new record: its data key, the record, its first version and the audit event, in one
# statement.
_CREATE_RECORD = select(literal(1)).add_cte(
    insert_cte(_DATA_KEYS, ("id", "kek_id", "wrapped", "created_at"), "key"),
    insert_cte(_RECORDS, ("id", "patient_id", "author_id", "latest_version", "created_at",
                          "updated_at"), "record"),
    insert_cte(_VERSIONS, ("id", "record_id", "version", "author_id", "data_key_id",
                           "diagnosis", "prescriptions", "notes", "created_at"), "version"),
    event_cte())


async def create_record_direct(work: DirectWork, envelope: Envelope, claims: AccessClaims,
                               patient_id: uuid.UUID, body: RecordCreate, *,
                               care_days: int) -> RecordView | None:
    """`create_record`: one statement for the chart facts, one for everything written."""
    if claims.role != Role.DOCTOR:
        return None
    facts = await work.fetchrow(CHART_FACTS, patient=patient_id,
                                **chart_parameters(claims, care_days))
    basis = chart_decision(claims, patient_id, tuple(facts or ()) or None, write=True)
    if not isinstance(basis, Basis):
        return None
    now = utcnow()
    record_id, version_id = uuid.uuid4(), uuid.uuid4()
    key = envelope.new_data_key(uuid.uuid4())
    sealed = _sealed_version(RowCipher(envelope, key, VERSIONS, version_id), body.diagnosis,
                             body.prescriptions, body.notes)
    _record_created(work, record_id, patient_id, basis)
    await work.execute(
        _CREATE_RECORD, **work.event_parameters(),
        **prefixed("key", {"id": key.id, "kek_id": key.kek_id, "wrapped": key.wrapped,
                           "created_at": now}),
        **prefixed("record", {"id": record_id, "patient_id": patient_id,
                              "author_id": claims.user_id, "latest_version": 1,
                              "created_at": now, "updated_at": now}),
        **prefixed("version", {"id": version_id, "record_id": record_id, "version": 1,
                               "author_id": claims.user_id, "data_key_id": key.id,
                               "created_at": now, **sealed}))
    return RecordView(id=record_id, patient_id=patient_id, author_id=claims.user_id, version=1,
                      diagnosis=body.diagnosis, prescriptions=body.prescriptions,
                      notes=body.notes, created_at=now, updated_at=now)


async def versions(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                   record_id: uuid.UUID, *, care_days: int) -> list[RecordView]:
    record, basis = await _record_for(session, claims, record_id, write=False,
                                      care_days=care_days)
    only = ([MedicalRecordVersion.author_id == claims.user_id] if basis is Basis.AUTHOR
            else [])  # an erased patient: the versions the caller wrote, nobody else's
    rows = (await session.execute(select(MedicalRecordVersion).where(
        MedicalRecordVersion.record_id == record.id, *only)
        .order_by(MedicalRecordVersion.version))).scalars().all()
    views = [await _open_version(session, envelope, record, row) for row in rows]
    audit.record(session, Action.VIEW_MEDICAL_RECORD, resource_type="medical_record",
                 resource_id=record.id, patient_id=record.patient_id,
                 metadata={"versions": len(views), **basis_metadata(basis)})
    return views


async def amend(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                record_id: uuid.UUID, body: RecordAmend, *, care_days: int) -> RecordView:
    """A new version: fields not sent carry over from the latest one."""
    if body.diagnosis is None and body.prescriptions is None and body.notes is None:
        raise InvalidRequest("Send at least one of diagnosis, prescriptions and notes.")
    record, basis = await _record_for(session, claims, record_id, write=True,
                                      care_days=care_days)
    latest = await _open_version(session, envelope, record, await _latest(session, record))
    version = record.latest_version + 1
    row = _seal_version(
        session, envelope, record, version, claims.user_id,
        body.diagnosis if body.diagnosis is not None else latest.diagnosis,
        body.prescriptions if body.prescriptions is not None else latest.prescriptions,
        body.notes if body.notes is not None else latest.notes)
    record.latest_version = version
    record.updated_at = row.created_at
    audit.record(session, Action.UPDATE_MEDICAL_RECORD, resource_type="medical_record",
                 resource_id=record.id, patient_id=record.patient_id,
                 metadata={"version": version, **basis_metadata(basis)})
    return await _open_version(session, envelope, record, row)


# Prescriptions.

async def _open_prescription(session: AsyncSession, envelope: Envelope,
                             row: Prescription) -> PrescriptionView:
    cipher = await row_cipher(session, envelope, PRESCRIPTIONS, row.id, row.data_key_id)
    return PrescriptionView(id=row.id, patient_id=row.patient_id, doctor_id=row.doctor_id,
                            medication=cipher.open("medication", row.medication),
                            dosage=cipher.open("dosage", row.dosage),
                            instructions=cipher.open("instructions", row.instructions),
                            created_at=row.created_at)


async def prescribe(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                    patient_id: uuid.UUID, body: PrescriptionCreate, *,
                    care_days: int) -> PrescriptionView:
    basis = await require_chart_access(session, claims, patient_id, write=True,
                                       resource_type="prescription", care_days=care_days)
    row_id = uuid.uuid4()
    cipher = new_row_cipher(session, envelope, PRESCRIPTIONS, row_id)
    row = Prescription(id=row_id, patient_id=patient_id, doctor_id=claims.user_id,
                       data_key_id=cipher.data_key_id,
                       medication=cipher.seal("medication", body.medication),
                       dosage=cipher.seal("dosage", body.dosage),
                       instructions=cipher.seal("instructions", body.instructions),
                       created_at=utcnow())
    session.add(row)
    audit.record(session, Action.CREATE_PRESCRIPTION, resource_type="prescription",
                 resource_id=row_id, patient_id=patient_id, metadata=basis_metadata(basis))
    return await _open_prescription(session, envelope, row)


async def list_prescriptions(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                             patient_id: uuid.UUID, limit: int, offset: int, *,
                             care_days: int) -> tuple[list[PrescriptionView], int]:
    basis = await require_chart_access(session, claims, patient_id, write=False,
                                       resource_type="prescription", care_days=care_days,
                                       authored=True)
    where = [Prescription.patient_id == patient_id]
    if basis is Basis.AUTHOR:  # an erased patient: the caller's own prescriptions only
        where.append(Prescription.doctor_id == claims.user_id)
    rows, total = await fetch_page(session, select(Prescription).where(*where).order_by(
        Prescription.created_at.desc(), Prescription.id), limit, offset)
    views = [await _open_prescription(session, envelope, row) for row in rows]
    for view in views:
        audit.record(session, Action.VIEW_PRESCRIPTION, resource_type="prescription",
                     resource_id=view.id, patient_id=patient_id, metadata=basis_metadata(basis))
    return views, total
