"""Brute-force limits with the `limits` library: per client source on every auth route (an IPv4
address, or the IPv6 /64 that one subscriber gets), and per account on failed logins (the
lock-out). In memory by default; in Redis when `PHIVAULT_REDIS_URL` is set, so the limits hold
across workers and hosts. The same storage bounds the audit events of refused requests
(`refusals`, audit/flood.py).

The limits fail closed: when Redis is down or does not answer within `REDIS_TIMEOUT_SECONDS`, an
auth request answers 503 `unavailable` (with `Retry-After`) rather than going unlimited, and
`/readyz` says not ready, so a load balancer sends no traffic to a worker that cannot limit
password guessing. (An outside review found a Redis that accepted connections and never
answered hanging every auth request and every 401, with `/readyz` still ready.)"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from redis.exceptions import RedisError

from phivault.audit.flood import RefusalBound, client_network
from phivault.errors import AccountLockedOut, RateLimited, Unavailable
from phivault.observability import get_logger
from phivault.ops import metrics
from phivault.ops.redis_client import redis_options

log = get_logger("phivault.auth.ratelimits")

# How long one call to the shared store may take before the request gives up (503).
REDIS_TIMEOUT_SECONDS = 1.0
STORE_DOWN = "The rate-limit store is unavailable right now; try again shortly."


# An outage of the store is logged at most this often (a line per refused request would let
# anyone flood the log while the limits are down).
LOG_EVERY_SECONDS = 10.0
_last_logged = -LOG_EVERY_SECONDS


@asynccontextmanager
async def _store() -> AsyncIterator[None]:
    """A call to the store: bounded, and an outage of it is a 503, never a 500 or a hang."""
    global _last_logged
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_SECONDS * 3):
            yield
    except (RedisError, StorageError, OSError, TimeoutError) as exc:
        if time.monotonic() - _last_logged >= LOG_EVERY_SECONDS:
            _last_logged = time.monotonic()
            # The type and its message (a refused port, a certificate that fails to verify);
            # never the URL, which the client does not put in its errors.
            log.warning("rate_limit_store_unavailable", error=type(exc).__name__,
                        detail=str(exc)[:200])
        raise Unavailable(STORE_DOWN) from exc


class AuthLimits:
    def __init__(self, ip_limit: RateLimitItem, lockout: RateLimitItem,
                 redis_url: str | None = None, prefix: str = "phivault") -> None:
        storage: Storage
        if redis_url:
            storage = RedisStorage(f"async+{redis_url}", implementation="redispy",
                                   key_prefix=prefix, **redis_options(redis_url),
                                   socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                                   socket_timeout=REDIS_TIMEOUT_SECONDS)
        else:
            storage = MemoryStorage()
        self._storage = storage
        # The audit events of 401 and 429 answers are bounded with the same storage, so the
        # bound holds across workers and hosts exactly when these limits do.
        self.refusals = RefusalBound(storage)
        self._limiter = MovingWindowRateLimiter(storage)
        self.ip_limit = ip_limit
        self.lockout = lockout
        # Attempts and successes are counted over the lock-out's window with a limit no
        # account reaches: these items only count, the comparison below decides.
        self._counter = RateLimitItemPerSecond(10**9, lockout.get_expiry())

    async def hit_ip(self, ip: str | None) -> None:
        """Count one auth request from `ip`'s source; 429 once the limit is passed.

        The source is the one the refusal-event bound names (`client_network`): an IPv4
        address (an IPv4-mapped IPv6 address counts as its IPv4 address), or an IPv6 address's
        /64. A subscriber gets a whole /64 and may use any address in it, so counting single
        IPv6 addresses would let one client rotate past the limit 2**64 times over."""
        key = client_network(ip)
        async with _store():
            allowed = await self._limiter.hit(self.ip_limit, "auth-ip", key)
        if not allowed:
            raise RateLimited(await self._retry_after(self.ip_limit, "auth-ip", key))

    async def begin_attempt(self, account: str) -> None:
        """Count a password attempt on `account` (a blind index or user id, never an email)
        BEFORE it is checked, and refuse it (429) when the attempts in the window that did not
        succeed exceed the lock-out. Counting first closes the race in which many parallel
        guesses all pass a check made before any of them failed: an attempt still in flight
        counts as a failure until it succeeds."""
        async with _store():
            await self._limiter.hit(self._counter, "attempts", account)
            failing = (await self._count("attempts", account)
                       - await self._count("successes", account))
        if failing > self.lockout.amount:
            metrics.LOCKOUTS.inc()
            raise AccountLockedOut(await self._retry_after(self._counter, "attempts", account))

    async def attempt_succeeded(self, account: str) -> None:
        async with _store():
            await self._limiter.hit(self._counter, "successes", account)

    async def ready(self) -> bool:
        """Whether the store answers (always, in memory): `/readyz` asks."""
        try:
            async with _store():
                return bool(await self._storage.check())
        except Unavailable:
            return False

    async def _count(self, kind: str, account: str) -> int:
        stats = await self._limiter.get_window_stats(self._counter, kind, account)
        return self._counter.amount - stats.remaining

    async def _retry_after(self, item: RateLimitItem, *identifiers: str) -> int:
        async with _store():
            stats = await self._limiter.get_window_stats(item, *identifiers)
        return max(1, math.ceil(stats.reset_time - time.time()))
