"""Rotating the blind-index key (`PHIVAULT_INDEX_KEY`): every account's email index made again.

Emails are sealed; logins find them by their blind index, an HMAC under a key derived from the
index key (`crypto/blind_index.py`). To rotate that key without a window in which people cannot
sign in: put the new key in `PHIVAULT_INDEX_KEY` and the old one in `PHIVAULT_INDEX_KEY_PREVIOUS`
and restart; lookups then match either digest, and new accounts get the new one. Then
`phivault keys reindex` opens each account's email and stores its digest under the new key, in
batches that commit on their own (resumable after a crash, idempotent, safe while the server
serves). When it reports every index current, remove `PHIVAULT_INDEX_KEY_PREVIOUS` and restart.

A row is written only if its index is still the one read (compare-and-set): an account erased
meanwhile (its index cleared) never gets an index back. A row whose email fails authentication
is counted and left as it is.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sqlalchemy import and_, bindparam, select, update
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.auth.models import User
from phivault.auth.service import email_lookup
from phivault.crypto import IntegrityError
from phivault.crypto.blind_index import BlindIndex
from phivault.crypto.envelope import Envelope
from phivault.db.base import core_table
from phivault.keys.models import DataKeyRow
from phivault.keys.service import cipher_from_wrapped

_USERS, _KEYS = core_table(User), core_table(DataKeyRow)
_SET_INDEX = (update(_USERS)
              .where(and_(_USERS.c.id == bindparam("b_id"),
                          _USERS.c.email_index == bindparam("b_old")))
              .values(email_index=bindparam("b_new")))


@dataclass
class ReindexBatch:
    last_id: uuid.UUID | None = None  # where the next batch starts; None: no more accounts
    seen: int = 0
    changed: int = 0
    failed: list[uuid.UUID] = field(default_factory=list)
    conflicts: list[uuid.UUID] = field(default_factory=list)


async def reindex_batch(session: AsyncSession, envelope: Envelope, index: BlindIndex,
                        after: uuid.UUID | None, batch_size: int) -> ReindexBatch:
    """Make again the email index of up to `batch_size` accounts after `after` (by id), in
    `session`'s transaction (the caller commits)."""
    query = (select(_USERS.c.id, _USERS.c.email, _USERS.c.email_index, _USERS.c.data_key_id,
                    _KEYS.c.wrapped)
             .select_from(_USERS.outerjoin(_KEYS, _KEYS.c.id == _USERS.c.data_key_id))
             .where(_USERS.c.email.is_not(None), _USERS.c.email_index.is_not(None))
             .order_by(_USERS.c.id).limit(batch_size))
    if after is not None:
        query = query.where(_USERS.c.id > after)
    rows = (await session.execute(query)).all()
    batch = ReindexBatch(last_id=rows[-1].id if rows else None, seen=len(rows))
    updates = []
    for row in rows:
        try:
            cipher = cipher_from_wrapped(envelope, "users", row.id, row.data_key_id,
                                         row.wrapped)
            current = email_lookup(index, cipher.open("email", row.email))
        except IntegrityError:
            batch.failed.append(row.id)
            continue
        if current != row.email_index:
            updates.append({"b_id": row.id, "b_old": row.email_index, "b_new": current})
    for values in updates:
        # One statement each, in a savepoint: a batch's rowcount is not reported by every
        # driver (asyncpg's executemany), and one conflicting row must not stop the rest.
        try:
            async with session.begin_nested():
                result = await session.execute(_SET_INDEX, values)
        except DBIntegrityError:
            # Another account already holds this email's new digest: two accounts with one
            # email, which a server run with the new key and without the previous one lets
            # in. Left as it is, for the operator (`conflicts`; the README says how).
            batch.conflicts.append(values["b_id"])
            continue
        batch.changed += int(result.rowcount)  # type: ignore[attr-defined]
    return batch
