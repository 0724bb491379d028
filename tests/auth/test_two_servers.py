"""Two `phivault serve` processes on one database and one Redis: the lock-out, the per-IP limit
and revocations hold across them."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from phivault.crypto.tls import write_self_signed_certificate
from tests.factories import PASSWORD, make_user
from tests.helpers import (
    REDIS_URL,
    cli_env,
    client_context,
    free_port,
    phivault_command,
    require_redis,
    wait_listening,
)


@pytest.fixture
def two_servers(fresh_runtime: Callable[..., Any], tmp_path: Path
                ) -> Iterator[Callable[..., Any]]:
    processes: list[subprocess.Popen[str]] = []

    async def start(**extra: str) -> tuple[Any, list[str], Path]:
        require_redis()
        rt = await fresh_runtime()
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        write_self_signed_certificate(cert, key)
        env = cli_env(rt, PHIVAULT_TLS_CERT_FILE=str(cert), PHIVAULT_TLS_KEY_FILE=str(key),
                      PHIVAULT_REDIS_URL=REDIS_URL,
                      PHIVAULT_REDIS_PREFIX=f"test-{secrets.token_hex(6)}",
                      PHIVAULT_ARGON2_MEMORY_KIB="8", PHIVAULT_ARGON2_TIME_COST="1", **extra)
        urls = []
        for _ in range(2):
            port = free_port()
            process = subprocess.Popen(
                phivault_command("serve", "--host", "127.0.0.1", "--port", str(port)),
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            processes.append(process)
            wait_listening(port, process)
            urls.append(f"https://127.0.0.1:{port}")
        return rt, urls, cert

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()
        process.communicate(timeout=30)


async def test_limits_and_revocation_hold_across_processes(
        two_servers: Callable[..., Any]) -> None:
    rt, (a, b), cert = await two_servers(PHIVAULT_AUTH_RATE_LIMIT="10/minute",
                                         PHIVAULT_LOCKOUT="5/15minutes")
    victim, other = await make_user(rt), await make_user(rt)
    login = "/api/v1/auth/login"
    with httpx.Client(verify=client_context(cert), timeout=30) as http:
        # The lock-out: failures on either server count for the account.
        for server in (a, a, a, b, b):
            response = http.post(server + login, json={"email": victim.email,
                                                       "password": "wrong" * 4})
            assert response.status_code == 401
        for server in (a, b):
            locked = http.post(server + login, json={"email": victim.email,
                                                     "password": PASSWORD})
            assert locked.status_code == 429 and "failed logins" in locked.json()["detail"]
            assert int(locked.headers["retry-after"]) > 0

        # Revocation: a token refused within a second of its session's logout elsewhere.
        pair = http.post(a + login, json={"email": other.email, "password": PASSWORD}).json()
        bearer = {"Authorization": f"Bearer {pair['access_token']}"}
        assert http.get(b + "/api/v1/me", headers=bearer).status_code == 200
        assert http.post(a + "/api/v1/auth/logout",
                         json={"refresh_token": pair["refresh_token"]}).status_code == 204
        logged_out = time.monotonic()
        refused = http.get(b + "/api/v1/me", headers=bearer)
        assert refused.status_code == 401 and time.monotonic() - logged_out < 1.0

        # The per-IP limit: 9 auth requests so far from 127.0.0.1, across both servers.
        assert http.post(b + "/api/v1/auth/refresh",
                         json={"refresh_token": "A" * 43}).status_code == 401
        limited = http.post(a + login, json={"email": other.email, "password": PASSWORD})
        assert limited.status_code == 429 and "failed logins" not in limited.json()["detail"]
