"""Brute-force limits with the `limits` library: per client source on every auth route (an IPv4
address, or the IPv6 /64 that one subscriber gets), and per account on failed logins (the
lock-out). In memory by default; in Redis when `PHIVAULT_REDIS_URL` is set, so the limits hold
across workers and hosts. The same storage bounds the audit events of refused requests
(`refusals`, audit/flood.py)."""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from phivault.audit.flood import RefusalBound, client_network
from phivault.errors import AccountLockedOut, RateLimited
from phivault.ops.redis_client import redis_options


class AuthLimits:
    def __init__(self, ip_limit: RateLimitItem, lockout: RateLimitItem,
                 redis_url: str | None = None, prefix: str = "phivault") -> None:
        storage: Storage
        if redis_url:
            storage = RedisStorage(f"async+{redis_url}", implementation="redispy",
                                   key_prefix=prefix, **redis_options(redis_url))
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
        if not await self._limiter.hit(self.ip_limit, "auth-ip", key):
            raise RateLimited(await self._retry_after(self.ip_limit, "auth-ip", key))

    async def begin_attempt(self, account: str) -> None:
        """Count a password attempt on `account` (a blind index or user id, never an email)
        BEFORE it is checked, and refuse it (429) when the attempts in the window that did not
        succeed exceed the lock-out. Counting first closes the race in which many parallel
        guesses all pass a check made before any of them failed: an attempt still in flight
        counts as a failure until it succeeds."""
        await self._limiter.hit(self._counter, "attempts", account)
        if await self._count("attempts", account) - await self._count("successes", account) \
                > self.lockout.amount:
            raise AccountLockedOut(await self._retry_after(self._counter, "attempts", account))

    async def attempt_succeeded(self, account: str) -> None:
        await self._limiter.hit(self._counter, "successes", account)

    async def _count(self, kind: str, account: str) -> int:
        stats = await self._limiter.get_window_stats(self._counter, kind, account)
        return self._counter.amount - stats.remaining

    async def _retry_after(self, item: RateLimitItem, *identifiers: str) -> int:
        stats = await self._limiter.get_window_stats(item, *identifiers)
        return max(1, math.ceil(stats.reset_time - time.time()))
