"""Data keys for services, and the key lifecycle: status and rewrap.

A service that stores a row of PHI asks for a `RowCipher`: `new_row_cipher` creates the row's
data key (stored wrapped in `data_keys`), `row_cipher` loads it back. The cipher seals and opens
that row's values with the associated data bound to (table, column, row id).

`rewrap_batch` re-wraps data keys under the active master key without decrypting any PHI: it
only unwraps and wraps the 32-byte keys. Each batch is its own transaction and only touches keys
not yet under the active master key, so a crash (even `kill -9`) loses nothing, a rerun resumes
where it stopped, and running it twice is harmless. Concurrent readers see the old or the new
wrap, both of which open while the old master key is still in the ring.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass, field

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.crypto import IntegrityError
from phivault.crypto.envelope import DataKey, Envelope
from phivault.db.base import core_table, utcnow
from phivault.keys.models import DataKeyRow

# AES-GCM with random 96-bit nonces: NIST SP 800-38D caps one key at 2^32 encryptions. A master
# key wraps one data key per row; `keys status` warns at a tenth of that, far ahead of the cap.
WRAP_LIMIT = 2**32
WRAP_WARNING = WRAP_LIMIT // 10


class RowCipher:
    """Seals and opens the values of one row under that row's data key."""

    __slots__ = ("_envelope", "_key", "row_id", "table")

    def __init__(self, envelope: Envelope, key: DataKey, table: str, row_id: uuid.UUID) -> None:
        self._envelope = envelope
        self._key = key
        self.table = table
        self.row_id = row_id

    @property
    def data_key_id(self) -> uuid.UUID:
        return self._key.id

    @property
    def data_key(self) -> DataKey:
        """The row's data key, for the streaming recipe (attachments)."""
        return self._key

    def seal(self, column: str, value: str) -> bytes:
        return self._envelope.seal_text(self._key, self.table, column, self.row_id, value)

    def open(self, column: str, ciphertext: bytes) -> str:
        return self._envelope.open_text(self._key, self.table, column, self.row_id, ciphertext)

    def seal_optional(self, column: str, value: str | None) -> bytes | None:
        return None if value is None else self.seal(column, value)

    def open_optional(self, column: str, ciphertext: bytes | None) -> str | None:
        return None if ciphertext is None else self.open(column, ciphertext)

    def __repr__(self) -> str:
        return f"RowCipher(table={self.table!r}, row_id={self.row_id})"


# The data keys a session made, by id: its unit of work's own rows are opened with them, until
# the transaction ends (`forget_new_keys`).
_NEW_KEYS = "phivault.keys.new"


def forget_new_keys(session: AsyncSession) -> None:
    """Drop the keys this session made: after a commit their rows are read from the database
    like any other; after a rollback the rows (and keys) do not exist."""
    session.info.pop(_NEW_KEYS, None)


def new_row_cipher(session: AsyncSession, envelope: Envelope, table: str,
                   row_id: uuid.UUID) -> RowCipher:
    """Create the data key of a new row (added to `session`) and a cipher for its values."""
    return add_row_cipher(session, envelope, envelope.new_data_key(uuid.uuid4()), table, row_id)


def add_row_cipher(session: AsyncSession, envelope: Envelope, key: DataKey, table: str,
                   row_id: uuid.UUID) -> RowCipher:
    """`new_row_cipher` for a key made earlier (an upload seals its body before its
    transaction begins)."""
    session.add(DataKeyRow(id=key.id, kek_id=key.kek_id, wrapped=key.wrapped,
                           created_at=utcnow()))
    session.info.setdefault(_NEW_KEYS, {})[key.id] = key
    return RowCipher(envelope, key, table, row_id)


async def row_cipher(session: AsyncSession, envelope: Envelope, table: str, row_id: uuid.UUID,
                     data_key_id: uuid.UUID) -> RowCipher:
    """The cipher of an existing row. A missing data key (an erased row) is an IntegrityError:
    its values can never be opened again. A key made in this session (a row just written, now
    answered) is used as it is, without a round trip."""
    made: dict[uuid.UUID, DataKey] = session.info.get(_NEW_KEYS, {})
    if data_key_id in made:
        return RowCipher(envelope, made[data_key_id], table, row_id)
    wrapped = (await session.execute(select(DataKeyRow.wrapped)
                                     .where(DataKeyRow.id == data_key_id))).scalar_one_or_none()
    return cipher_from_wrapped(envelope, table, row_id, data_key_id, wrapped)


def cipher_from_wrapped(envelope: Envelope, table: str, row_id: uuid.UUID,
                        data_key_id: uuid.UUID, wrapped: bytes | None) -> RowCipher:
    """`row_cipher` for a caller that fetched the wrapped key itself, in the same query as the
    row (an outer join on `data_keys`: None when the key is gone)."""
    if wrapped is None:
        raise IntegrityError()
    return RowCipher(envelope, envelope.unwrap(data_key_id, wrapped), table, row_id)


@dataclass(frozen=True, slots=True)
class KeyStatus:
    active: str
    deks: dict[str, int]
    unknown: list[str]
    warnings: list[str]

    def as_dict(self) -> dict[str, object]:
        return {"active": self.active, "deks": self.deks, "unknown_kek_ids": self.unknown,
                "warnings": self.warnings}


async def key_status(session: AsyncSession, envelope: Envelope) -> KeyStatus:
    """How many data keys each master key wraps; which ids are not in the ring; warnings."""
    rows = (await session.execute(select(DataKeyRow.kek_id, func.count())
                                  .group_by(DataKeyRow.kek_id))).all()
    deks = {kek_id: int(count) for kek_id, count in rows}
    ring = envelope.ring
    for kek_id in ring.ids:
        deks.setdefault(kek_id, 0)
    unknown = sorted(set(deks) - set(ring.ids))
    warnings = [f"master key {k} wraps {n} data keys; rotate it (AES-GCM limit {WRAP_LIMIT})"
                for k, n in deks.items() if n >= WRAP_WARNING]
    warnings += [f"{n} data keys are wrapped by {k}, which is not in PHIVAULT_MASTER_KEYS: "
                 "their data cannot be read" for k, n in deks.items() if k in unknown and n]
    return KeyStatus(ring.active_id, dict(sorted(deks.items())), unknown, warnings)


async def count_to_rewrap(session: AsyncSession, envelope: Envelope,
                          skip: Collection[uuid.UUID] = ()) -> int:
    """Data keys whose row says another master key than the active one (and not in `skip`)."""
    query = select(func.count()).select_from(DataKeyRow).where(
        DataKeyRow.kek_id != envelope.ring.active_id)
    if skip:
        query = query.where(DataKeyRow.id.not_in(list(skip)))
    return int((await session.execute(query)).scalar_one())


@dataclass(slots=True)
class RewrapBatch:
    rewritten: int = 0  # rows now under the active key (re-wrapped, or their kek_id repaired)
    failed: list[uuid.UUID] = field(default_factory=list)  # keys that do not unwrap
    locked: bool = False  # rows another rewrap holds right now
    last_id: uuid.UUID | None = None  # the last row looked at: the next batch starts after it


async def rewrap_batch(session: AsyncSession, envelope: Envelope, batch_size: int,
                       skip: Collection[uuid.UUID] = (), *,
                       after: uuid.UUID | None = None) -> RewrapBatch:
    """Re-wrap up to `batch_size` data keys under the active master key, in `session`'s
    transaction (the caller commits).

    Only keys whose master key is in the ring are taken (the others are reported by
    `key_status`). A key that fails to unwrap is reported in `failed`, left as it is, and must
    be passed back in `skip`, so that one damaged row never stops the rest. A row whose
    `kek_id` disagrees with its authenticated header is repaired from the header. Rows locked by
    a concurrent rewrap (PostgreSQL) are skipped, and `locked` says some may remain.

    With `after` (the previous batch's `last_id`), only keys after it by id are looked at: a
    pass over the table then reads each row once, where starting from the first id every time
    re-reads the rows already done (at 1,000,000 keys the rate fell from 14,000/s to 5,600/s).
    """
    ring = envelope.ring
    query = (select(DataKeyRow.id, DataKeyRow.wrapped)
             .where(DataKeyRow.kek_id != ring.active_id, DataKeyRow.kek_id.in_(ring.ids))
             .order_by(DataKeyRow.id).limit(batch_size).with_for_update(skip_locked=True))
    if skip:
        query = query.where(DataKeyRow.id.not_in(list(skip)))
    if after is not None:
        query = query.where(DataKeyRow.id > after)
    rows = (await session.execute(query)).all()
    result = RewrapBatch(last_id=rows[-1][0] if rows else None)
    updates = []
    for dek_id, wrapped in rows:
        try:
            new = envelope.rewrap(dek_id, wrapped)
        except IntegrityError:
            result.failed.append(dek_id)
            continue
        updates.append({"b_id": dek_id, "b_wrapped": wrapped if new is None else new})
    if updates:
        await session.execute(
            update(core_table(DataKeyRow)).where(core_table(DataKeyRow).c.id == bindparam("b_id"))
            .values(wrapped=bindparam("b_wrapped"), kek_id=ring.active_id),
            updates,
        )
    result.rewritten = len(updates)
    if not rows and after is None:
        remaining = await count_to_rewrap(session, envelope, skip)
        unknown = int((await session.execute(
            select(func.count()).select_from(DataKeyRow)
            .where(DataKeyRow.kek_id.not_in(ring.ids)))).scalar_one())
        result.locked = remaining > unknown
    return result
