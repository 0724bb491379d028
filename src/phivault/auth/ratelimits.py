"""Brute-force limits with the `limits` library: per client IP on every auth route, and per
account on failed logins (the lock-out). In memory by default; in Redis when
`PHIVAULT_REDIS_URL` is set, so the limits hold across workers and hosts."""

from __future__ import annotations

import math
import time

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from phivault.errors import RateLimited


class AuthLimits:
    def __init__(self, ip_limit: RateLimitItem, lockout: RateLimitItem,
                 redis_url: str | None = None, prefix: str = "phivault") -> None:
        storage: Storage
        if redis_url:
            storage = RedisStorage(f"async+{redis_url}", implementation="redispy",
                                   key_prefix=prefix)
        else:
            storage = MemoryStorage()
        self._storage = storage
        self._limiter = MovingWindowRateLimiter(storage)
        self.ip_limit = ip_limit
        self.lockout = lockout

    async def hit_ip(self, ip: str | None) -> None:
        """Count one auth request from `ip`; 429 once the limit is passed."""
        key = ip or "unknown"
        if not await self._limiter.hit(self.ip_limit, "auth-ip", key):
            raise RateLimited(await self._retry_after(self.ip_limit, "auth-ip", key))

    async def check_account(self, account: str) -> None:
        """429 while `account` (a blind index, never an email) is locked out."""
        if not await self._limiter.test(self.lockout, "lockout", account):
            raise RateLimited(await self._retry_after(self.lockout, "lockout", account),
                              "Too many failed logins for this account; try again later.")

    async def fail_account(self, account: str) -> None:
        await self._limiter.hit(self.lockout, "lockout", account)

    async def _retry_after(self, item: RateLimitItem, *identifiers: str) -> int:
        stats = await self._limiter.get_window_stats(item, *identifiers)
        return max(1, math.ceil(stats.reset_time - time.time()))
