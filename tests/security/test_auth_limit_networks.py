"""Review finding (issue 10, MEDIUM): the per-address auth limit must not be escaped by rotating
IPv6 addresses. An IPv6 client is counted on its /64 (what one subscriber gets), an IPv4 client
on its address, and an IPv4-mapped IPv6 address as the IPv4 address it maps."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import pytest

from phivault.audit.flood import client_network
from phivault.runtime import Runtime
from tests.conftest import client_for
from tests.helpers import REDIS_URL, release_redis, require_redis

REGISTER = "/api/v1/auth/register"
LIMIT = 20  # SPEC §6: at most 20 auth requests a minute from one source


async def statuses(rt: Runtime, addresses: list[str]) -> list[int]:
    """One auth request from each address in turn (an empty register body: a 422 that costs
    no hashing, but counts against the limit like any other auth request)."""
    codes = []
    for address in addresses:
        async with client_for(rt, address) as client:
            codes.append((await client.post(REGISTER, json={})).status_code)
    return codes


async def test_rotating_addresses_inside_one_ipv6_64_is_still_limited(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(auth_rate_limit=f"{LIMIT}/minute")
    # 25 different addresses, all in 2001:db8:aa:1::/64, spread over the interface-id bits.
    rotated = [f"2001:db8:aa:1:{i:x}:{i * 7:x}:beef:{i + 1:x}" for i in range(LIMIT + 5)]
    codes = await statuses(rt, rotated)
    assert codes[:LIMIT] == [422] * LIMIT
    assert codes[LIMIT:] == [429] * 5
    # The neighbouring /64 (same /56 and /48) is someone else: not affected.
    assert await statuses(rt, ["2001:db8:aa:2::1", "2001:db8:aa:2::2"]) == [422, 422]


async def test_the_refusal_answers_json_with_retry_after(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(auth_rate_limit="2/minute")
    async with client_for(rt, "2001:db8:bb:1::1") as first, \
            client_for(rt, "2001:db8:bb:1::ffff") as second:
        await first.post(REGISTER, json={})
        await second.post(REGISTER, json={})
        refused = await second.post("/api/v1/auth/login", json={})
    assert refused.status_code == 429
    assert refused.json()["error"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1


async def test_ipv4_mapped_ipv6_counts_as_its_ipv4_address(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(auth_rate_limit="4/minute")
    codes = await statuses(rt, ["198.51.100.40", "::ffff:198.51.100.40"] * 3)
    assert codes == [422, 422, 422, 422, 429, 429]


async def test_ipv4_stays_per_address(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime(auth_rate_limit="2/minute")
    # Neighbours in one /24 are different subscribers: each has the whole limit.
    codes = await statuses(rt, ["198.51.100.50", "198.51.100.50", "198.51.100.51",
                                "198.51.100.51", "198.51.100.50"])
    assert codes == [422, 422, 422, 422, 429]


async def test_the_64_is_shared_across_workers_through_redis(
        runtime: Runtime, fresh_runtime: Callable[..., Any]) -> None:
    """Two workers sharing Redis count one /64 together."""
    require_redis()
    prefix = f"test-{secrets.token_hex(6)}"
    workers = [await fresh_runtime(database_url=runtime.settings.database_url_value,
                                   redis_url=REDIS_URL, redis_prefix=prefix,
                                   auth_rate_limit="3/minute")
               for _ in range(2)]
    try:
        codes = []
        for i in range(4):
            codes += await statuses(workers[i % 2], [f"2001:db8:cc:1::{i + 1:x}"])
        assert codes == [422, 422, 422, 429]
    finally:
        # The test closes what it opened.
        await release_redis([w.limits._storage for w in workers], prefix)  # noqa: SLF001


@pytest.mark.parametrize(("address", "key"), [
    ("2001:db8:aa:1:1234:5678:9abc:def0", "2001:db8:aa:1::/64"),
    ("2001:DB8:AA:1::1", "2001:db8:aa:1::/64"),
    ("::ffff:203.0.113.9", "203.0.113.9"),
    ("203.0.113.9", "203.0.113.9"),
    (None, "unknown"),
])
def test_the_limit_key_is_the_refusal_bounds_source(address: str | None, key: str) -> None:
    """The auth limit and the refusal-event bound (audit/flood.py) name a source alike."""
    assert client_network(address) == key
