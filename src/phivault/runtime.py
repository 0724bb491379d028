"""The running instance: settings, database, crypto recipes, and the unit of work.

One `Runtime` is built per process (by the app factory or a CLI command) from `Settings`.
`unit_of_work()` is the only way code gets a database session: it commits once at the end,
queueing the audit events recorded during the work in the same transaction. The runtime's
`sequencer` chains them afterwards: in the background (`start_background`, which the server
does), and at once after each commit where `chain_after_commit` is set (SQLite, where writers
take turns anyway, so chaining at once costs no concurrency).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from phivault.access.break_glass import ReasonMac
from phivault.audit import service as audit_service
from phivault.audit.actions import Action, Outcome
from phivault.audit.sequencer import Sequencer
from phivault.auth.accounts import Accounts
from phivault.auth.passwords import Argon2Parameters, Passwords
from phivault.auth.ratelimits import AuthLimits
from phivault.auth.service import Authenticator
from phivault.auth.session_cache import SESSION_CACHE, SessionCache
from phivault.auth.tokens import AccessTokens
from phivault.config import Settings
from phivault.crypto import IntegrityError
from phivault.crypto.blind_index import BlindIndex
from phivault.crypto.envelope import Envelope
from phivault.crypto.keys import derive_key
from phivault.db.direct import DirectDatabase, DirectWork
from phivault.db.engine import COMMAND_TIMEOUT_SECONDS, create_engine, create_sessionmaker
from phivault.errors import PhivaultError, Unavailable, database_unavailable
from phivault.keys.service import forget_new_keys
from phivault.observability import get_logger
from phivault.ops import metrics

__all__ = ["Runtime"]

T = TypeVar("T")

log = get_logger("phivault.runtime")


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    envelope: Envelope
    blind_index: BlindIndex
    access_tokens: AccessTokens
    passwords: Passwords
    limits: AuthLimits
    authenticator: Authenticator
    accounts: Accounts
    # Session checks reused for at most a second, evicted by revocations on every worker.
    session_cache: SessionCache
    audit_key: bytes = field(repr=False)
    queue_key: bytes = field(repr=False)
    # Binds each break-glass reason into its BREAK_GLASS event; derived once, here.
    reason_mac: ReasonMac
    sequencer: Sequencer
    chain_after_commit: bool
    # The hot routes' path on PostgreSQL (`db/direct.py`); None on SQLite.
    direct: DirectDatabase | None = None
    # Units of work failed by an outage since the last commit (logged at the first, see
    # `unit_of_work`).
    _outage_failures: int = field(default=0, init=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, *, pool_size: int | None = None,
                      chain_after_commit: bool | None = None,
                      command_timeout: float | None = COMMAND_TIMEOUT_SECONDS) -> Runtime:
        """Build the runtime. `pool_size` (default: `PHIVAULT_DB_POOL_SIZE`) is the database
        connections kept; `chain_after_commit` (default: on SQLite only) chains each unit of
        work's events right after its commit, instead of leaving them to the background;
        `command_timeout` bounds each PostgreSQL statement (None: no bound, for migrations)."""
        engine = create_engine(settings.database_url_value,
                               pool_size=pool_size or settings.db_pool_size,
                               command_timeout=command_timeout)
        metrics.instrument_pool(engine)
        queue_key = derive_key(settings.audit_key_bytes, "audit-queue")
        if chain_after_commit is None:
            chain_after_commit = engine.dialect.name == "sqlite"
        envelope = Envelope(settings.master_key_ring)
        blind_index = BlindIndex(settings.index_key_bytes,
                                 previous=settings.index_key_previous_bytes)
        tokens = AccessTokens(settings.signing_keys, settings.access_token_ttl)
        passwords = Passwords(Argon2Parameters(settings.argon2_memory_kib,
                                               settings.argon2_time_cost,
                                               settings.argon2_parallelism))
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        limits = AuthLimits(settings.auth_rate_limit_item, settings.lockout_item, redis_url,
                            settings.redis_prefix)
        session_cache = SessionCache(settings.session_cache_seconds, redis_url=redis_url,
                                     prefix=settings.redis_prefix)
        return cls(
            settings=settings, engine=engine,
            # Every session knows the cache, so that `revoke_sessions` can evict from it.
            sessions=create_sessionmaker(engine, info={SESSION_CACHE: session_cache}),
            envelope=envelope, blind_index=blind_index, access_tokens=tokens,
            passwords=passwords, limits=limits,
            authenticator=Authenticator(
                envelope=envelope, blind_index=blind_index, passwords=passwords, limits=limits,
                tokens=tokens, refresh_ttl=settings.refresh_token_ttl,
                mfa_roles=settings.mfa_roles, session_cache=session_cache),
            accounts=Accounts(envelope, blind_index, passwords),
            session_cache=session_cache,
            audit_key=settings.audit_key_bytes, queue_key=queue_key,
            reason_mac=ReasonMac.from_audit_key(settings.audit_key_bytes),
            sequencer=Sequencer(engine, settings.audit_key_bytes, queue_key,
                                inline=chain_after_commit),
            chain_after_commit=chain_after_commit,
            direct=DirectDatabase(engine, queue_key)
            if engine.dialect.name == "postgresql" else None,
        )

    def start_background(self) -> None:
        """Start this process's sequencer loop and its subscription to the other processes'
        revocations (a server process calls it at start-up)."""
        self.sequencer.start()
        self.session_cache.start()

    async def close(self) -> None:
        """Stop the sequencer (chaining what is committed), then close the database."""
        try:
            await self.sequencer.stop()
        finally:
            try:
                await self.session_cache.close()
            finally:
                await self.engine.dispose()

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[AsyncSession]:
        """A session whose work commits once, with its audit events, when the block ends.

        On an exception the work rolls back; the durable events it queued (denials, failures)
        are still appended in a transaction of their own, and a ciphertext that failed
        authentication adds an `INTEGRITY_FAILURE` event, before the exception goes on. A
        domain error marked `keeps_work` is the outcome of work that must stand (a reused
        refresh token revokes its family): that work commits, then the error goes on.

        Work that failed because the database cannot be reached (down, restarting, refusing,
        its pool exhausted: `errors.database_unavailable`) raises `Unavailable` from the
        driver's error, which the web layer answers 503 `unavailable`; so does work whose
        durable events could not be written for that reason. A COMMIT cut off by the outage
        is in doubt: PostgreSQL applied it whole, with its audit events, or not at all. The
        first such failure after a success is logged once (`database_unavailable`), and the
        first success after it (`database_available`), not every request in between.
        """
        session = self.sessions()
        try:
            try:
                yield session
            except PhivaultError as exc:
                if not exc.keeps_work:
                    await self._roll_back(session, exc)
                    raise
                await self._commit(session)
                raise
            except BaseException as exc:
                await self._roll_back(session, exc)
                raise
            if not session.in_transaction() and not session.info.get(audit_service.PENDING_KEY):
                # Nothing began (the request went by the direct path, or its dependencies'
                # session was never used): nothing to commit or close.
                return
            try:
                await self._commit(session)
            except BaseException as exc:
                await self._roll_back(session, exc)
                raise
        except Exception as exc:
            if isinstance(exc, PhivaultError) or not database_unavailable(exc):
                raise
            self._outage_began(exc)
            raise Unavailable() from exc
        finally:
            try:
                await session.close()
            except Exception as failure:
                # A connection that died after its work ended: nothing of the work is left
                # open on it, and the pool replaces it.
                if not database_unavailable(failure):
                    raise

    async def direct_first(self, route: str,
                           direct: Callable[[DirectWork], Awaitable[T | None]],
                           work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """`direct`'s answer (`try_direct`), or else `work`'s in a unit of work."""
        answer = await self.try_direct(route, direct)
        if answer is not None:
            return answer
        async with self.unit_of_work() as session:
            return await work(session)

    async def try_direct(self, route: str,
                         work: Callable[[DirectWork], Awaitable[T | None]]) -> T | None:
        """`work`'s answer on the direct path (`db/direct.py`), or None when there is none
        (SQLite) or it declined or failed: then the caller does the request in a unit of work.

        An outage is answered here, 503 `unavailable`, as a unit of work would: trying again
        there would only wait for the database a second time. Any other failure is handed over
        (a ciphertext that fails to open gets its `INTEGRITY_FAILURE` there); one that is not
        a ciphertext's is logged, by type, since the direct path should not fail."""
        if self.direct is None:
            return None
        try:
            async with self.direct.work() as direct_work:
                answer = await work(direct_work)
        except Exception as exc:
            if database_unavailable(exc):
                self._outage_began(exc)
                raise Unavailable() from exc
            if not isinstance(exc, IntegrityError):
                log.warning("direct_path_failed", route=route, error=type(exc).__name__)
            metrics.DIRECT_PATH.labels(route, "failed").inc()
            return None
        if answer is None:
            metrics.DIRECT_PATH.labels(route, "declined").inc()
            return None
        metrics.DIRECT_PATH.labels(route, "answered").inc()
        self._outage_ended()
        await self._queued()
        return answer

    def _outage_began(self, exc: BaseException) -> None:
        self._outage_failures += 1
        if self._outage_failures == 1:
            log.warning("database_unavailable", error=type(exc).__name__)

    def _outage_ended(self) -> None:
        if self._outage_failures:
            log.warning("database_available", failed_units_of_work=self._outage_failures)
            self._outage_failures = 0

    async def _commit(self, session: AsyncSession) -> None:
        events = audit_service.take_pending(session)
        try:
            await audit_service.enqueue(session, self.queue_key, events)
            await session.commit()
            forget_new_keys(session)
        except BaseException:
            audit_service.requeue(session, events)  # so that the durable ones survive
            raise
        self._outage_ended()
        await self.session_cache.committed(session)
        if events:
            await self._queued()

    async def _queued(self) -> None:
        """Events were committed to the queue: chain them now, or wake the background loop."""
        if not self.chain_after_commit:
            self.sequencer.notify()
            return
        self.sequencer.queued_here = True
        try:
            await self.sequencer.flush()
        except Exception as exc:  # noqa: BLE001 - the events are committed and stay queued
            # The work is done and its events are safe in the queue; the next drain or the
            # background loop chains them. Failing the request here would requeue them twice.
            log.warning("audit_chain_after_commit_failed", error=type(exc).__name__)

    async def _roll_back(self, session: AsyncSession, exc: BaseException) -> None:
        try:
            await session.rollback()
        except Exception as failure:
            # The connection was lost, and its transaction with it (the server rolls back a
            # transaction whose connection ends): nothing is left to roll back.
            if not database_unavailable(failure):
                raise
        forget_new_keys(session)
        self.session_cache.rolled_back(session)
        durable = audit_service.take_pending(session, durable_only=True)
        if isinstance(exc, IntegrityError):
            metrics.INTEGRITY_FAILURES.inc()
            audit_service.record(session, Action.INTEGRITY_FAILURE, outcome=Outcome.ERROR)
            durable += audit_service.take_pending(session)
        if durable and isinstance(exc, Exception):
            try:
                await self._append_alone(durable)
            except Exception as failure:
                if not database_unavailable(failure):
                    raise
                # Tried once (a connection lost to a restart may work again at once): with
                # the database still away, the events are lost, and said so here. When the
                # work itself failed for that outage, its error goes on; otherwise the
                # unwritten evidence fails the request, as a failed commit does.
                log.warning("audit_events_not_written", count=len(durable),
                            actions=sorted({str(event.action) for event in durable}),
                            error=type(failure).__name__)
                if not database_unavailable(exc):
                    raise

    async def _append_alone(self, events: list[audit_service.PendingEvent]) -> None:
        async with self.sessions() as session:
            await audit_service.enqueue(session, self.queue_key, events)
            await session.commit()
        await self._queued()
