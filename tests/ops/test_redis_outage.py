"""The shared rate-limit store (Redis) away: auth fails closed, in bounded time, and `/readyz`
says so (an outside review: a Redis that accepted connections and never answered hung every
auth request and every 401 while `/readyz` stayed ready; a refused Redis made every auth
request a 500)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from phivault.db.migrate import upgrade
from phivault.runtime import Runtime
from tests.conftest import build_settings, client_for
from tests.factories import PASSWORD
from tests.helpers import free_port

BOUND = 5.0  # seconds: the store's timeouts (1 s a call) and their retries, with room


@pytest.fixture
def silent_redis() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])


@pytest.fixture(params=["refused", "silent"])
async def client_without_redis(request: pytest.FixtureRequest, tmp_path: Path,
                               keys_env: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    port = (request.getfixturevalue("silent_redis") if request.param == "silent"
            else free_port())
    rt = Runtime.from_settings(build_settings(
        keys_env, f"sqlite+aiosqlite:///{tmp_path}/redis-down.db",
        redis_url=f"redis://127.0.0.1:{port}/0"))
    await upgrade(rt.engine)
    async with client_for(rt) as client:
        yield client
    await rt.engine.dispose()


async def timed(call: asyncio.Future[httpx.Response] | object) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = await asyncio.wait_for(call, 30)  # type: ignore[arg-type]
    return answer, time.monotonic() - started


async def test_auth_fails_closed_and_fast_without_redis(
        client_without_redis: httpx.AsyncClient) -> None:
    client = client_without_redis
    answer, took = await timed(client.post("/api/v1/auth/login", json={
        "email": "someone@clinic.example", "password": PASSWORD}))
    assert answer.status_code == 503 and took < BOUND, (answer.text, took)
    assert answer.json()["error"] == "unavailable"
    assert int(answer.headers["Retry-After"]) > 0
    for headers in ({}, {"Authorization": "Bearer not.a.token"}):
        refused, took = await timed(client.get("/api/v1/me", headers=headers))
        assert refused.status_code == 401 and took < BOUND, (refused.text, took)
    ready, took = await timed(client.get("/readyz"))
    assert ready.status_code == 503 and took < BOUND, (ready.text, took)
