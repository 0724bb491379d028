"""The direct path: the hottest routes' database work on PostgreSQL, on a pooled connection's
asyncpg driver, without the ORM session (SPEC §14).

A record read spent more of its worker's CPU in SQLAlchemy's session and execution layers than
in everything else it does (bench/results/api.json's profile): a session, a transaction begun
and committed, and per statement the compiled-cache lookup, the ORM's execution state and a
greenlet switch. Here a statement built with Core is compiled once (`DirectQuery`: PostgreSQL's
SQL, the order of its parameters, their literal values and type processors) and run on the
driver of a connection taken from the engine's own pool, so the pool's size, idle pings,
outage bounds, TLS and metrics stay one.

The direct path is an optimisation, never a second authority. A route tries it first
(`Runtime.try_direct`) and it answers only the common case it can prove: the caller granted by
`access.care.chart_decision`, the row there, its ciphertexts opening. For anything else (a
refusal, an erased patient, a missing row, a ciphertext that fails, a database error) it
answers None before it has written anything, and the route's unit of work does the whole
request again: so every refusal's `ACCESS_DENIED`, every `INTEGRITY_FAILURE` and every 503 keeps
the one implementation the rest of the API has. As SPEC §8 asks, no PHI is accessed without its
event and an event that cannot be written fails the action: a write and its event are one
statement of data-modifying CTEs (`insert_cte`), atomic by itself; a read's event commits before
the record it opened is returned (`clinical/records.py`, `read_record_direct`, says why a
BEGIN and COMMIT around a read's two statements would change nothing).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import CTE, Table, bindparam, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import greenlet_spawn

from phivault.audit import service as audit_service
from phivault.audit.models import QueuedEvent
from phivault.db.base import core_table, utcnow

_REQUIRED = object()


class Row(asyncpg.Record):  # type: ignore[misc]  # asyncpg has no stubs
    """A fetched row whose columns read as attributes too, as SQLAlchemy's rows do: a service
    opens a direct row and an ORM one with the same code."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DirectQuery:
    """A Core statement compiled once for PostgreSQL's asyncpg driver: its SQL, and how each
    `$n` is filled from named parameters (the statement's own literals where it has them,
    each through its type's bind processor, as SQLAlchemy would)."""

    __slots__ = ("_slots", "sql")

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if not isinstance(compiled, SQLCompiler) or compiled.positiontup is None:
            raise ValueError("the dialect does not bind parameters by position")
        self.sql = str(compiled)
        slots = []
        for name in compiled.positiontup:
            bind = compiled.binds[name]
            default = _REQUIRED if bind.required else bind.value
            slots.append((name, default, bind.type.dialect_impl(dialect).bind_processor(dialect)))
        self._slots = tuple(slots)

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        values = []
        for name, default, processor in self._slots:
            value = params.get(name, default)
            if value is _REQUIRED:
                raise KeyError(f"the statement needs the parameter {name!r}")
            values.append(processor(value) if processor is not None else value)
        return values


def insert_cte(table: Table, columns: Sequence[str], prefix: str) -> CTE:
    """An INSERT of one row of `table` as a CTE, its `columns` bound as `<prefix>_<column>`:
    several of them in one statement (`select(...).add_cte(...)`) write their rows together,
    atomically, in one round trip (PostgreSQL checks foreign keys at the statement's end)."""
    return insert(table).values({
        name: bindparam(f"{prefix}_{name}", type_=table.c[name].type, required=True)
        for name in columns}).cte(f"new_{prefix}")


def prefixed(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` as the parameters of an `insert_cte` of that prefix."""
    return {f"{prefix}_{name}": value for name, value in values.items()}


_QUEUE = core_table(QueuedEvent)
QUEUE_FIELDS = ("event_id", "at", "actor_id", "actor_role", "action", "resource_type",
                "resource_id", "patient_id", "outcome", "ip", "user_agent", "request_id",
                "metadata", "mac")
EVENT_PREFIX = "event"


def event_cte() -> CTE:
    """The audit queue's row of a statement's one event (`DirectWork.event_parameters`)."""
    return insert_cte(_QUEUE, QUEUE_FIELDS, EVENT_PREFIX)


_ENQUEUE = insert(_QUEUE).values({name: bindparam(name, type_=_QUEUE.c[name].type,
                                                  required=True) for name in QUEUE_FIELDS})


class DirectWork:
    """One request's work on one connection. Services record audit events on it as on a
    session (`audit.record(work, ...)`) and write them with their own statement
    (`enqueue`) or inside it (`event_parameters` with an `event_cte`); an event recorded and
    never written fails the work (`DirectDatabase.work`)."""

    __slots__ = ("_database", "connection", "info")

    def __init__(self, database: DirectDatabase, connection: asyncpg.Connection) -> None:
        self._database = database
        self.connection = connection
        self.info: dict[str, Any] = {}

    async def fetchrow(self, statement: ClauseElement, **params: Any) -> Row | None:
        query = self._database.query(statement)
        row: Row | None = await self.connection.fetchrow(
            query.sql, *query.arguments(params), record_class=Row)
        return row

    async def execute(self, statement: ClauseElement, **params: Any) -> None:
        query = self._database.query(statement)
        await self.connection.execute(query.sql, *query.arguments(params))

    def _queue_rows(self) -> list[dict[str, Any]]:
        at = utcnow()
        return [audit_service.queued_row(self._database.queue_key, pending, at)
                for pending in audit_service.take_pending(self)]

    async def enqueue(self) -> None:
        """Write the events recorded so far, in a statement of their own."""
        for row in self._queue_rows():
            await self.execute(_ENQUEUE, **row)

    def event_parameters(self) -> dict[str, Any]:
        """The parameters of an `event_cte` for the one event recorded so far."""
        rows = self._queue_rows()
        if len(rows) != 1:
            raise RuntimeError(f"an event_cte writes one event, {len(rows)} were recorded")
        return prefixed(EVENT_PREFIX, rows[0])

    @property
    def unwritten_events(self) -> int:
        return len(self.info.get(audit_service.PENDING_KEY, ()))


class DirectDatabase:
    """The direct path's statements (compiled once each) and connections (the engine's)."""

    def __init__(self, engine: AsyncEngine, queue_key: bytes) -> None:
        if engine.dialect.name != "postgresql" or engine.dialect.driver != "asyncpg":
            raise ValueError("the direct path runs on PostgreSQL through asyncpg")
        self.engine = engine
        self.queue_key = queue_key
        # Keyed by the statement itself (not its id, which a collected statement's successor
        # could reuse): the statements are module constants, a bounded set.
        self._queries: dict[ClauseElement, DirectQuery] = {}

    def query(self, statement: ClauseElement) -> DirectQuery:
        query = self._queries.get(statement)
        if query is None:
            query = self._queries[statement] = DirectQuery(statement, self.engine.dialect)
        return query

    @asynccontextmanager
    async def work(self) -> AsyncIterator[DirectWork]:
        """A connection from the engine's pool for one request's work. A connection whose work
        failed is closed, not pooled: a statement may be in flight on it (the client went away
        mid-query) or its state unknown."""
        pooled = await self.engine.raw_connection()
        try:
            work = DirectWork(self, pooled.driver_connection)
            yield work
            if work.unwritten_events:
                raise RuntimeError("the direct path recorded audit events it did not write")
        except BaseException:
            await greenlet_spawn(pooled.invalidate)
            raise
        finally:
            # Back to the pool as SQLAlchemy's own code gives it back (in a greenlet: the pool
            # may close the connection, one opened past its size, which awaits the driver).
            await greenlet_spawn(pooled.close)


__all__ = ["DirectDatabase", "DirectQuery", "DirectWork", "Row", "event_cte", "insert_cte",
           "prefixed"]
