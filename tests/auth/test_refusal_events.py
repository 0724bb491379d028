"""401 (`invalid_token`, `unauthenticated`) and 429 (per-address limit, lock-out) answers write
durable audit events, bounded per source, per network and globally so that a flood of requests
writes a handful of events whose `count` says how many were suppressed (audit/flood.py); no
event holds token material."""

from __future__ import annotations

import json
import random
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from limits.aio.storage import MemoryStorage
from sqlalchemy import select

from phivault.audit.flood import RefusalBound
from phivault.audit.models import AuditEvent
from phivault.runtime import Runtime
from phivault.web.app import create_app
from tests.conftest import client_for
from tests.factories import make_user, sign_in
from tests.helpers import REDIS_URL, release_redis, require_redis

LOGIN = "/api/v1/auth/login"
RECORD = "GET /api/v1/records/{record_id}"


def new_address() -> str:
    """An address no other test uses: the bound counts per address, on a shared runtime."""
    return f"198.18.{random.randrange(256)}.{random.randrange(1, 255)}"


def freeze(monkeypatch: pytest.MonkeyPatch, rt: Runtime, *,
           own_counters: bool = True) -> Callable[[], None]:
    """Hold the bound's clock still (so a flood falls in one window); returns a function that
    moves it on by one window. On the shared runtime the bound gets counters of its own, since
    its global level counts the refusals of every other test too."""
    if own_counters:
        monkeypatch.setattr(rt.limits, "refusals", RefusalBound(MemoryStorage()))
    now = [rt.limits.refusals.clock()]
    monkeypatch.setattr(rt.limits.refusals, "clock", lambda: now[0])

    def next_window() -> None:
        now[0] += rt.limits.refusals.window
    return next_window


async def get_from_each(rt: Runtime, addresses: list[str], path: str,
                        token: Callable[[], str] | None = None) -> list[str]:
    """GET `path` once from each address (one app, a client per address); the request ids."""
    app = create_app(runtime=rt)
    answers = []
    for address in addresses:
        headers = {"Authorization": f"Bearer {token()}"} if token else {}
        transport = httpx.ASGITransport(app=app, client=(address, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            response = await c.get(path, headers=headers)
        assert response.status_code == 401
        answers.append(response.headers["x-request-id"])
    return answers


async def events_from(rt: Runtime, ip: str) -> list[AuditEvent]:
    async with rt.sessions() as session:
        return list((await session.execute(select(AuditEvent).where(AuditEvent.ip == ip)
                                           .order_by(AuditEvent.seq))).scalars().all())


def as_text(event: AuditEvent) -> str:
    columns = {c.key: getattr(event, c.key) for c in AuditEvent.__mapper__.column_attrs}
    return json.dumps({k: v.hex() if isinstance(v, bytes) else str(v)
                       for k, v in columns.items()}) + json.dumps(event.event_metadata)


def fake_token() -> str:
    """JWT-shaped, with a marker to look for in the trail."""
    return f"eyJhbGciOiJFZERTQSJ9.{secrets.token_urlsafe(24)}.{secrets.token_urlsafe(32)}"


async def test_a_flood_of_bad_tokens_writes_a_handful_of_bounded_events(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    next_window = freeze(monkeypatch, runtime)
    ip = new_address()
    tokens = [fake_token() for _ in range(201)]
    async with client_for(runtime, ip) as client:
        answers = []
        for token in tokens[:200]:
            response = await client.get(f"/api/v1/records/{uuid.uuid4()}",
                                        headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 401 and response.json()["error"] == "invalid_token"
            answers.append(response.headers["x-request-id"])
        events = await events_from(runtime, ip)
        assert [(e.action, e.outcome, e.actor_id, e.actor_role, e.request_id)
                for e in events] == [("INVALID_TOKEN", "denied", None, None, answers[n - 1])
                                     for n in (1, 10, 100)]
        assert [e.event_metadata for e in events] == [
            {"count": count, "route": RECORD} for count in (0, 8, 89)]

        # In the next window, the first refusal carries the 100 the last one suppressed.
        next_window()
        response = await client.get(f"/api/v1/records/{uuid.uuid4()}",
                                    headers={"Authorization": f"Bearer {tokens[200]}"})
        assert response.status_code == 401
    events = await events_from(runtime, ip)
    assert len(events) == 4 and events[-1].event_metadata["count"] == 100
    assert sum(1 + e.event_metadata["count"] for e in events) == 201
    for event in events:
        text = as_text(event)
        assert not any(part in text for token in tokens for part in token.split(".")[1:])


async def test_rotating_64s_inside_one_48_writes_a_handful_of_events(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 bad tokens, each from a /64 of its own inside one /48: 3 events, not 2,000."""
    freeze(monkeypatch, runtime)
    network = f"2001:db8:{random.randrange(1, 0xffff):x}:"
    answers = await get_from_each(runtime, [f"{network}{n:x}::1" for n in range(2000)],
                                  "/api/v1/me", fake_token)
    async with runtime.sessions() as session:
        events = list((await session.execute(
            select(AuditEvent).where(AuditEvent.ip.startswith(network))
            .order_by(AuditEvent.seq))).scalars().all())
    assert [(e.action, e.request_id, e.event_metadata["count"]) for e in events] == [
        ("INVALID_TOKEN", answers[n - 1], count) for n, count in ((1, 0), (10, 8), (100, 89))]


async def test_many_addresses_inside_one_ipv4_24_write_a_handful_of_events(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, runtime)
    network = f"198.19.{random.randrange(256)}."
    await get_from_each(runtime, [f"{network}{host}" for host in range(1, 255)],
                        "/api/v1/me/consents")
    async with runtime.sessions() as session:
        events = list((await session.execute(
            select(AuditEvent).where(AuditEvent.ip.startswith(network))
            .order_by(AuditEvent.seq))).scalars().all())
    assert [(e.action, e.ip, e.event_metadata["count"]) for e in events] == [
        ("MISSING_TOKEN", f"{network}{host}", count) for host, count in ((1, 0), (10, 8),
                                                                         (100, 89))]


async def test_a_revoked_token_is_refused_and_audited_without_its_material(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, runtime)
    user = await sign_in(runtime, await make_user(runtime))
    ip = new_address()
    async with client_for(runtime, ip) as client:
        assert (await client.post("/api/v1/auth/logout",
                                  json={"refresh_token": user.refresh_token})).status_code == 204
        response = await client.get("/api/v1/me", headers=user.headers)
        assert response.status_code == 401 and response.json()["error"] == "invalid_token"
        # An unknown refresh token is an invalid token as well.
        refused = await client.post("/api/v1/auth/refresh",
                                    json={"refresh_token": secrets.token_urlsafe(32)})
        assert refused.status_code == 401
    events = [e for e in await events_from(runtime, ip) if e.action == "INVALID_TOKEN"]
    assert [(e.request_id, e.actor_id, e.event_metadata) for e in events] == [
        (response.headers["x-request-id"], None, {"count": 0, "route": "GET /api/v1/me"})]
    # The second refusal was the source's 2nd in the window: suppressed, and counted.
    text = "".join(as_text(e) for e in await events_from(runtime, ip))
    for secret in (user.access_token, user.refresh_token, *user.access_token.split(".")):
        assert secret not in text


async def test_missing_tokens_are_audited_the_same_way(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, runtime)
    ip = new_address()
    async with client_for(runtime, ip) as client:
        for _ in range(15):
            response = await client.get("/api/v1/me/consents")
            assert response.status_code == 401 and response.json()["error"] == "unauthenticated"
    events = await events_from(runtime, ip)
    assert [(e.action, e.outcome, e.event_metadata) for e in events] == [
        ("MISSING_TOKEN", "denied", {"count": count, "route": "GET /api/v1/me/consents"})
        for count in (0, 8)]


async def test_a_flood_past_the_address_limit_writes_a_handful_of_events(
        fresh_runtime: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """On a database of its own, so that the whole trail can be counted: 200 logins from one
    address under a limit of 3 a minute leave 3 failures and 3 bounded 429 events."""
    rt = await fresh_runtime(auth_rate_limit="3/minute")
    freeze(monkeypatch, rt)
    ip = new_address()
    statuses = []
    async with client_for(rt, ip) as client:
        for _ in range(200):
            response = await client.post(LOGIN, json={"email": "nobody@clinic.example",
                                                      "password": "wrong password, twice over"})
            statuses.append(response.status_code)
    assert statuses == [401] * 3 + [429] * 197
    async with rt.sessions() as session:
        events = list((await session.execute(select(AuditEvent).order_by(AuditEvent.seq)))
                      .scalars().all())
    assert [e.action for e in events] == ["LOGIN_FAILURE"] * 3 + ["RATE_LIMITED"] * 3
    assert [e.event_metadata for e in events[3:]] == [
        {"count": count, "route": f"POST {LOGIN}", "reason": "address_limit"}
        for count in (0, 8, 89)]
    assert all(e.outcome == "denied" and e.ip == ip for e in events)


async def test_a_flood_on_a_locked_account_writes_a_handful_of_events(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, runtime)
    victim = await make_user(runtime)
    ip = new_address()
    async with client_for(runtime, ip) as client:
        for _ in range(5):
            response = await client.post(LOGIN, json={"email": victim.email,
                                                      "password": "not the password at all"})
            assert response.status_code == 401
        for _ in range(50):
            response = await client.post(LOGIN, json={"email": victim.email,
                                                      "password": "not the password at all"})
            assert response.status_code == 429 and "Retry-After" in response.headers
    events = await events_from(runtime, ip)
    assert [e.action for e in events] == ["LOGIN_FAILURE"] * 5 + ["RATE_LIMITED"] * 2
    assert [e.event_metadata for e in events[5:]] == [
        {"count": count, "route": f"POST {LOGIN}", "reason": "lockout"} for count in (0, 8)]


async def test_the_bound_holds_across_two_workers_sharing_redis(
        runtime: Runtime, fresh_runtime: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runtimes (two workers) on one database and one Redis answer one flood in turns:
    between them they write 3 events, not 3 each."""
    require_redis()
    prefix = f"test-{secrets.token_hex(6)}"
    workers = [await fresh_runtime(database_url=runtime.settings.database_url_value,
                                   redis_url=REDIS_URL, redis_prefix=prefix)
               for _ in range(2)]
    for worker in workers:
        freeze(monkeypatch, worker, own_counters=False)
    ip = new_address()
    try:
        async with client_for(workers[0], ip) as a, client_for(workers[1], ip) as b:
            for number in range(200):
                response = await (a, b)[number % 2].get(
                    "/api/v1/me", headers={"Authorization": f"Bearer {fake_token()}"})
                assert response.status_code == 401
        events = await events_from(runtime, ip)
        assert [(e.action, e.event_metadata["count"]) for e in events] == [
            ("INVALID_TOKEN", 0), ("INVALID_TOKEN", 8), ("INVALID_TOKEN", 89)]
    finally:
        # The test closes what it opened.
        await release_redis([w.limits._storage for w in workers], prefix)  # noqa: SLF001
