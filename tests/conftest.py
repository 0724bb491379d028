"""Shared fixtures: generated keys, a migrated database per backend per session, the app.

Every test that takes `backend` runs twice: on SQLite (a file) and on PostgreSQL at
`PHIVAULT_TEST_DATABASE_URL`, in a database of its own per session and xdist worker. When
PostgreSQL is unreachable its tests are skipped with the reason, unless `CI=true`: then they
fail. After each test that used a database, the audit chain must still verify.
"""

from __future__ import annotations

import io
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import settings as hypothesis_settings

from phivault.audit import service as audit_service
from phivault.config import Settings, load_settings
from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.db.migrate import upgrade
from phivault.observability import configure_logging
from phivault.runtime import Runtime
from phivault.web.app import create_app

hypothesis_settings.register_profile("phivault", max_examples=100, deadline=None)
hypothesis_settings.load_profile("phivault")

DEFAULT_PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
KEY_VARIABLES = ("PHIVAULT_MASTER_KEYS", "PHIVAULT_INDEX_KEY", "PHIVAULT_AUDIT_KEY",
                 "PHIVAULT_JWT_KEYS")


def pytest_configure(config: pytest.Config) -> None:
    # No test may read the developer's own configuration by accident; the tests' own settings
    # (PHIVAULT_TEST_DATABASE_URL, PHIVAULT_TEST_REDIS_URL, PHIVAULT_TEST_FUZZ_*) stay.
    for name in list(os.environ):
        if name.startswith("PHIVAULT_") and not name.startswith("PHIVAULT_TEST_"):
            del os.environ[name]


def generate_keys() -> dict[str, str]:
    """A fresh set of production-form keys, as environment variables."""
    return {
        "PHIVAULT_MASTER_KEYS": generate_key_line(KeyKind.MASTER),
        "PHIVAULT_INDEX_KEY": generate_key_line(KeyKind.INDEX),
        "PHIVAULT_AUDIT_KEY": generate_key_line(KeyKind.AUDIT),
        "PHIVAULT_JWT_KEYS": generate_key_line(KeyKind.JWT),
    }


@pytest.fixture(scope="session")
def keys_env() -> dict[str, str]:
    return generate_keys()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Fresh keys in the process environment, run from an empty folder (no stray .env): for
    tests of how settings load."""
    monkeypatch.chdir(tmp_path)
    keys = generate_keys()
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    return keys


# Tests that are not about hashing or rate limits use cheap argon2 parameters and a per-IP
# limit no suite reaches (every test client comes from the same address).
TEST_DEFAULTS: dict[str, Any] = {"argon2_memory_kib": 8, "argon2_time_cost": 1,
                                 "auth_rate_limit": "1000000/minute"}


def build_settings(keys: dict[str, str], database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {name.removeprefix("PHIVAULT_").lower(): value
                              for name, value in keys.items()}
    values.update(TEST_DEFAULTS)
    values["database_url"] = database_url
    values.update(overrides)
    return load_settings(**values)


# PostgreSQL.

def _plain_pg(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def pg_base_url() -> str:
    return os.environ.get("PHIVAULT_TEST_DATABASE_URL", DEFAULT_PG)


async def _pg_admin(sql: str) -> None:
    connection = await asyncpg.connect(_plain_pg(pg_base_url()), timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def pg_reachable() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        connection = await asyncpg.connect(_plain_pg(pg_base_url()), timeout=5)
        await connection.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_pg_problem: list[str | None] = []


async def require_postgres() -> None:
    """Skip (or, with CI=true, fail) when PostgreSQL does not answer; probed once."""
    if not _pg_problem:
        _pg_problem.append(await pg_reachable())
    problem = _pg_problem[0]
    if problem is None:
        return
    message = f"PostgreSQL at PHIVAULT_TEST_DATABASE_URL is unreachable ({problem})"
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; CI=true requires it")
    pytest.skip(message)


def _worker() -> str:
    """Unique per test process, so two suites on one server never share a database."""
    return f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_{os.getpid()}"


def _pg_url_for(name: str) -> str:
    base = pg_base_url()
    return base.rsplit("/", 1)[0] + "/" + name


async def create_pg_database(name: str) -> str:
    await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await _pg_admin(f'CREATE DATABASE "{name}"')
    return _pg_url_for(name)


async def drop_pg_database(name: str) -> None:
    await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Backends.

@dataclass
class Backend:
    name: str
    url: str


@pytest.fixture(scope="session")
async def _databases() -> AsyncIterator[dict[str, str]]:
    """The shared database of each backend, made once per session (pytest may set the
    parametrised `backend` up more than once; the databases must outlive that)."""
    made: dict[str, str] = {}
    yield made
    if "postgres" in made:
        await drop_pg_database(f"phivault_t_{_worker()}")


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, _databases: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> Backend:
    name = request.param
    if name == "postgres":
        await require_postgres()
    if name not in _databases:
        if name == "sqlite":
            path = tmp_path_factory.mktemp("sqlite") / "phivault.db"
            _databases[name] = f"sqlite+aiosqlite:///{path}"
        else:
            _databases[name] = await create_pg_database(f"phivault_t_{_worker()}")
    return Backend(name, _databases[name])


@pytest.fixture(scope="session")
async def _runtimes(_databases: dict[str, str]) -> AsyncIterator[dict[str, Runtime]]:
    """The shared runtimes; they close (chaining what they queued) before their databases are
    dropped, hence the dependency on `_databases`."""
    made: dict[str, Runtime] = {}
    yield made
    for rt in made.values():
        await rt.close()


@pytest.fixture
async def runtime(backend: Backend, keys_env: dict[str, str],
                  _runtimes: dict[str, Runtime]) -> Runtime:
    """The shared, migrated runtime of the test's backend (one per session and backend)."""
    if backend.name not in _runtimes:
        # Each unit of work's events are chained right after its commit, so tests read the
        # chain at once; the background sequencer has tests of its own (tests/audit/).
        rt = Runtime.from_settings(build_settings(keys_env, backend.url), chain_after_commit=True)
        await upgrade(rt.engine)
        _runtimes[backend.name] = rt
    return _runtimes[backend.name]


@pytest.fixture
async def fresh_runtime(backend: Backend, tmp_path: Path,
                        keys_env: dict[str, str]) -> AsyncIterator[Callable[..., Any]]:
    """A factory of runtimes on new, empty, migrated databases of the same backend as
    `backend`, for tests that must own the whole audit chain (tampering, counting)."""
    made: list[tuple[Runtime, str | None]] = []

    async def make(**overrides: Any) -> Runtime:
        """A new database, or with `database_url=` another runtime's (e.g. after rotation);
        `migrate=False` leaves the schema to the test."""
        if "database_url" in overrides:
            url, pg_name = overrides.pop("database_url"), None
        elif backend.name == "sqlite":
            url, pg_name = f"sqlite+aiosqlite:///{tmp_path}/{uuid.uuid4().hex}.db", None
        else:
            pg_name = f"phivault_f_{_worker()}_{secrets.token_hex(4)}"
            url = await create_pg_database(pg_name)
        chain_after_commit = overrides.pop("chain_after_commit", True)
        migrate = overrides.pop("migrate", True)
        rt = Runtime.from_settings(build_settings(keys_env, url, **overrides),
                                   chain_after_commit=chain_after_commit)
        if migrate:
            await upgrade(rt.engine)
        made.append((rt, pg_name))
        return rt

    yield make
    for rt, pg_name in reversed(made):
        await rt.close()
        if pg_name:
            await drop_pg_database(pg_name)


@pytest.fixture(autouse=True)
async def audit_chain_holds(request: pytest.FixtureRequest,
                            _runtimes: dict[str, Runtime]) -> AsyncIterator[None]:
    """After every test that used the shared database, the audit chain still verifies."""
    yield
    if "runtime" not in request.fixturenames or request.node.get_closest_marker("tampers"):
        return
    rt = _runtimes.get(request.node.callspec.params["backend"])
    if rt is None:
        return
    result = await audit_service.verify_snapshot(rt.sessions, rt.audit_key, rt.sequencer,
                                                     rt.queue_key)
    assert result.ok, f"audit chain broken at seq {result.first_bad_seq}"


# The app.

CLIENT_IP = "203.0.113.7"


@asynccontextmanager
async def client_for(rt: Runtime, ip: str = CLIENT_IP) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the real app over `rt`, connecting from `ip`."""
    transport = httpx.ASGITransport(app=create_app(runtime=rt), client=(ip, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver",
                                 headers={"User-Agent": "phivault-tests/1"}) as c:
        yield c


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(runtime) as c:
        yield c


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log line written during the test, as JSON lines."""
    stream = io.StringIO()
    configure_logging("debug", stream)
    yield stream
    configure_logging("warning", io.StringIO())


APP_LOG = pytest.StashKey[io.StringIO]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """The app's warnings and errors during a test are kept (before the fixtures start, so that
    `captured_logs` still takes them over) ..."""
    item.stash[APP_LOG] = io.StringIO()
    configure_logging("warning", item.stash[APP_LOG])
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """... and go into its report: a failure shows the server's side of a 500, even on a run of
    the whole suite under xdist."""
    try:
        return (yield)
    finally:
        if lines := item.stash[APP_LOG].getvalue():
            item.add_report_section("call", "phivault log", lines[-20_000:])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "postgres" in item.nodeid and "[" in item.nodeid:
            item.add_marker(pytest.mark.postgres)
