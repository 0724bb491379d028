"""The bound on refusal events (audit/flood.py): which refusals are written at each level (source,
network, everywhere), what their `count` carries, and that the bound holds across workers
sharing one Redis."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from sqlalchemy.ext.asyncio import AsyncSession

from phivault import errors
from phivault.audit.actions import Action
from phivault.audit.flood import (
    RefusalBound,
    client_network,
    client_networks,
    record_refusal,
    refusal_of,
)
from tests.helpers import REDIS_URL, release_redis, require_redis


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def flood(bound: RefusalBound, n: int, kind: str = "invalid_token",
                address: str = "198.51.100.4") -> dict[int, int]:
    """Refusal number (1-based) -> the `count` of the event it wrote, for those written."""
    written = {}
    for number in range(1, n + 1):
        carried = await bound.admit(kind, address)
        if carried is not None:
            written[number] = carried
    return written


@pytest.mark.parametrize(("address", "network"), [
    ("198.51.100.4", "198.51.100.4"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("::ffff:198.51.100.4", "198.51.100.4"),
    (None, "unknown"),
    ("not an address", "unknown"),
])
def test_refusals_count_against_the_client_network(address: str | None, network: str) -> None:
    assert client_network(address) == network


async def test_a_flood_writes_the_first_tenth_and_hundredth_with_the_suppressed_count(
) -> None:
    clock = Clock()
    bound = RefusalBound(MemoryStorage(), clock=clock)
    assert await flood(bound, 200) == {1: 0, 10: 8, 100: 89}
    # The next window's first refusal carries what the last one suppressed after its 100th.
    clock.now += bound.window
    assert await flood(bound, 1) == {1: 100}
    # 201 refusals: 4 events, which between them account for every one.
    assert 4 + 0 + 8 + 89 + 100 == 201


async def test_a_trickle_is_written_in_full() -> None:
    clock = Clock()
    bound = RefusalBound(MemoryStorage(), clock=clock)
    for _ in range(5):
        assert await bound.admit("invalid_token", "198.51.100.4") == 0
        clock.now += bound.window


@pytest.mark.parametrize(("address", "networks"), [
    ("198.51.100.4", ("198.51.100.4", "198.51.100.0/24")),
    ("::ffff:198.51.100.4", ("198.51.100.4", "198.51.100.0/24")),
    ("2001:db8:1:2a3:aaaa::1", ("2001:db8:1:2a3::/64", "2001:db8:1:200::/56",
                                "2001:db8:1::/48")),
    (None, ("unknown",)),
])
def test_refusals_count_against_the_source_and_the_networks_around_it(
        address: str | None, networks: tuple[str, ...]) -> None:
    assert client_networks(address) == networks


async def test_kinds_are_bounded_apart() -> None:
    bound = RefusalBound(MemoryStorage(), clock=Clock())
    assert await flood(bound, 10) == {1: 0, 10: 8}
    assert await flood(bound, 1, kind="unauthenticated") == {1: 0}
    assert await flood(bound, 1, kind="rate_limited:address") == {1: 0}


async def test_addresses_inside_one_ipv6_64_are_one_source() -> None:
    bound = RefusalBound(MemoryStorage(), clock=Clock())
    assert await flood(bound, 9, address="2001:db8::1") == {1: 0}
    assert await flood(bound, 1, address="2001:db8::ffff") == {1: 8}  # the 10th


async def test_rotating_64s_inside_one_48_writes_a_handful_of_events() -> None:
    """2,000 bad tokens, each from a /64 of its own (in 8 /56s) of one /48: counted as one
    network, they write 3 events, and the next window's first event reports the rest."""
    clock = Clock()
    bound = RefusalBound(MemoryStorage(), clock=clock)
    written = {}
    for number in range(1, 2001):
        carried = await bound.admit("invalid_token", f"2001:db8:1:{number - 1:x}::1")
        if carried is not None:
            written[number] = carried
    # The 1,000th is the /48's 1,000th but its /56's 232nd: suppressed.
    assert written == {1: 0, 10: 8, 100: 89}
    clock.now += bound.window
    # The 1,000th was charged to its /56 (the /48 admitted it), every other one to the /48.
    assert await bound.admit("invalid_token", "2001:db8:1:300::1") == 1900
    assert 4 + 0 + 8 + 89 + 1900 == 2001


async def test_rotating_addresses_inside_one_ipv4_24_writes_a_handful_of_events() -> None:
    """254 bad tokens, each from an address of its own in one /24: 3 events, not 254."""
    clock = Clock()
    bound = RefusalBound(MemoryStorage(), clock=clock)
    written = {}
    for number in range(1, 255):
        carried = await bound.admit("invalid_token", f"198.51.100.{number}")
        if carried is not None:
            written[number] = carried
    assert written == {1: 0, 10: 8, 100: 89}
    # The suppressed ones were charged to the /24, so any address in it reports them next.
    clock.now += bound.window
    assert await bound.admit("invalid_token", "198.51.100.7") == 254 - 3 - 8 - 89


async def test_the_global_level_bounds_many_distinct_networks() -> None:
    """2,000 refusals, each from a network of its own (IPv4 /24s and IPv6 /48s in turn), so
    no per-network level ever refuses: the global level alone writes 4 events."""
    clock = Clock()
    bound = RefusalBound(MemoryStorage(), clock=clock)
    written = {}
    for number in range(1, 2001):
        address = (f"10.{number // 256}.{number % 256}.1" if number % 2
                   else f"2001:db8:{number:x}::1")
        carried = await bound.admit("invalid_token", address)
        if carried is not None:
            written[number] = carried
    assert written == {1: 0, 10: 8, 100: 89, 1000: 899}
    # What the global cap alone suppressed is reported by the kind's next event, anywhere.
    clock.now += bound.window
    assert await bound.admit("invalid_token", "192.0.2.1") == 1000
    # Other kinds have global levels of their own.
    assert await bound.admit("unauthenticated", "192.0.2.1") == 0


def test_which_errors_are_bounded_refusals() -> None:
    assert refusal_of(errors.InvalidToken()) == (Action.INVALID_TOKEN, "invalid_token", None)
    assert refusal_of(errors.Unauthenticated()) == (Action.MISSING_TOKEN, "unauthenticated",
                                                    None)
    assert refusal_of(errors.RateLimited(5)) == (Action.RATE_LIMITED, "rate_limited:address",
                                                 "address_limit")
    assert refusal_of(errors.AccountLockedOut(5)) == (Action.RATE_LIMITED,
                                                      "rate_limited:lockout", "lockout")
    # A reused refresh token has an event of its own; other errors are not refusals of this kind.
    for other in (errors.RefreshTokenReused(), errors.InvalidCredentials(), errors.Forbidden(),
                  errors.NotFound()):
        assert refusal_of(other) is None


async def test_a_refusal_that_cannot_be_recorded_is_still_a_refusal() -> None:
    """Writing the event fails (the database is down): logged, and the caller's 401 stands."""
    @asynccontextmanager
    async def broken() -> AsyncIterator[AsyncSession]:
        raise ConnectionError("database down")
        yield  # pragma: no cover

    unit_of_work: Callable[[], AbstractAsyncContextManager[AsyncSession]] = broken
    bound = RefusalBound(MemoryStorage(), clock=Clock())
    await record_refusal(bound, unit_of_work, errors.InvalidToken(), "GET /api/v1/me")
    await record_refusal(bound, unit_of_work, errors.NotFound(), "GET /api/v1/me")


def _redis_storage(prefix: str) -> Storage:
    return RedisStorage(f"async+{REDIS_URL}", implementation="redispy", key_prefix=prefix)


async def test_the_bound_holds_across_workers_sharing_redis() -> None:
    """Two workers, each with its own connection to one Redis, answer one flood in turns:
    between them they write the 1st, 10th and 100th refusal, not each their own."""
    require_redis()
    prefix = f"test-flood-{secrets.token_hex(6)}"
    clock = Clock()
    storages = [_redis_storage(prefix), _redis_storage(prefix)]
    workers = [RefusalBound(storage, clock=clock) for storage in storages]
    try:
        written = {}
        for number in range(1, 201):
            carried = await workers[number % 2].admit("invalid_token", "198.51.100.4")
            if carried is not None:
                written[number] = carried
        assert written == {1: 0, 10: 8, 100: 89}
        clock.now += workers[0].window
        assert await workers[1].admit("invalid_token", "198.51.100.4") == 100
    finally:
        await release_redis(storages, prefix)
