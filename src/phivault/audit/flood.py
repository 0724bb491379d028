"""Rate-bounded, durable audit events for the refusals anyone can cause at will: 401 answers
(`invalid_token`, and `unauthenticated` for a missing token) and 429 answers (the per-address
limit and the account lock-out).

Each of these refusals is evidence an auditor wants, but each costs an attacker one request, so
one event per answer would let a flood of requests flood the trail. `RefusalBound` decides which
refusals are written:

- Refusals are counted in fixed windows of `window` seconds (60) at several levels at once,
  each per kind (`invalid_token`, `unauthenticated`, `rate_limited:address`,
  `rate_limited:lockout`): the exact source (an IPv4 address, or the IPv6 /64 that one
  subscriber gets, so that rotating addresses inside it buys nothing), the networks around it
  (IPv4 /24; IPv6 /56 and /48, so that rotating /64s or /56s inside one allocation buys
  nothing either), and the whole service (a global level, which bounds an attacker who owns
  many networks).
- At each level, the 1st, 10th, 100th, 1,000th ... refusal of a window is admitted, and an
  event is written only when every level admits its refusal. A flood of n requests from one
  source, from 10,000 /64s of one /48, or from anywhere at all writes at most
  1 + floor(log10 n) events per kind and window (200 bad tokens: 3 events; a million: 7),
  while a trickle of one a minute is written in full (as long as the global level is quiet: in
  a flood, the global cap also bounds the events of sources that are not flooding).
- A written event's metadata `count` is the number of refusals it accounts for that were
  suppressed since an earlier event. A suppressed refusal is charged to the coarsest level below the
  global one that refused it (the global level only when no other did), and a written event
  collects the charges of each of its levels: so the count covers the source and the networks
  around it, plus what the global cap alone suppressed anywhere. Charges are kept up to
  `CARRY_SECONDS`, so the trail tells how large a flood was, not only that there was one.
- The counters are kept in the `limits` storage of the runtime's rate limits: in memory, or in
  Redis when `PHIVAULT_REDIS_URL` is set, so the bound holds across workers and hosts. Counting
  is one atomic increment per level, so however many workers answer a flood, exactly one of
  them writes the 10th refusal.

The events are durable (outcome `denied`) and written in a unit of work of their own, after the
refused request's work rolled back. They hold the route's template (never the path, whose
segments the client chose), the kind and the count, and no token material.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from limits.aio.storage import Storage
from sqlalchemy.ext.asyncio import AsyncSession

from phivault import errors
from phivault.audit import service as audit
from phivault.audit.actions import Action, Outcome
from phivault.observability import get_logger
from phivault.request_context import SYSTEM, Actor, current_actor, current_request

WINDOW_SECONDS = 60
CARRY_SECONDS = 24 * 3600
ANONYMOUS = Actor(None, None)

log = get_logger("phivault.audit")


def client_networks(address: str | None) -> tuple[str, ...]:
    """The networks a refusal from `address` is counted against, finest first: the IPv4
    address and its /24, or the IPv6 /64, /56 and /48 (an IPv4-mapped address is IPv4)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return ("unknown",)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address):
        return tuple(str(ipaddress.IPv6Network((ip, prefix), strict=False))
                     for prefix in (64, 56, 48))
    return str(ip), str(ipaddress.IPv4Network((ip, 24), strict=False))


def client_network(address: str | None) -> str:
    """The exact source of a refusal: the IPv4 address, or the IPv6 /64."""
    return client_networks(address)[0]


def _power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


class RefusalBound:
    """Which refusals are written (see the module's docstring)."""

    def __init__(self, storage: Storage, *, window: int = WINDOW_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self.window = window
        self.clock = clock

    async def admit(self, kind: str, address: str | None) -> int | None:
        """Count one refusal of `kind` from `address` at every level. None: suppress its
        event. An int: write the event, with that many suppressed refusals as its `count`."""
        levels = [f"{kind}/{network}" for network in client_networks(address)]
        levels.append(f"{kind}/*")
        window = int(self.clock() // self.window)
        seen = await asyncio.gather(*(
            self._storage.incr(f"audit-refusals/{level}/{window}", 2 * self.window)
            for level in levels))
        refused = [level for level, n in zip(levels, seen, strict=True)
                   if not _power_of_ten(n)]
        if refused:
            # Charge the refusal to the broadest network that refused it, so that the next
            # event written from anywhere in that network reports it; to the global level
            # only when the global cap alone refused it.
            below_global = refused[:-1] if refused[-1] == levels[-1] else refused
            charged = (below_global or refused)[-1]
            await self._storage.incr(f"audit-suppressed/{charged}", CARRY_SECONDS)
            return None
        carried = 0
        for level in levels:
            carried += await self._collect(f"audit-suppressed/{level}")
        return carried

    async def _collect(self, key: str) -> int:
        carried = max(0, await self._storage.get(key))
        if carried:
            # Subtract what this event reports rather than clearing: refusals that other
            # workers suppress meanwhile stay counted for the next event.
            left = await self._storage.incr(key, CARRY_SECONDS, -carried)
            if left < 0:  # The counter expired between the read and the subtraction.
                await self._storage.incr(key, CARRY_SECONDS, -left)
        return carried


def refusal_of(exc: errors.PhivaultError) -> tuple[Action, str, str | None] | None:
    """The action, bound kind and metadata reason of a refusal that is audited this way, or
    None for every other error. A reused refresh token has its own event (not bounded: the
    first reuse revokes the family, and later ones are plain `invalid_token`)."""
    if isinstance(exc, errors.RefreshTokenReused):
        return None
    if isinstance(exc, errors.InvalidToken):
        return Action.INVALID_TOKEN, "invalid_token", None
    if isinstance(exc, errors.Unauthenticated):
        return Action.MISSING_TOKEN, "unauthenticated", None
    if isinstance(exc, errors.AccountLockedOut):
        return Action.RATE_LIMITED, "rate_limited:lockout", "lockout"
    if isinstance(exc, errors.RateLimited):
        return Action.RATE_LIMITED, "rate_limited:address", "address_limit"
    return None


async def record_refusal(
    bound: RefusalBound,
    unit_of_work: Callable[[], AbstractAsyncContextManager[AsyncSession]],
    exc: errors.PhivaultError,
    route: str | None,
) -> None:
    """Write the durable event of the refusal `exc` unless `bound` suppresses it.

    `route` is the route's method and path template (`GET /api/v1/records/{record_id}`). A
    failure to count or to write is logged and swallowed: the request is refused either way,
    and a refusal must not turn into a 500.
    """
    refusal = refusal_of(exc)
    if refusal is None:
        return
    action, kind, reason = refusal
    try:
        carried = await bound.admit(kind, current_request().ip)
        if carried is None:
            return
        actor = current_actor()
        metadata: dict[str, str | int] = {"count": carried}
        if route is not None:
            metadata["route"] = route
        if reason is not None:
            metadata["reason"] = reason
        async with unit_of_work() as session:
            audit.record(session, action, actor=ANONYMOUS if actor == SYSTEM else actor,
                         outcome=Outcome.DENIED, metadata=metadata)
    except Exception as failure:  # noqa: BLE001 - see the docstring
        log.warning("audit_refusal_not_recorded", action=str(action),
                    error=type(failure).__name__)


__all__ = ["CARRY_SECONDS", "WINDOW_SECONDS", "RefusalBound", "client_network",
           "client_networks", "record_refusal", "refusal_of"]
