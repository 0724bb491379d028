"""Slow work outside transactions: read first, end the transaction, wait, then write.

A request's unit of work is one session that commits once (`Runtime.unit_of_work`). Some requests
must also wait for something that is not the database: a password hash (argon2 takes a large
fraction of a second by design), or a client that sends a body slowly. Waiting inside a
transaction holds a pooled connection, and on SQLite the only write lock: an outside review had one
patient trickling an upload at a byte every 25 s stall every audited request of the service, and
eight bad logins stall `GET /me` for most of a second each.

So such work has phases:

    async with reads_only(session):   # what the slow step needs, read in a short transaction
        user = ...
    valid = await passwords.verify(user.password_hash, password)   # no connection held
    ...                                # the writes: a new transaction, which re-reads what
                                       # it relies on (`lock_active_user`, access checks again)

`reads_only` ends whatever transaction the session has (the authentication check's read, say),
runs the block in a read-only transaction that sees one snapshot (a deferred BEGIN on SQLite, so
no write lock; `REPEATABLE READ READ ONLY` on PostgreSQL, so a write there is refused by the
database), and ends it. A
transaction that has already written cannot be ended this way: committing half of a unit of work
would break its all-or-nothing promise, so that is a `RuntimeError` (a programming error, caught by
the tests). Audit events recorded so far stay pending in the session and commit with the rest of
the work; ORM objects read in the block stay loaded (sessions do not expire on commit), and stay
attached, so changes made to them later are written by the final commit; but they show the row
as it was then: a write that depends on it locks and reads it again (`lock_active_user`, or a
query with `populate_existing`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, UOWTransaction

from phivault.db.engine import READ_ONLY

# Execution options of a read-only phase: a deferred BEGIN on SQLite, READ ONLY on PostgreSQL.
READ_ONLY_OPTIONS: dict[str, Any] = {READ_ONLY: True, "postgresql_readonly": True}
# And one snapshot for the whole phase on PostgreSQL (SQLite's read transaction is one already).
# At READ COMMITTED each statement sees what committed before it: a password check read the
# account (its email still sealed), an erasure committed, and the check's next statement found
# the email's data key destroyed: a false `INTEGRITY_FAILURE` and a 500 (a test of parallel
# erasures, once in a run of the suite). A read-only REPEATABLE READ transaction takes its
# snapshot at its first statement and never fails to serialise.
_SNAPSHOT_OPTIONS: dict[str, Any] = {**READ_ONLY_OPTIONS, "isolation_level": "REPEATABLE READ"}
_WROTE = "phivault_transaction_wrote"


@event.listens_for(Session, "after_flush")
def _flushed(session: Session, _flush: UOWTransaction) -> None:
    session.info[_WROTE] = True


@event.listens_for(Session, "do_orm_execute")
def _executed(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        state.session.info[_WROTE] = True


@event.listens_for(Session, "after_transaction_end")
def _ended(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_WROTE, None)


def has_written(session: AsyncSession) -> bool:
    """Whether the session's current transaction has written, or holds writes not yet flushed."""
    sync = session.sync_session
    return bool(sync.info.get(_WROTE) or sync.new or sync.dirty or sync.deleted)


async def end_transaction(session: AsyncSession) -> None:
    """End the session's transaction, which may only have read, and give back its connection."""
    if has_written(session):
        raise RuntimeError("a transaction that has written cannot end before its unit of work")
    if session.in_transaction():
        await session.commit()


@asynccontextmanager
async def reads_only(session: AsyncSession) -> AsyncIterator[None]:
    """Run the block in a short read-only transaction of its own (see the module docstring).

    On an exception the transaction is left as it is, for the unit of work to roll back."""
    await end_transaction(session)
    postgres = session.get_bind().dialect.name == "postgresql"
    await session.connection(
        execution_options=_SNAPSHOT_OPTIONS if postgres else READ_ONLY_OPTIONS)
    yield
    if has_written(session):
        raise RuntimeError("a read-only phase wrote (or added objects to the session)")
    await session.commit()
