"""Running the real `phivault` command against a test runtime's database and keys."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from phivault.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("PHIVAULT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require_redis() -> None:
    """Skip the test when the test Redis is unreachable (fail instead with `CI=true`)."""
    import redis  # only the tests that need Redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        message = f"Redis at {REDIS_URL} is unreachable ({type(exc).__name__})"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)


async def release_redis(storages: Iterable[object], prefix: str) -> None:
    """After a test that used Redis through `limits` storages: close their connections (the
    test opened them) and delete every key under the test's `prefix`."""
    import redis

    for storage in storages:
        await storage.bridge.get_connection().aclose()  # type: ignore[attr-defined]
    cleaner = redis.Redis.from_url(REDIS_URL)
    for key in cleaner.scan_iter(f"{prefix}:*"):
        cleaner.delete(key)
    cleaner.close()


def cli_env(rt: Runtime, **extra: str) -> dict[str, str]:
    s = rt.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
    env.update({
        "PHIVAULT_DATABASE_URL": s.database_url_value,
        "PHIVAULT_MASTER_KEYS": s.master_keys.get_secret_value(),
        "PHIVAULT_INDEX_KEY": s.index_key.get_secret_value(),
        "PHIVAULT_AUDIT_KEY": s.audit_key.get_secret_value(),
        "PHIVAULT_JWT_KEYS": s.jwt_keys.get_secret_value(),
    })
    env.update(extra)
    return env


def phivault_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "phivault.cli.main", *args]


def run_cli(*args: str, env: dict[str, str], cwd: Path | None = None, stdin: str = "",
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(phivault_command(*args), env=env, cwd=cwd or ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


def stop_server(process: subprocess.Popen[str]) -> None:
    """SIGTERM, so the server drains as in production; SIGKILL after 30 s, then fail."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
        raise


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def client_context(cert: Path, *, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = maximum
    return context


def wait_listening(port: int, process: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}: "
                                 f"{process.stderr.read() if process.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not start listening")
