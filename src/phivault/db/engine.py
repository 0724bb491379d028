"""Creating the async engine for PostgreSQL (asyncpg) or SQLite (aiosqlite)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession
from sqlalchemy.pool import ConnectionPoolEntry

from phivault.db.tls import use_postgres_tls

SQLITE_BUSY_TIMEOUT_MS = 30_000
# A pooled PostgreSQL connection idle longer than this is pinged before use (see `_ping_idle`).
IDLE_PING_SECONDS = 10.0
# Execution option: this transaction only reads (a deferred BEGIN on SQLite).
READ_ONLY = "phivault_read_only"


def _dump_json(value: Any) -> str:
    return orjson.dumps(value).decode()


# JSON columns (audit metadata) through orjson: the audit chain's verification reads every row.
_JSON: dict[str, Any] = {"json_serializer": _dump_json, "json_deserializer": orjson.loads}


def create_engine(url: str, *, pool_size: int = 10, echo: bool = False,
                  command_timeout: float | None = None) -> AsyncEngine:
    """An engine for `url`; on SQLite, one writer at a time with transactions begun IMMEDIATE.

    SQLite allows one writer. Beginning every transaction with `BEGIN IMMEDIATE` makes writers
    queue on the database lock (up to the busy timeout) instead of failing halfway through a
    unit of work with "database is locked"; WAL lets readers in other processes (the CLI, a
    backup) carry on meanwhile.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, echo=echo, pool_size=pool_size, max_overflow=0,
                                     pool_timeout=60, **_JSON)
        _configure_sqlite(engine)
        return engine
    # A worker keeps `pool_size` connections (`PHIVAULT_DB_POOL_SIZE`), enough for the requests
    # it serves at once: one opened past them is closed at its checkin, and a new one costs a
    # PostgreSQL backend and the preparation of every statement again, so a pool smaller than
    # a worker's concurrency churns connections under load (measured with wrk's 32 clients: a
    # second worker added 1.26x with 16 connections kept, 1.46x with 32). The overflow is for
    # the few that need a second connection at once (a reader's sequencer drain, a refusal's
    # own event).
    engine = create_async_engine(url, echo=echo, pool_size=pool_size,
                                 max_overflow=pool_size // 4 + 2,
                                 pool_timeout=POOL_TIMEOUT_SECONDS, **_JSON)
    _ping_idle(engine)
    _bound_outages(engine, command_timeout)  # a down database answers 503; the pool heals
    use_postgres_tls(engine)  # sslmode, sslrootcert: db/tls.py
    return engine


def _ping_idle(engine: AsyncEngine) -> None:
    """Ping a pooled connection before use only when it sat idle for `IDLE_PING_SECONDS`.

    SQLAlchemy's `pool_pre_ping` pings on every checkout: one more round trip on every request.
    A connection in steady use needs none (a disconnect found while in use invalidates the whole
    pool, so a database restart costs the requests in flight at that moment, not one each);
    one left idle, through a quiet night or a failover, is checked first, and a dead one is
    replaced before any request sees it (`DisconnectionError` makes the pool retry).
    """
    @event.listens_for(engine.sync_engine.pool, "checkin")
    def _checked_in(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine.pool, "checkout")
    def _checked_out(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            raise exc.DisconnectionError() from error


# How long a request waits for PostgreSQL when it is down or unreachable (`_bound_outages`).
CONNECT_TIMEOUT_SECONDS = 5.0
POOL_TIMEOUT_SECONDS = 10.0
# The longest one statement may take, for the server and the CLI (not for migrations).
COMMAND_TIMEOUT_SECONDS = 30.0


def _bound_outages(engine: AsyncEngine, command_timeout: float | None) -> None:
    """An unreachable PostgreSQL costs a request seconds, never a hang, and the pool heals by
    itself when the server is back (the unit of work answers such failures 503 `unavailable`:
    `errors.database_unavailable`).

    - A new connection gives up after `CONNECT_TIMEOUT_SECONDS` (asyncpg's default is 60 s): a
      host that drops packets, or a server that accepts and never answers, fails as fast as a
      refused connection; `?timeout=SECONDS` in `PHIVAULT_DATABASE_URL` sets another. A
      request waits at most `POOL_TIMEOUT_SECONDS` for a pooled connection (it was 30 s).
    - A pooled connection that the server has closed (a restart, a crash, a failover: asyncpg
      saw its socket close) is replaced when it is checked out, without a round trip, instead
      of failing the request that drew it; so the first requests after the database is back
      succeed. One that looks open but is dead is found by `_ping_idle` when idle, or by its
      first error, which invalidates the pool.

    - With `command_timeout` (the runtime passes `COMMAND_TIMEOUT_SECONDS`; `phivault
      migrate` passes none, since building an index may rightly take long), every statement,
      and the idle ping, gives up after that long: a server that is frozen or behind a
      partition that drops packets costs a request that long, then a 503 (the timeout is an
      outage to `errors.database_unavailable`), not a hang. Exports and verification read in
      pages and ranges, each well under it; `?command_timeout=SECONDS` in the URL sets another.
      An outside review found every request hanging on a frozen server, not only those in a
      statement.
    """
    @event.listens_for(engine.sync_engine, "do_connect")
    def _connect_timeout(_dialect: Any, _record: Any, _cargs: Any,
                         cparams: dict[str, Any]) -> None:
        # `?timeout=2` in the URL arrives as text, which asyncpg cannot use.
        cparams["timeout"] = float(cparams.get("timeout", CONNECT_TIMEOUT_SECONDS))
        if "command_timeout" in cparams:
            cparams["command_timeout"] = float(cparams["command_timeout"])
        elif command_timeout is not None:
            cparams["command_timeout"] = command_timeout

    @event.listens_for(engine.sync_engine.pool, "checkout")
    def _closed_by_server(_dbapi_connection: Any, record: ConnectionPoolEntry,
                          _proxy: Any) -> None:
        driver = record.driver_connection
        if driver is not None and driver.is_closed():
            raise exc.DisconnectionError("closed by the server")


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN, instead of the driver's own.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Read-only work (verification, exports) need not queue behind writers: WAL gives it
        # a consistent snapshot with a plain deferred BEGIN.
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def create_sessionmaker(engine: AsyncEngine, info: dict[str, Any] | None = None
                        ) -> async_sessionmaker[AsyncSession]:
    """Sessions of `engine`; each starts with a copy of `info` as its `Session.info`."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=True, info=info)


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"
