"""The running instance: settings, database, crypto recipes, and the unit of work.

One `Runtime` is built per process (by the app factory or a CLI command) from `Settings`.
`unit_of_work()` is the only way code gets a database session: it commits once at the end,
appending the audit events queued during the work in the same transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from phivault.audit import service as audit_service
from phivault.audit.actions import Action, Outcome
from phivault.auth.tokens import AccessTokens
from phivault.config import Settings
from phivault.crypto import IntegrityError
from phivault.crypto.blind_index import BlindIndex
from phivault.crypto.envelope import Envelope
from phivault.db.engine import create_engine, create_sessionmaker

__all__ = ["Runtime"]


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    envelope: Envelope
    blind_index: BlindIndex
    access_tokens: AccessTokens
    audit_key: bytes = field(repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, *, pool_size: int = 10) -> Runtime:
        engine = create_engine(settings.database_url_value, pool_size=pool_size)
        return cls(
            settings=settings, engine=engine, sessions=create_sessionmaker(engine),
            envelope=Envelope(settings.master_key_ring),
            blind_index=BlindIndex(settings.index_key_bytes),
            access_tokens=AccessTokens(settings.signing_keys, settings.access_token_ttl),
            audit_key=settings.audit_key_bytes,
        )

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[AsyncSession]:
        """A session whose work commits once, with its audit events, when the block ends.

        On an exception the work rolls back; the durable events it queued (denials, failures)
        are still appended in a transaction of their own, and a ciphertext that failed
        authentication adds an `INTEGRITY_FAILURE` event, before the exception goes on.
        """
        session = self.sessions()
        try:
            try:
                yield session
                await audit_service.append(session, self.audit_key,
                                           audit_service.take_pending(session))
                await session.commit()
            except BaseException as exc:
                await session.rollback()
                durable = audit_service.take_pending(session, durable_only=True)
                if isinstance(exc, IntegrityError):
                    audit_service.record(session, Action.INTEGRITY_FAILURE,
                                         outcome=Outcome.ERROR)
                    durable += audit_service.take_pending(session)
                if durable and isinstance(exc, Exception):
                    await self._append_alone(durable)
                raise
        finally:
            await session.close()

    async def _append_alone(self, events: list[audit_service.PendingEvent]) -> None:
        async with self.sessions() as session:
            await audit_service.append(session, self.audit_key, events)
            await session.commit()
