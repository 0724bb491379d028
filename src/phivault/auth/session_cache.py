"""A per-process cache of the session checks that every authenticated request makes (SPEC §6).

Every request checks its access token's session and user in the shared database, so that a
revocation refuses live tokens at once. SPEC §6 allows a cache when a revocation reaches every
worker within a second; this one keeps that promise twice over:

- An answer is kept for at most `max_age` seconds (`PHIVAULT_SESSION_CACHE_SECONDS`, at most
  1), counted from before the database was asked. A revocation committed after that moment is
  therefore seen by every worker and host within `max_age`, whatever else fails: no Redis, a
  lost message, a process killed between its commit and its publish.
- A revocation (`revoke_sessions`, which every revocation path calls: logout, a reused refresh
  token, an ended session, a password change, TOTP turned on, a disabled, re-roled or erased
  account) evicts its users' entries in this process at once, and again after its commit; with
  `PHIVAULT_REDIS_URL` the commit also publishes the users on a Redis channel to which every
  server process subscribes, so the other workers and hosts drop theirs within milliseconds.

A message can only evict (an unparseable one clears the cache), so whoever can publish on
Redis can cost the database a query per request, never keep a revoked session alive. An answer
read while an eviction happened is not kept: it may predate the revocation being evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.errors import Unavailable, database_unavailable
from phivault.observability import get_logger
from phivault.ops.redis_client import redis_client

# `Session.info` keys: the cache of the runtime the session belongs to, and the users whose
# sessions the session's transaction revoked (published once it commits).
SESSION_CACHE = "phivault.session_cache"
_REVOKED_USERS = "phivault.revoked_users"
# Entries kept at most, so that a flood of distinct tokens cannot grow the cache without end.
MAX_ENTRIES = 50_000
# How long a publish may take before the revocation is left to `max_age` alone.
PUBLISH_TIMEOUT_SECONDS = 0.5
# The subscriber's pause after losing Redis, and how often it checks a quiet connection.
RECONNECT_SECONDS = 1.0
HEALTH_CHECK_SECONDS = 5

log = get_logger("phivault.auth.session_cache")

# An answer of the session check: (kind, revoked_at, expires_at, user status, user role).
SessionState = tuple[Any, ...]
Ticket = tuple[float, int]
_NO_ANSWER = object()  # a load that failed: its waiters ask for themselves


class SessionCache:
    """Session-check answers of this process, each kept at most `max_age` seconds (0: none)."""

    def __init__(self, max_age: float, *, redis_url: str | None = None,
                 prefix: str = "phivault", clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self.clock = clock  # monotonic seconds; tests freeze it
        self._entries: dict[tuple[uuid.UUID, uuid.UUID], tuple[float, SessionState]] = {}
        # Counts evictions: an answer read across one is not kept.
        self._evictions = 0
        # The loads running now (`fetch`), with the moment each began and its answer.
        self._flights: dict[tuple[uuid.UUID, uuid.UUID],
                            asyncio.Future[tuple[Ticket, object]]] = {}
        self._redis_url = redis_url
        self.channel = f"{prefix}:revocations"
        self._publisher: aioredis.Redis | None = None
        self._subscriber: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"SessionCache(max_age={self.max_age}, redis={self._redis_url is not None})"

    # Reading and keeping answers.

    def get(self, session_id: uuid.UUID, user_id: uuid.UUID) -> SessionState | None:
        """The kept answer for this session and user, if younger than `max_age`."""
        entry = self._entries.get((session_id, user_id))
        if entry is None:
            return None
        if self.clock() - entry[0] >= self.max_age:
            del self._entries[(session_id, user_id)]
            return None
        return entry[1]

    async def fetch(self, session_id: uuid.UUID, user_id: uuid.UUID,
                    load: Callable[[], Awaitable[SessionState | None]], *,
                    alone: bool = False) -> SessionState | None:
        """The database's answer for this session and user (`load`), kept for `max_age`.

        One load per session at a time: the requests that miss while it runs wait for its
        answer instead of asking too (when an answer expires under load, every request of
        that session misses at once: 32 clients made 32 queries, each holding a second pooled
        connection, and stalled the worker for 150 ms every second). A waiter takes the shared
        answer only as it would take a kept one: younger than `max_age` counted from before
        the question, and no eviction since (with `max_age` 0 nothing is shared). A load that
        failed because the database is away fails its waiters too (503 `unavailable`), rather
        than have each wait for the database again; after any other failure each asks itself.

        `alone`: a question asked on a session that may already hold SQLite's write lock (a
        caller's own unit of work) neither waits for nor leads a flight, since its leader could
        need that lock."""
        key = (session_id, user_id)
        if alone or self.max_age <= 0:
            ticket = self.ticket()
            state = await load()
            if state is not None:
                self.put(ticket, session_id, user_id, state)
            return state
        flight = self._flights.get(key)
        if flight is not None:
            began, shared = await asyncio.shield(flight)
            if isinstance(shared, BaseException):
                raise Unavailable() from shared
            if (shared is not _NO_ANSWER and began[1] == self._evictions
                    and self.clock() - began[0] < self.max_age):
                return shared  # type: ignore[return-value]
            return await load()
        ticket = self.ticket()
        flight = self._flights[key] = asyncio.get_running_loop().create_future()
        answer: object = _NO_ANSWER
        try:
            answer = state = await load()
            if state is not None:
                self.put(ticket, session_id, user_id, state)
            return state
        except Exception as exc:
            if isinstance(exc, Unavailable) or database_unavailable(exc):
                answer = exc
            raise
        finally:
            del self._flights[key]
            flight.set_result((ticket, answer))

    def ticket(self) -> Ticket:
        """Taken just before asking the database; `put` needs it."""
        return self.clock(), self._evictions

    def put(self, ticket: Ticket, session_id: uuid.UUID, user_id: uuid.UUID,
            state: SessionState) -> None:
        """Keep the database's answer, aged from the ticket's moment, unless an eviction
        happened since (the answer may predate the revocation it was for)."""
        asked_at, evictions = ticket
        if self.max_age <= 0 or evictions != self._evictions:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._prune()
        self._entries[(session_id, user_id)] = (asked_at, state)

    def _prune(self) -> None:
        now = self.clock()
        fresh = {key: entry for key, entry in self._entries.items()
                 if now - entry[0] < self.max_age}
        self._entries = fresh if len(fresh) < MAX_ENTRIES // 2 else {}

    # Evicting.

    def evict(self, user_ids: Iterable[uuid.UUID]) -> None:
        """Forget every answer about these users' sessions."""
        users = set(user_ids)
        self._evictions += 1
        if users:
            for key in [key for key in self._entries if key[1] in users]:
                del self._entries[key]

    def clear(self) -> None:
        self._evictions += 1
        self._entries.clear()

    def revoked(self, session: AsyncSession, user_ids: Iterable[uuid.UUID]) -> None:
        """`session`'s transaction revoked these users' sessions: evict them now, and again
        (and on every worker) once it commits (`committed`)."""
        users = set(user_ids)
        self.evict(users)
        session.info.setdefault(_REVOKED_USERS, set()).update(users)

    async def committed(self, session: AsyncSession) -> None:
        """`session` committed: evict the users it revoked here and publish them to the
        other workers. Never raises: the revocation is committed, and `max_age` bounds it."""
        users: set[uuid.UUID] = session.info.pop(_REVOKED_USERS, set())
        if not users:
            return
        self.evict(users)
        if self._redis_url is None:
            return
        try:
            if self._publisher is None:
                self._publisher = redis_client(
                    self._redis_url, socket_connect_timeout=PUBLISH_TIMEOUT_SECONDS,
                    socket_timeout=PUBLISH_TIMEOUT_SECONDS)
            payload = ",".join(sorted(user.hex for user in users))
            await asyncio.wait_for(self._publisher.publish(self.channel, payload),
                                   PUBLISH_TIMEOUT_SECONDS)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("session_revocation_publish_failed", error=type(exc).__name__)

    @staticmethod
    def rolled_back(session: AsyncSession) -> None:
        """`session` rolled back: its revocations never happened (the evictions stand)."""
        session.info.pop(_REVOKED_USERS, None)

    # The other workers' revocations, through Redis.

    def start(self) -> None:
        """Subscribe to the other processes' revocations (a server process, with Redis)."""
        if self._redis_url is not None and self.max_age > 0 and self._subscriber is None:
            self._subscriber = asyncio.get_running_loop().create_task(
                self._subscribe_forever(), name="session-revocations")

    async def close(self) -> None:
        task, self._subscriber = self._subscriber, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.aclose()

    async def _subscribe_forever(self) -> None:
        assert self._redis_url is not None  # noqa: S101 - `start` checked it
        while True:
            client = redis_client(self._redis_url, health_check_interval=HEALTH_CHECK_SECONDS)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                # Whatever was published while this process was not listening is lost to it.
                self.clear()
                while True:
                    message = await pubsub.get_message(timeout=HEALTH_CHECK_SECONDS)
                    if message is not None:
                        self._received(message.get("data"))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.clear()
                log.warning("session_revocations_unsubscribed", error=type(exc).__name__)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py's
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
            await asyncio.sleep(RECONNECT_SECONDS)

    def _received(self, data: object) -> None:
        try:
            text = data.decode("ascii") if isinstance(data, bytes) else str(data)
            users = [uuid.UUID(hex=part) for part in text.split(",") if part]
        except ValueError:
            self.clear()  # not ours, or garbled: forget everything rather than guess
            return
        self.evict(users)


def session_cache_of(session: AsyncSession) -> SessionCache | None:
    """The cache of the runtime that made `session` (None for a bare session)."""
    cache = session.info.get(SESSION_CACHE)
    return cache if isinstance(cache, SessionCache) else None
