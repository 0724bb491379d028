"""The de-identified research export (SPEC §9, `phivault research export`): the patients whose
current `analytics` consent is true, as JSON lines that carry none of the identifiers of HIPAA
Safe Harbor (45 CFR 164.514(b)(2)), and k-anonymous on their quasi-identifiers when asked.

One line per patient:

    {"patient": "<32 hex>", "birth_year": 1961 | null, "age": 65 | "90+" | null,
     "sex": "female" | "male" | "other" | null,
     "records": [{"record": "<32 hex>", "year": 2026, "versions": 2, "diagnosis": "..."}],
     "prescriptions": [{"year": 2026, "medication": "...", "dosage": "..."}],
     "consultations": [{"year": 2031, "status": "completed"}]}

- Ids are keyed pseudonyms (`crypto/pseudonym.py`), one space for patients and another for
  records (per study, with `study`), derived from `PHIVAULT_INDEX_KEY`: stable across runs,
  not linkable to the real ids without that key; rotating it changes every pseudonym.
- Dates are years only. `age` is the export's year minus the birth year, so nothing of the birth
  date but its year is used; from 90 on it is `"90+"` and the birth year is left out too
  (164.514(b)(2)(i)(C)). Sex `unknown` is null.
- The research payload is clinical terms: each record's latest diagnosis, each prescription's
  medication and dosage, each consultation's status. These are typed by doctors and could hold
  an identifier by mistake, so each value is screened and withheld (null, counted) when it
  names the patient (a name part, the email, a line of the address) or has the shape of an
  identifier (an email or web address, a full date, a run of 7 or more digits). The screen is a
  safety net, not a guarantee: a residual risk that the README names.
- Free text is never read: record notes and prescription lines, consultation reasons and
  notes, prescription instructions. Nor are attachments, payments, notifications or who the
  doctors are. Lists are sorted by content, and lines by patient pseudonym, so no order in the
  file follows a time or a real id.

With `k`, a patient whose group (birth year or `90+`, and sex; null is a value) has fewer than
`k` exported members is suppressed. Two passes over the patients, each in pages (keyset on the
user id) read in short read-only transactions: the first counts the groups, the second writes.
Memory holds the group counts, one page, and one bucket of the pseudonym-ordered spool (lines
wait in temporary files bucketed by their pseudonym's first bits). If consents or birth dates
change between the passes so that a written group ends below `k`, nothing is written and
`ResearchExportChanged` is raised: running the export again is enough.
"""

from __future__ import annotations

import re
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import orjson
from sqlalchemy import BindParameter, Row, Select, bindparam, exists, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from phivault.access.permissions import Role
from phivault.audit.export import ExportWriteError
from phivault.auth.models import User
from phivault.clinical.models import (
    Consultation,
    MedicalRecord,
    MedicalRecordVersion,
    PatientProfile,
    Prescription,
)
from phivault.crypto.envelope import Envelope
from phivault.crypto.pseudonym import PseudonymSpace
from phivault.db.base import core_table
from phivault.db.engine import READ_ONLY
from phivault.keys.models import DataKeyRow
from phivault.keys.service import RowCipher, cipher_from_wrapped
from phivault.privacy.models import Consent

PAGE = 200
OLDEST_AGE = 90  # ages from here on are "90+" (Safe Harbor: "all ages over 89")
SEXES = frozenset({"female", "male", "other"})
BUCKET_TARGET = 2000  # lines per spool bucket, on average
_STUDY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

Group = tuple[int | str | None, str | None]  # (birth year or "90+" or null, sex or null)
T = TypeVar("T")


class ResearchExportChanged(Exception):
    """Consents or profiles changed during the export so that a written group fell below k;
    nothing was written."""


@dataclass(frozen=True, slots=True)
class ResearchPseudonyms:
    """The pseudonym spaces of a research export: patients, and records, apart."""

    patients: PseudonymSpace
    records: PseudonymSpace

    @classmethod
    def from_index_key(cls, index_key: bytes, study: str | None = None) -> ResearchPseudonyms:
        """Spaces `research[/study/<study>]/patient` and `.../record` under `index_key`; a
        study name (a-z 0-9 . _ -, at most 64) gives pseudonyms no other study shares."""
        if study is not None and not _STUDY_RE.fullmatch(study):
            raise ValueError("a study name is 1 to 64 characters of a-z 0-9 . _ -, "
                             "starting with a letter or digit")
        base = "research" if study is None else f"research/study/{study}"
        return cls(PseudonymSpace(index_key, f"{base}/patient"),
                   PseudonymSpace(index_key, f"{base}/record"))


@dataclass(frozen=True, slots=True)
class ResearchSummary:
    """What an export wrote: counts only (the audit event's metadata and the summary line)."""

    patients: int
    records: int
    suppressed: int
    withheld: int


@dataclass(frozen=True, slots=True)
class Traits:
    """A patient's quasi-identifiers as exported."""

    birth_year: int | None
    age: int | str | None
    sex: str | None

    @property
    def group(self) -> Group:
        return (self.age if self.age == "90+" else self.birth_year, self.sex)


def traits(birth_date: str | None, sex: str | None, year: int) -> Traits:
    """The exported form of a birth date (`YYYY-MM-DD`, or `YYYY` once erased) and a sex, in
    an export made in `year`."""
    born = int(birth_date[:4]) if birth_date and birth_date[:4].isdigit() else None
    age = year - born if born is not None and born <= year else None
    if age is not None and age >= OLDEST_AGE:
        return Traits(None, "90+", sex if sex in SEXES else None)
    return Traits(born, age, sex if sex in SEXES else None)


# The identifier screen of the clinical payload.

_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_IDENTIFIER_SHAPES = re.compile(
    r"[^\s@]+@[^\s@]+\.[^\s@]+"                # an email address
    r"|\b(?:https?://|www\.)"                  # a web address
    r"|\b\d{1,4}[-/.]\d{1,2}[-/.]\d{2,4}\b"    # a full date
    rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH},?\s+\d{{2,4}}\b"  # 12 March 2024
    rf"|\b{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{2,4}}\b"  # March 12, 2024
    r"|\b\d{1,3}(?:\.\d{1,3}){3}\b"             # an IPv4 address
    r"|\b(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}"    # an IPv6 address (or a time with seconds)
    r"|\b[0-9a-f]{8}(?:-?[0-9a-f]{4}){3}-?[0-9a-f]{12}\b"  # a UUID: any real id
    r"|\b(?=[0-9a-f]*\d)[0-9a-f]{10,}\b"         # another long hexadecimal id
    r"|(?:\d[\s().+/-]{0,2}){5,}",             # a phone, MRN, account or other number
    re.IGNORECASE)


class IdentityScreen:
    """Tells whether a clinical value names its patient or has the shape of an identifier."""

    __slots__ = ("_own",)

    def __init__(self, full_name: str | None, email: str | None, address: str | None) -> None:
        terms = set(re.findall(r"[^\W\d_]{3,}", full_name or ""))  # name parts of 3+ letters
        if email:
            terms.update((email, email.split("@", 1)[0]))
        terms.update(p.strip() for p in re.split(r"[,;\n]", address or "") if len(p.strip()) > 3)
        # ... and each word of the address on its own (a street, a town, a postcode's halves).
        terms.update(re.findall(r"\w{3,}", address or ""))
        terms = {term for term in terms if len(term) >= 3}
        alternatives = "|".join(map(re.escape, sorted(terms, key=len, reverse=True)))
        self._own = (re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
                     if terms else None)

    def passes(self, value: str) -> bool:
        return not (_IDENTIFIER_SHAPES.search(value)
                    or (self._own is not None and self._own.search(value)))


_NO_SCREEN = IdentityScreen(None, None, None)


# Queries: Core statements, ciphertexts fetched with their wrapped data keys in one round trip.

_USERS, _PROFILES, _CONSENTS, _KEYS = (core_table(User), core_table(PatientProfile),
                                       core_table(Consent), core_table(DataKeyRow))
_RECORDS, _VERSIONS = core_table(MedicalRecord), core_table(MedicalRecordVersion)
_PRESCRIPTIONS, _CONSULTATIONS = core_table(Prescription), core_table(Consultation)
_LATER, _PROFILE_KEY, _USER_KEY = _CONSENTS.alias("later"), _KEYS.alias("pk"), _KEYS.alias("uk")

# A patient, not erased, whose current consent (no later version) says analytics.
_ELIGIBLE = (
    (_USERS.c.role == Role.PATIENT) & (_USERS.c.status != "deleted")
    & exists().where(
        _CONSENTS.c.patient_id == _USERS.c.id, _CONSENTS.c.analytics.is_(True),
        ~exists().where(_LATER.c.patient_id == _CONSENTS.c.patient_id,
                        _LATER.c.version > _CONSENTS.c.version)))
_WITH_PROFILE = (_USERS.outerjoin(_PROFILES, _PROFILES.c.user_id == _USERS.c.id)
                 .outerjoin(_PROFILE_KEY, _PROFILE_KEY.c.id == _PROFILES.c.data_key_id))
_TRAIT_COLUMNS = (_USERS.c.id, _PROFILES.c.data_key_id, _PROFILE_KEY.c.wrapped,
                  _PROFILES.c.birth_date, _PROFILES.c.sex)
_COUNTING = select(*_TRAIT_COLUMNS).select_from(_WITH_PROFILE).where(_ELIGIBLE)
_WRITING = (select(*_TRAIT_COLUMNS, _PROFILES.c.full_name, _PROFILES.c.address,
                   _USERS.c.data_key_id.label("user_key_id"),
                   _USER_KEY.c.wrapped.label("user_wrapped"), _USERS.c.email)
            .select_from(_WITH_PROFILE.outerjoin(_USER_KEY,
                                                 _USER_KEY.c.id == _USERS.c.data_key_id))
            .where(_ELIGIBLE))
_IDS: BindParameter[Any] = bindparam("ids", expanding=True)
_RECORD_ROWS = (
    select(_RECORDS.c.patient_id, _RECORDS.c.id.label("record_id"), _RECORDS.c.created_at,
           _RECORDS.c.latest_version, _VERSIONS.c.id, _VERSIONS.c.data_key_id,
           _VERSIONS.c.diagnosis, _KEYS.c.wrapped)
    .select_from(_RECORDS.join(_VERSIONS, (_VERSIONS.c.record_id == _RECORDS.c.id)
                               & (_VERSIONS.c.version == _RECORDS.c.latest_version))
                 .outerjoin(_KEYS, _KEYS.c.id == _VERSIONS.c.data_key_id))
    .where(_RECORDS.c.patient_id.in_(_IDS)))
_PRESCRIPTION_ROWS = (
    select(_PRESCRIPTIONS.c.patient_id, _PRESCRIPTIONS.c.id, _PRESCRIPTIONS.c.created_at,
           _PRESCRIPTIONS.c.data_key_id, _PRESCRIPTIONS.c.medication, _PRESCRIPTIONS.c.dosage,
           _KEYS.c.wrapped)
    .select_from(_PRESCRIPTIONS.outerjoin(_KEYS, _KEYS.c.id == _PRESCRIPTIONS.c.data_key_id))
    .where(_PRESCRIPTIONS.c.patient_id.in_(_IDS)))
_CONSULTATION_ROWS = (select(_CONSULTATIONS.c.patient_id, _CONSULTATIONS.c.scheduled_at,
                             _CONSULTATIONS.c.status)
                      .where(_CONSULTATIONS.c.patient_id.in_(_IDS)))


async def _read_only(session: AsyncSession) -> None:
    await session.connection(execution_options={READ_ONLY: True})


async def count_candidates(sessions: async_sessionmaker[AsyncSession]) -> int:
    """How many patients the export reads (those with analytics consent), for a progress bar."""
    async with sessions() as session:
        await _read_only(session)
        count = (await session.execute(
            select(func.count()).select_from(_USERS).where(_ELIGIBLE))).scalar_one()
        await session.rollback()
    return int(count)


async def _pages(sessions: async_sessionmaker[AsyncSession], query: Select[Any], page: int,
                 read: Callable[[AsyncSession, Sequence[Row[Any]]], Awaitable[T]],
                 ) -> AsyncIterator[tuple[Sequence[Row[Any]], T]]:
    """The eligible patients `page` at a time in user-id order, each page read in a short
    read-only transaction of its own, with what `read` reads about them in it."""
    after: uuid.UUID | None = None
    while True:
        paged = query.order_by(_USERS.c.id).limit(page)
        if after is not None:
            paged = paged.where(_USERS.c.id > after)
        async with sessions() as session:
            await _read_only(session)
            rows = (await session.execute(paged)).all()
            if not rows:
                await session.rollback()
                return
            more = await read(session, rows)
            await session.rollback()
        yield rows, more
        if len(rows) < page:
            return
        after = rows[-1].id


async def _nothing_more(_session: AsyncSession, _rows: Sequence[Row[Any]]) -> None:
    return None


async def _clinical_rows(session: AsyncSession, rows: Sequence[Row[Any]]
                         ) -> dict[uuid.UUID, dict[str, list[Row[Any]]]]:
    """The records (latest versions), prescriptions and consultations of a page's patients,
    with only the columns that are exported: free text is never read."""
    found: dict[uuid.UUID, dict[str, list[Row[Any]]]] = {
        row.id: {"records": [], "prescriptions": [], "consultations": []} for row in rows}
    ids = list(found)
    for part, query in (("records", _RECORD_ROWS), ("prescriptions", _PRESCRIPTION_ROWS),
                        ("consultations", _CONSULTATION_ROWS)):
        for child in (await session.execute(query, {"ids": ids})).all():
            found[child.patient_id][part].append(child)
    return found


def _traits_of(envelope: Envelope, row: Row[Any], year: int) -> tuple[Traits, RowCipher | None]:
    """The patient's traits, and the cipher of their profile (None without a profile)."""
    if row.data_key_id is None:
        return traits(None, None, year), None
    cipher = cipher_from_wrapped(envelope, PatientProfile.__tablename__, row.id,
                                 row.data_key_id, row.wrapped)
    return traits(cipher.open_optional("birth_date", row.birth_date),
                  cipher.open_optional("sex", row.sex), year), cipher


async def count_groups(sessions: async_sessionmaker[AsyncSession], envelope: Envelope,
                       year: int, *, advance: Callable[[int], None] | None = None,
                       page: int = PAGE) -> Counter[Group]:
    """The first pass: how many eligible patients each quasi-identifier group holds."""
    groups: Counter[Group] = Counter()
    async for rows, _ in _pages(sessions, _COUNTING, page, _nothing_more):
        for row in rows:
            groups[_traits_of(envelope, row, year)[0].group] += 1
        if advance is not None:
            advance(len(rows))
    return groups


class _PseudonymOrder:
    """Lines spooled to temporary files by the first bits of their pseudonym, then written out
    bucket by bucket, each sorted: the file comes out in pseudonym order (every line starts
    with `{"patient":"<hex>"`) while memory holds one bucket."""

    def __init__(self, expected: int) -> None:
        self._bits = 0
        while self._bits < 8 and expected >> self._bits > BUCKET_TARGET:
            self._bits += 1
        self._buckets: dict[int, IO[bytes]] = {}

    def add(self, pseudonym: str, line: bytes) -> None:
        bucket = int(pseudonym[:2], 16) >> (8 - self._bits)
        try:
            if bucket not in self._buckets:
                # Created 0600 and already unlinked: nothing else can open it.
                self._buckets[bucket] = tempfile.TemporaryFile()  # noqa: SIM115 - see close()
            self._buckets[bucket].write(line)
        except OSError as exc:
            raise ExportWriteError(f"cannot spool the export: {exc.strerror or exc}") from exc

    def write_to(self, sink: IO[bytes]) -> None:
        try:
            for bucket in sorted(self._buckets):
                spool = self._buckets[bucket]
                spool.seek(0)
                sink.writelines(sorted(spool.readlines()))
        except OSError as exc:
            raise ExportWriteError(f"cannot write the export: {exc.strerror or exc}") from exc

    def close(self) -> None:
        for spool in self._buckets.values():
            spool.close()


@dataclass(slots=True)
class _Tally:
    records: int = 0
    suppressed: int = 0
    withheld: int = 0

    def screened(self, screen: IdentityScreen, value: str) -> str | None:
        if screen.passes(value):
            return value
        self.withheld += 1
        return None


async def write_research_export(
        sessions: async_sessionmaker[AsyncSession], envelope: Envelope,
        pseudonyms: ResearchPseudonyms, groups: Counter[Group], sink: IO[bytes], *, year: int,
        k: int = 1, advance: Callable[[int], None] | None = None,
        page: int = PAGE) -> ResearchSummary:
    """The second pass: write the line of each eligible patient whose group (as counted by
    `count_groups`) has at least `k` members; returns the counts.

    Raises:
        ResearchExportChanged: a written group has fewer than `k` members after all (consents
            or profiles changed since the count); nothing was written to `sink`.
        ExportWriteError: the spool or `sink` could not be written.
        IntegrityError: a value failed authentication.
    """
    tally = _Tally()
    written: Counter[Group] = Counter()
    order = _PseudonymOrder(sum(groups.values()))
    try:
        async for rows, found in _pages(sessions, _WRITING, page, _clinical_rows):
            for row in rows:
                patient_traits, cipher = _traits_of(envelope, row, year)
                if groups[patient_traits.group] < k:
                    tally.suppressed += 1
                    continue
                written[patient_traits.group] += 1
                pseudonym = pseudonyms.patients.of(row.id)
                clinical = found[row.id]
                # The patient's identity is opened only when there is a clinical value to screen.
                screen = (_screen(envelope, row, cipher)
                          if clinical["records"] or clinical["prescriptions"] else _NO_SCREEN)
                line = _line(envelope, pseudonyms, tally, pseudonym, patient_traits, screen,
                             clinical)
                order.add(pseudonym, orjson.dumps(line) + b"\n")
            if advance is not None:
                advance(len(rows))
        if any(count < k for count in written.values()):
            raise ResearchExportChanged()
        order.write_to(sink)
    finally:
        order.close()
    return ResearchSummary(sum(written.values()), tally.records, tally.suppressed,
                           tally.withheld)


def _screen(envelope: Envelope, row: Row[Any],
            profile_cipher: RowCipher | None) -> IdentityScreen:
    """The screen of a patient's own identifiers, opened only to be looked for, never written."""
    email = None
    if row.email is not None:
        email = cipher_from_wrapped(envelope, User.__tablename__, row.id, row.user_key_id,
                                    row.user_wrapped).open("email", row.email)
    if profile_cipher is None:
        return IdentityScreen(None, email, None)
    return IdentityScreen(profile_cipher.open_optional("full_name", row.full_name), email,
                          profile_cipher.open_optional("address", row.address))


def _line(envelope: Envelope, pseudonyms: ResearchPseudonyms, tally: _Tally, pseudonym: str,
          patient: Traits, screen: IdentityScreen,
          found: dict[str, list[Row[Any]]]) -> dict[str, Any]:
    records = []
    for r in found["records"]:
        cipher = cipher_from_wrapped(envelope, MedicalRecordVersion.__tablename__, r.id,
                                     r.data_key_id, r.wrapped)
        records.append({"record": pseudonyms.records.of(r.record_id), "year": r.created_at.year,
                        "versions": r.latest_version,
                        "diagnosis": tally.screened(screen, cipher.open("diagnosis",
                                                                        r.diagnosis))})
    prescriptions = []
    for p in found["prescriptions"]:
        cipher = cipher_from_wrapped(envelope, Prescription.__tablename__, p.id, p.data_key_id,
                                     p.wrapped)
        prescriptions.append({
            "year": p.created_at.year,
            "medication": tally.screened(screen, cipher.open("medication", p.medication)),
            "dosage": tally.screened(screen, cipher.open("dosage", p.dosage))})
    tally.records += len(records)
    return {
        "patient": pseudonym, "birth_year": patient.birth_year, "age": patient.age,
        "sex": patient.sex,
        "records": sorted(records, key=lambda r: (r["year"], r["record"])),
        "prescriptions": sorted(prescriptions, key=lambda p: (
            p["year"], p["medication"] or "", p["dosage"] or "")),
        "consultations": sorted(({"year": c.scheduled_at.year, "status": c.status}
                                 for c in found["consultations"]),
                                key=lambda c: (c["year"], c["status"])),
    }
