"""The session-check cache (auth/session_cache.py): an answer lives at most a second, a
revocation evicts it at once in its own process and, through Redis, on every other worker; a
revoked session is refused on another worker within a second, with or without Redis."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis import asyncio as aioredis

from phivault.auth import session_cache as session_cache_module
from phivault.auth.models import AuthSession, User
from phivault.auth.service import revoke_sessions
from phivault.auth.session_cache import SessionCache
from phivault.auth.tokens import AccessClaims
from phivault.errors import InvalidToken, Unavailable
from phivault.runtime import Runtime
from tests.conftest import client_for
from tests.factories import TestUser, signed_in
from tests.helpers import REDIS_URL, require_redis

ME = "/api/v1/me"
STATE = ("login", None, None, "active", "patient")
REVOKED = ("login", "2026-12-05", None, "active", "patient")



class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# The cache alone.

def test_an_answer_lives_at_most_max_age_from_before_the_question() -> None:
    clock = Clock()
    cache = SessionCache(1.0, clock=clock)
    session_id, user_id = uuid.uuid4(), uuid.uuid4()
    ticket = cache.ticket()
    clock.now += 0.4  # the database took 0.4 s to answer
    cache.put(ticket, session_id, user_id, STATE)
    assert cache.get(session_id, user_id) == STATE
    clock.now = 100.999
    assert cache.get(session_id, user_id) == STATE
    clock.now = 101.0  # a second after the question, whenever the answer came
    assert cache.get(session_id, user_id) is None
    assert cache.get(uuid.uuid4(), user_id) is None


def test_an_answer_read_across_an_eviction_is_not_kept() -> None:
    """It may have been read before the revocation that the eviction announced."""
    cache = SessionCache(1.0, clock=Clock())
    session_id, user_id = uuid.uuid4(), uuid.uuid4()
    ticket = cache.ticket()
    cache.evict([uuid.uuid4()])
    cache.put(ticket, session_id, user_id, STATE)
    assert cache.get(session_id, user_id) is None


def test_eviction_is_per_user_and_zero_keeps_nothing() -> None:
    cache = SessionCache(1.0, clock=Clock())
    a, b = uuid.uuid4(), uuid.uuid4()
    for user in (a, a, b):
        cache.put(cache.ticket(), uuid.uuid4(), user, STATE)
    kept_b = next(key for key in cache._entries if key[1] == b)
    cache.evict([a])
    assert list(cache._entries) == [kept_b]
    off = SessionCache(0, clock=Clock())
    off.put(off.ticket(), uuid.uuid4(), a, STATE)
    assert not off._entries


def test_a_message_evicts_its_users_and_a_garbled_one_everything() -> None:
    cache = SessionCache(1.0, clock=Clock())
    a, b = uuid.uuid4(), uuid.uuid4()
    for user in (a, b):
        cache.put(cache.ticket(), uuid.uuid4(), user, STATE)
    cache._received(a.hex.encode())
    assert [key[1] for key in cache._entries] == [b]
    cache._received(b"not,a,user")
    assert not cache._entries


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_cache_module, "MAX_ENTRIES", 10)
    clock = Clock()
    cache = SessionCache(1.0, clock=clock)
    for _ in range(10):
        cache.put(cache.ticket(), uuid.uuid4(), uuid.uuid4(), STATE)
    clock.now += 2  # all ten are stale: dropped to make room
    cache.put(cache.ticket(), uuid.uuid4(), uuid.uuid4(), STATE)
    assert len(cache._entries) == 1
    for _ in range(20):  # all fresh: the cache starts over rather than grow
        cache.put(cache.ticket(), uuid.uuid4(), uuid.uuid4(), STATE)
    assert len(cache._entries) <= 10


# One question at a time per session (`SessionCache.fetch`).

async def test_the_misses_of_one_session_ask_the_database_once() -> None:
    """When an answer expires under load every request of that session misses at once: one
    asks, the others wait for its answer (and the answer is kept)."""
    cache = SessionCache(1.0)
    session_id, user_id = uuid.uuid4(), uuid.uuid4()
    asked, gate = 0, asyncio.Event()

    async def load() -> Any:
        nonlocal asked
        asked += 1
        await gate.wait()
        return STATE

    waiting = [asyncio.create_task(cache.fetch(session_id, user_id, load)) for _ in range(20)]
    await asyncio.sleep(0.01)
    gate.set()
    assert await asyncio.gather(*waiting) == [STATE] * 20
    assert asked == 1 and cache.get(session_id, user_id) == STATE
    other = await cache.fetch(uuid.uuid4(), user_id, load)  # another session asks for itself
    assert other == STATE and asked == 2


async def test_a_waiter_asks_again_after_an_eviction_or_a_failed_question() -> None:
    """A revocation evicted while the question ran: the asker keeps its own answer (its
    request began before the revocation), but a waiter asks again and sees the revocation.
    A question that failed leaves each waiter to ask for itself."""
    cache = SessionCache(1.0)
    session_id, user_id = uuid.uuid4(), uuid.uuid4()
    answers, gate = [STATE, REVOKED, REVOKED], asyncio.Event()

    async def load() -> Any:
        await gate.wait()
        return answers.pop(0)

    first = asyncio.create_task(cache.fetch(session_id, user_id, load))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(cache.fetch(session_id, user_id, load)) for _ in range(2)]
    await asyncio.sleep(0.01)
    cache.evict([user_id])
    gate.set()
    assert await first == STATE
    assert await asyncio.gather(*waiters) == [REVOKED, REVOKED]
    assert cache.get(session_id, user_id) is None  # read across the eviction: not kept

    calls = 0

    async def failing() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.01)
            raise OSError("the database went away")
        return STATE

    first = asyncio.create_task(cache.fetch(session_id, user_id, failing))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(cache.fetch(session_id, user_id, failing))
    with pytest.raises(OSError):
        await first
    assert await waiter == STATE and calls == 2


@pytest.mark.parametrize(("max_age", "asked_again_at"), [(0.0, 0.0), (1.0, 1.5)])
async def test_a_shared_answer_is_only_as_good_as_a_kept_one(max_age: float,
                                                             asked_again_at: float) -> None:
    """A waiter takes the shared answer as it would take a kept one: younger than `max_age`
    from before the question (here the question's unit of work was slow, and another worker,
    with no Redis, committed a revocation meanwhile); with `max_age` 0 nothing is shared."""
    now = [0.0]
    cache = SessionCache(max_age, clock=lambda: now[0])
    session_id, user_id = uuid.uuid4(), uuid.uuid4()
    database = {"state": STATE}
    read, release = asyncio.Event(), asyncio.Event()

    async def load() -> Any:
        state = database["state"]  # the SELECT, then a slow COMMIT
        read.set()
        await release.wait()
        return state

    first = asyncio.create_task(cache.fetch(session_id, user_id, load))
    await read.wait()
    database["state"] = REVOKED  # another worker's revocation, committed
    now[0] = asked_again_at
    later = asyncio.create_task(cache.fetch(session_id, user_id, load))
    await asyncio.sleep(0)
    release.set()
    assert await first == STATE  # its request began before the revocation
    assert await later == REVOKED


async def test_a_question_lost_to_an_outage_fails_its_waiters_at_once() -> None:
    """The database is away: the question fails after its bound (5 s to connect, 10 s for a
    pooled connection); the requests that waited for it answer 503 with it, instead of each
    waiting the bound again."""
    cache = SessionCache(1.0)
    session_id, user_id = uuid.uuid4(), uuid.uuid4()
    bound, loop = 0.3, asyncio.get_running_loop()

    async def load() -> Any:
        await asyncio.sleep(bound)
        raise TimeoutError("the database did not answer")

    first = asyncio.create_task(cache.fetch(session_id, user_id, load))
    await asyncio.sleep(0.01)
    began = loop.time()
    waiter = asyncio.create_task(cache.fetch(session_id, user_id, load))
    with pytest.raises(TimeoutError):
        await first
    with pytest.raises(Unavailable):
        await waiter
    assert loop.time() - began < bound * 1.5


# One process: a revocation evicts at once.

def _kept(rt: Runtime, user: TestUser) -> bool:
    return any(key[1] == user.id for key in rt.session_cache._entries)


async def test_every_revocation_path_refuses_a_kept_session_at_once(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    admin = await signed_in(runtime, "admin")
    doctor = await signed_in(runtime, "doctor")
    patient = await signed_in(runtime)
    for user in (doctor, patient):
        assert (await client.get(ME, headers=user.headers)).status_code == 200
        assert _kept(runtime, user)
    # An admin disables the doctor: the status changes with the revocation.
    disabled = await client.patch(f"/api/v1/users/{doctor.id}", headers=admin.headers,
                                  json={"status": "disabled"})
    assert disabled.status_code == 200
    assert (await client.get(ME, headers=doctor.headers)).status_code == 401
    # An erasure marks the account deleted and calls `revoke_sessions` in its transaction.
    async with runtime.unit_of_work() as session:
        user = await session.get(User, patient.id)
        assert user is not None
        user.status = "deleted"
        assert await revoke_sessions(session, AuthSession.user_id == patient.id) == 1
    assert not _kept(runtime, patient)
    assert (await client.get(ME, headers=patient.headers)).status_code == 401


async def test_a_rolled_back_revocation_publishes_nothing(runtime: Runtime) -> None:
    user = await signed_in(runtime)
    with pytest.raises(RuntimeError):
        async with runtime.unit_of_work() as session:
            await revoke_sessions(session, AuthSession.user_id == user.id)
            assert session.info["phivault.revoked_users"] == {user.id}
            raise RuntimeError("the work fails")
    async with client_for(runtime) as c:
        assert (await c.get(ME, headers=user.headers)).status_code == 200


# Two workers on one database.

async def _two_workers(fresh_runtime: Callable[..., Any], **settings: Any
                       ) -> tuple[Runtime, Runtime]:
    a: Runtime = await fresh_runtime(**settings)
    b: Runtime = await fresh_runtime(database_url=a.settings.database_url_value, **settings)
    return a, b


async def _logout(rt: Runtime, user: TestUser) -> float:
    async with client_for(rt) as c:
        out = await c.post("/api/v1/auth/logout", json={"refresh_token": user.refresh_token})
    assert out.status_code == 204
    return time.monotonic()


async def test_without_redis_another_worker_refuses_within_a_second(
        fresh_runtime: Callable[..., Any]) -> None:
    a, b = await _two_workers(fresh_runtime)
    user = await signed_in(a)
    async with client_for(b) as c:
        assert (await c.get(ME, headers=user.headers)).status_code == 200
        assert _kept(b, user)
        logged_out = await _logout(a, user)
        # Every request that starts a second or more after the logout is refused.
        while True:
            started = time.monotonic()
            status = (await c.get(ME, headers=user.headers)).status_code
            if status == 401:
                break
            assert status == 200 and started - logged_out < 1.0
            await asyncio.sleep(0.02)


async def _passes(rt: Runtime, claims: AccessClaims) -> bool:
    """Whether `rt` lets the token through its session check (as every request does)."""
    try:
        async with rt.unit_of_work() as session:
            await rt.authenticator.check_session(session, claims)
    except InvalidToken:
        return False
    return True


async def test_through_redis_another_worker_drops_its_answer_at_once(
        fresh_runtime: Callable[..., Any]) -> None:
    """Worker B's clock is frozen, so its answers never age: only the message from worker A
    can make B ask the database again. (The tokens come from a third runtime without Redis,
    and the checks are made on the service, so that only the cache talks to Redis here.)"""
    require_redis()
    prefix = f"test-{secrets.token_hex(6)}"
    a, b = await _two_workers(fresh_runtime, redis_url=REDIS_URL, redis_prefix=prefix)
    issuer: Runtime = await fresh_runtime(database_url=a.settings.database_url_value)
    b.session_cache.clock = Clock()
    b.session_cache.start()
    listener = aioredis.Redis.from_url(REDIS_URL)
    try:
        for _ in range(200):  # until B listens
            if (await listener.pubsub_numsub(b.session_cache.channel))[0][1]:
                break
            await asyncio.sleep(0.025)
    finally:
        await listener.aclose()
    patient, erased = await signed_in(issuer), await signed_in(issuer)
    tokens = {user.id: issuer.access_tokens.verify(user.access_token or "")
              for user in (patient, erased)}
    for claims in tokens.values():
        assert await _passes(b, claims)
    # A logout on A (its session revoked), and an erasure on A: the account deleted and its
    # sessions revoked in one commit.
    async with a.unit_of_work() as session:
        await revoke_sessions(session, AuthSession.id == tokens[patient.id].session_id)
    async with a.unit_of_work() as session:
        user = await session.get(User, erased.id)
        assert user is not None
        user.status = "deleted"
        await revoke_sessions(session, AuthSession.user_id == erased.id)
    for user in (patient, erased):
        for _ in range(200):
            if not _kept(b, user):
                break
            await asyncio.sleep(0.025)
        assert not await _passes(b, tokens[user.id])
