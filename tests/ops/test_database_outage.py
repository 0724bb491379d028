"""Database outages (issue 10, item 7), against a throwaway PostgreSQL these tests stop, crash and
start themselves (tests/pg_server.py; never the shared server): the API answers 503
`unavailable` with `Retry-After` within seconds, never a 500, a traceback or a hang; `/readyz`
answers 503 `not_ready` within its bound; the pool heals by itself when the server is back, so
the first requests after it succeed; the audit sequencer rides the outage out, and every event
committed before it is chained, once, gap-free. On SQLite, a database still locked after the
busy timeout is a 503 too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import exc as sa
from sqlalchemy import func, select

from phivault.audit import sequencer as sequencer_module
from phivault.audit import service as audit_service
from phivault.audit.actions import Action
from phivault.audit.models import AuditEvent, QueuedEvent
from phivault.db import engine as engine_module
from phivault.db.migrate import upgrade
from phivault.runtime import Runtime
from phivault.web.app import create_app
from tests.clinical.world import book, set_consent, write_record
from tests.conftest import build_settings, client_for
from tests.factories import PASSWORD, signed_in
from tests.helpers import cli_env, free_port, phivault_command, wait_listening
from tests.pg_server import ThrowawayPostgres, throwaway_postgres

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayPostgres]:
    """One throwaway cluster for this module's tests (each test gets a database of its own,
    and leaves the server running)."""
    with throwaway_postgres() as server:
        yield server


async def _database(cluster: ThrowawayPostgres) -> str:
    name = f"outage_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(cluster.url(driver="postgresql"), timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return cluster.url(name)


@pytest.fixture
async def outage_runtime(cluster: ThrowawayPostgres, keys_env: dict[str, str]
                         ) -> AsyncIterator[Runtime]:
    """A migrated runtime on a new database of the throwaway cluster; it chains in the
    background, as a server does (tests that need it start the loop)."""
    rt = Runtime.from_settings(build_settings(keys_env, await _database(cluster)),
                               chain_after_commit=False)
    await upgrade(rt.engine)
    yield rt
    if cluster_is_up(cluster):
        await rt.close()
    else:  # a failed test left it down: close without chaining
        await rt.engine.dispose()
        cluster.start()


def cluster_is_up(cluster: ThrowawayPostgres) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", cluster.port), timeout=0.5):
            return True
    except OSError:
        return False


async def _stop(cluster: ThrowawayPostgres, mode: str = "fast") -> None:
    # In a thread: the event loop keeps running, as a server's does, and sees the server
    # close its connections.
    await asyncio.to_thread(cluster.stop, mode)
    await asyncio.to_thread(cluster.wait_until_down)


async def _start(cluster: ThrowawayPostgres) -> None:
    await asyncio.to_thread(cluster.start)


def _log_lines(captured: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in captured.getvalue().splitlines() if line]


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "unavailable", body
    assert body["detail"] == "The database is unavailable right now; try again shortly."
    assert int(response.headers["retry-after"]) > 0


async def _count(rt: Runtime, model: type[Any]) -> int:
    async with rt.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(model)))
                   .scalar_one())


async def _chain_holds(rt: Runtime, events: int | None = None) -> None:
    result = await audit_service.verify_snapshot(rt.sessions, rt.audit_key, rt.sequencer,
                                                 rt.queue_key)
    assert result.ok, result.as_dict()
    if events is not None:
        assert result.events == events
    async with rt.sessions() as session:
        seqs = list((await session.execute(select(AuditEvent.seq).order_by(AuditEvent.seq)))
                    .scalars())
    assert seqs == list(range(1, len(seqs) + 1))  # gap-free


# Which failures are outages: one place, errors.database_unavailable.

def _dbapi(error: BaseException, *, invalidated: bool = False,
           kind: type[sa.DBAPIError] = sa.DBAPIError) -> sa.DBAPIError:
    return kind("SELECT 1", None, error, connection_invalidated=invalidated)


@pytest.mark.parametrize(("error", "outage"), [
    (ConnectionRefusedError(111, "Connect call failed"), True),
    (ConnectionResetError(), True),
    (TimeoutError(), True),  # asyncpg's connect timeout
    (socket.gaierror(-2, "Name or service not known"), True),
    (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), True),
    (asyncpg.exceptions.TooManyConnectionsError("too many clients"), True),
    (asyncpg.exceptions.AdminShutdownError("terminating connection"), True),
    (_dbapi(asyncpg.exceptions.ConnectionDoesNotExistError("closed"), invalidated=True), True),
    (_dbapi(asyncpg.exceptions.ConnectionFailureError("lost")), True),
    (sa.TimeoutError("QueuePool limit reached"), True),
    (sa.DisconnectionError(), True),
    (_dbapi(sqlite3.OperationalError("database is locked"), kind=sa.OperationalError), None),
    # Not outages: they keep the answer they have today.
    (_dbapi(asyncpg.exceptions.UniqueViolationError("duplicate key"), kind=sa.IntegrityError),
     False),
    (_dbapi(sqlite3.OperationalError("no such table: users"), kind=sa.OperationalError),
     False),
    (asyncpg.exceptions.InvalidPasswordError("password authentication failed"), False),
    (asyncpg.exceptions.DatabaseDroppedError("database dropped"), False),
    (FileNotFoundError(2, "No such file"), False),
    (PermissionError(13, "Permission denied"), False),
    (ValueError("bad"), False),
])
def test_which_failures_are_database_outages(error: BaseException, outage: bool | None
                                             ) -> None:
    from phivault.errors import database_unavailable  # here: the other tests run without it

    if outage is None:  # SQLite's busy error carries its code (Python >= 3.11)
        assert isinstance(error, sa.DBAPIError)
        error.orig.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[union-attr]
        outage = True
    assert database_unavailable(error) is outage


def test_the_openapi_document_lists_the_503_of_every_route_that_needs_the_database(
        tmp_path: Path, keys_env: dict[str, str]) -> None:
    """SPEC §10: the document describes every route's error answers; every route under
    `/api/v1` reaches the database, so each may answer 503 `unavailable`."""
    rt = Runtime.from_settings(build_settings(keys_env, f"sqlite+aiosqlite:///{tmp_path}/d.db"))
    spec = create_app(runtime=rt).openapi()
    missing = [f"{method.upper()} {path}" for path, operations in spec["paths"].items()
               for method, operation in operations.items()
               if path.startswith("/api/v1/") and "503" not in operation["responses"]]
    assert missing == []
    me = spec["paths"]["/api/v1/me"]["get"]["responses"]["503"]
    assert me["description"].startswith("`unavailable`")
    assert "503" in spec["paths"]["/readyz"]["get"]["responses"]


# The API and /readyz with PostgreSQL down.

async def test_postgres_down_answers_503_unavailable_then_recovers(
        cluster: ThrowawayPostgres, outage_runtime: Runtime, captured_logs: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """Stopped: every route that needs the database answers 503 `unavailable` with
    `Retry-After` at once (a refused connection, a pooled one the server closed, a login's
    durable failure event that cannot be written either), `/readyz` 503 `not_ready`; no 500,
    no traceback, one log line for the outage. Started again: the very next requests succeed,
    and the chain holds."""
    rt = outage_runtime
    user, doctor = await signed_in(rt, "patient"), await signed_in(rt, "doctor")
    async with client_for(rt) as client:
        assert (await client.get("/api/v1/me", headers=user.headers)).status_code == 200
        await set_consent(client, user, True)
        await book(client, user, doctor)
        record = await write_record(client, doctor, user.id)  # the direct path (SPEC §14)
        await _stop(cluster)
        wrong = {"email": user.email, "password": "not the password at all"}
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"/api/v1/records/{record['id']}", {"headers": doctor.headers}),
            ("POST", f"/api/v1/patients/{user.id}/records", {
                "headers": doctor.headers, "json": {"diagnosis": "Cough", "prescriptions": []}}),
            ("GET", "/api/v1/me", {"headers": user.headers}),
            ("GET", "/api/v1/me/sessions", {"headers": user.headers}),
            ("PATCH", "/api/v1/me", {"headers": user.headers, "json": {"phone": "+3312"}}),
            ("POST", "/api/v1/auth/login", {"json": wrong}),
            ("POST", "/api/v1/auth/login", {"json": {"email": user.email,
                                                     "password": PASSWORD}}),
            ("GET", "/api/v1/me", {"headers": user.headers})]
        for method, path, options in requests:
            started = time.monotonic()
            response = await client.request(method, path, **options)
            assert time.monotonic() - started < 3, (method, path)
            _assert_unavailable(response)
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()["error"]) == (503, "not_ready")

        await _start(cluster)
        for _ in range(3):
            response = await client.get("/api/v1/me", headers=user.headers)
            assert response.status_code == 200, response.text
            response = await client.get(f"/api/v1/records/{record['id']}",
                                        headers=doctor.headers)
            assert response.status_code == 200, response.text
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        login = await client.post("/api/v1/auth/login",
                                  json={"email": user.email, "password": PASSWORD})
        assert login.status_code == 200, login.text

    lines = _log_lines(captured_logs)
    assert not [line for line in lines if "exception" in line or "exc_info" in line]
    assert not [line for line in lines if line.get("event") == "unhandled_error"]
    assert [line["event"] for line in lines
            if line.get("event", "").startswith("database_")] == [
        "database_unavailable", "database_available"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    await rt.sequencer.drain()
    await _chain_holds(rt)


async def test_the_first_requests_after_a_crash_succeed_on_a_pool_of_dead_connections(
        cluster: ThrowawayPostgres, outage_runtime: Runtime) -> None:
    """The pool holds connections when PostgreSQL crashes and comes back, and no request
    noticed in between: each one the server closed is replaced when drawn, so no request
    pays for it (before, each drew a dead one: a 500)."""
    rt = outage_runtime
    users = [await signed_in(rt, "patient") for _ in range(6)]
    doctor = await signed_in(rt, "doctor")
    async with client_for(rt) as client:
        await set_consent(client, users[0], True)
        await book(client, users[0], doctor)
        record = f"/api/v1/records/{(await write_record(client, doctor, users[0].id))['id']}"

        async def everyone() -> list[int]:
            answers = await asyncio.gather(
                *(client.get("/api/v1/me", headers=u.headers) for u in users),
                *(client.get(record, headers=doctor.headers) for _ in users))  # direct path
            return [answer.status_code for answer in answers]

        assert await everyone() == [200] * 12  # the pool now holds several connections
        await _stop(cluster, "immediate")
        await _start(cluster)
        assert await everyone() == [200] * 12
    await rt.sequencer.drain()
    await _chain_holds(rt)


async def test_a_database_that_never_answers_costs_seconds_not_a_hang(
        keys_env: dict[str, str]) -> None:
    """A server that accepts connections and then says nothing (a host that drops packets
    behaves alike): `/readyz` answers 503 within its 3 s, the API 503 `unavailable` within the
    connect timeout (5 s), where asyncpg alone waits 60 s."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    port = silent.getsockname()[1]
    rt = Runtime.from_settings(build_settings(
        keys_env, f"postgresql+asyncpg://phivault@127.0.0.1:{port}/phivault"),
        chain_after_commit=False)
    try:
        async with client_for(rt) as client:
            async def timed(request: Any) -> tuple[httpx.Response, float]:
                started = time.monotonic()
                response = await asyncio.wait_for(request, 20)
                return response, time.monotonic() - started

            (ready, ready_took), (login, login_took) = await asyncio.gather(
                timed(client.get("/readyz")),
                timed(client.post("/api/v1/auth/login", json={
                    "email": "someone@clinic.example", "password": PASSWORD})))
        assert ready.status_code == 503 and ready.json()["error"] == "not_ready"
        assert ready_took < 5  # health.READY_TIMEOUT_SECONDS: 3
        _assert_unavailable(login)
        assert login_took < 7  # engine.CONNECT_TIMEOUT_SECONDS: 5
    finally:
        await rt.engine.dispose()
        silent.close()


async def test_sqlite_locked_past_the_busy_timeout_answers_503(
        tmp_path: Path, keys_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds SQLite's write lock past the busy timeout: 503 `unavailable`
    (it was a 500); once the lock is released, the same request succeeds."""
    monkeypatch.setattr(engine_module, "SQLITE_BUSY_TIMEOUT_MS", 300)
    path = tmp_path / "locked.db"
    rt = Runtime.from_settings(build_settings(keys_env, f"sqlite+aiosqlite:///{path}"),
                               chain_after_commit=True)
    try:
        await upgrade(rt.engine)
        user = await signed_in(rt, "patient")
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            async with client_for(rt) as client:
                _assert_unavailable(await client.get("/api/v1/me", headers=user.headers))
                holder.execute("ROLLBACK")
                assert (await client.get("/api/v1/me", headers=user.headers)).status_code == 200
        finally:
            holder.close()
        await _chain_holds(rt)
    finally:
        await rt.close()


# The audit sequencer through an outage.

async def _queue(rt: Runtime, units: int, per_unit: int, first: int = 0) -> None:
    async def one(i: int) -> None:
        async with rt.unit_of_work() as session:
            for j in range(per_unit):
                audit_service.record(session, Action.VIEW_PRESCRIPTION,
                                     resource_type="prescription", resource_id=uuid.uuid4(),
                                     metadata={"count": first + i * per_unit + j})

    await asyncio.gather(*(one(i) for i in range(units)))


async def _wait_for(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_the_sequencer_rides_out_a_crash_and_chains_every_event_once(
        cluster: ThrowawayPostgres, outage_runtime: Runtime, captured_logs: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Events committed to the queue; the background loop chains them in small batches, and
    PostgreSQL crashes while it does. The loop is not restarted, it retries, logging with a
    growing pause; when the server is back it chains the rest: every event once, in one
    gap-free chain that verifies."""
    rt = outage_runtime
    total = 600
    await _queue(rt, 30, per_unit=total // 30)
    assert await _count(rt, QueuedEvent) == total
    # Small batches with a pause after each, so that the crash finds the loop at work.
    monkeypatch.setattr(sequencer_module, "BATCH", 10)
    real_batch = rt.sequencer.sequence_batch

    async def slow_batch(*args: Any, **kwargs: Any) -> int | None:
        taken = await real_batch(*args, **kwargs)
        await asyncio.sleep(0.02)
        return taken

    monkeypatch.setattr(rt.sequencer, "sequence_batch", slow_batch)
    rt.start_background()
    try:
        await _wait_for(lambda: _chained_some(rt))
        assert await _count(rt, AuditEvent) < total
        await _stop(cluster, "immediate")  # a crash, while the loop is at work

        async def failed_twice() -> bool:
            return rt.sequencer.failures >= 2
        await _wait_for(failed_twice)
        task = rt.sequencer._task
        assert task is not None and not task.done() and rt.sequencer.restarts == 0
        await _start(cluster)

        async def all_chained() -> bool:
            return await _count(rt, AuditEvent) == total
        await _wait_for(all_chained)
        assert await _count(rt, QueuedEvent) == 0
        # Events committed after the outage join the same chain.
        await _queue(rt, 2, per_unit=5, first=total)

        async def all_chained_again() -> bool:
            return await _count(rt, AuditEvent) == total + 10
        await _wait_for(all_chained_again)
    finally:
        await rt.sequencer.stop()
    async with rt.sessions() as session:
        counts = sorted(m["count"] for m in (await session.execute(
            select(AuditEvent.event_metadata))).scalars())
        ids = list((await session.execute(select(AuditEvent.event_id))).scalars())
    assert counts == list(range(total + 10))
    assert len(set(ids)) == total + 10
    await _chain_holds(rt, total + 10)
    lines = _log_lines(captured_logs)
    errors = [line for line in lines if line.get("event") == "audit_sequencer_error"]
    pauses = [line["retry_in_seconds"] for line in errors]
    assert len(errors) >= 2 and pauses[:3] == [0.5, 1.0, 2.0][:len(pauses)]
    assert [line["failures"] for line in lines
            if line.get("event") == "audit_sequencer_recovered"] == [len(errors)]
    assert not [line for line in lines if line.get("event") == "audit_sequencer_died"]


async def _chained_some(rt: Runtime) -> bool:
    return await _count(rt, AuditEvent) > 0


async def test_stopping_the_sequencer_during_an_outage_leaves_the_queue_for_later(
        cluster: ThrowawayPostgres, outage_runtime: Runtime, captured_logs: Any) -> None:
    """A server shutting down while PostgreSQL is away: the sequencer's last flush fails, is
    logged, and the shutdown goes on (it raised before); the committed events wait in the
    queue, and the next sequencer chains them."""
    rt = outage_runtime
    await _queue(rt, 5, per_unit=2)
    await _stop(cluster)
    try:
        await rt.sequencer.stop()
    finally:
        await _start(cluster)
    assert any(line.get("event") == "audit_sequencer_stopped_unflushed"
               for line in _log_lines(captured_logs))
    assert await _count(rt, QueuedEvent) == 10
    assert await rt.sequencer.drain() == 10
    await _chain_holds(rt, 10)


# The whole cycle through a real `phivault serve`.

@pytest.mark.slow
async def test_phivault_serve_rides_out_a_postgres_restart(
        cluster: ThrowawayPostgres, outage_runtime: Runtime, tmp_path: Path) -> None:
    """A live server: ready and serving; PostgreSQL stopped: 503 `not_ready` and 503
    `unavailable`, promptly; started again: it serves at once, by itself, and its background
    sequencer chained what it committed. SIGTERM while PostgreSQL is down again: a clean exit
    0. Its log holds no traceback and no 500."""
    rt = outage_runtime
    user = await signed_in(rt, "patient")
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            phivault_command("serve", "--host", "127.0.0.1", "--port", str(port)),
            env=cli_env(rt, PHIVAULT_BEHIND_PROXY="true"), stdout=log_file, stderr=log_file,
            text=True)
    try:
        await asyncio.to_thread(wait_listening, port, process)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.get("/api/v1/me", headers=user.headers)).status_code == 200

            await _stop(cluster)
            started = time.monotonic()
            ready = await client.get("/readyz")
            assert (ready.status_code, ready.json()["error"]) == (503, "not_ready")
            _assert_unavailable(await client.get("/api/v1/me", headers=user.headers))
            assert time.monotonic() - started < 4

            await _start(cluster)
            assert (await client.get("/api/v1/me", headers=user.headers)).status_code == 200
            assert (await client.get("/readyz")).status_code == 200

            async def queue_empty() -> bool:
                return await _count(rt, QueuedEvent) == 0
            await _wait_for(queue_empty)  # the server's own sequencer chained them

            await _stop(cluster)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        if not cluster_is_up(cluster):
            await _start(cluster)
    log = log_path.read_text()
    assert "Traceback" not in log, log
    assert '"status": 500' not in log and "unhandled_error" not in log, log
    await _chain_holds(rt)


# An outside review of the first version of these fixes.

async def test_an_outage_at_the_exports_commit_gives_its_gate_place_back(
        cluster: ThrowawayPostgres, outage_runtime: Runtime,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL goes away after the export's reads and before its unit of work commits: the
    answer is 503 and the streamed body never starts; the patient's place in the export gate
    must still come back (it used to be held until the process restarted: 429 forever)."""
    from phivault.privacy import export as export_module
    rt = outage_runtime
    user = await signed_in(rt, "patient")
    real_begin = export_module.begin
    crashed = False

    async def begin_then_outage(*args: Any, **kwargs: Any) -> Any:
        nonlocal crashed
        start = await real_begin(*args, **kwargs)
        if not crashed:
            crashed = True
            await _stop(cluster)
        return start

    monkeypatch.setattr(export_module, "begin", begin_then_outage)
    async with client_for(rt) as client:
        _assert_unavailable(await client.get("/api/v1/me/export", headers=user.headers))
        await _start(cluster)
        for _ in range(2):
            again = await client.get("/api/v1/me/export", headers=user.headers)
            assert again.status_code == 200, again.text


async def test_a_frozen_database_costs_a_request_its_statement_timeout(
        cluster: ThrowawayPostgres, keys_env: dict[str, str]) -> None:
    """The server freezes (SIGSTOP, like a partition that drops packets) while the pool holds
    live connections: a request that draws one is answered 503 once its statement times out,
    and `/readyz` within its own bound; nothing hangs."""
    # The runtime bounds every statement (30 s by default; 2 s here, to keep the test short).
    rt = Runtime.from_settings(build_settings(keys_env, await _database(cluster)),
                               chain_after_commit=False, command_timeout=2)
    await upgrade(rt.engine)
    user = await signed_in(rt, "patient")
    master = int((cluster.data / "postmaster.pid").read_text().split()[0])
    pids: list[int] = []
    try:
        async with client_for(rt) as client:
            assert (await client.get("/api/v1/me", headers=user.headers)).status_code == 200
            children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True,
                                      text=True, check=False).stdout.split()
            pids = [master, *map(int, children)]
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()
            _assert_unavailable(await asyncio.wait_for(
                client.get("/api/v1/me", headers=user.headers), 20))
            assert time.monotonic() - started < 8
            started = time.monotonic()
            ready = await asyncio.wait_for(client.get("/readyz"), 20)
            assert ready.status_code == 503 and time.monotonic() - started < 8
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        await rt.engine.dispose()


def test_cli_commands_say_the_database_is_down_in_one_line(keys_env: dict[str, str]) -> None:
    """Exit 3 and one line: `audit verify` must not exit 1 (its "the chain does not hold")
    because the database is away."""
    port = free_port()  # nothing listens there
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/phivault"
    settings = build_settings(keys_env, url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
    env.update({"PHIVAULT_DATABASE_URL": url,
                "PHIVAULT_MASTER_KEYS": settings.master_keys.get_secret_value(),
                "PHIVAULT_INDEX_KEY": settings.index_key.get_secret_value(),
                "PHIVAULT_AUDIT_KEY": settings.audit_key.get_secret_value(),
                "PHIVAULT_JWT_KEYS": settings.jwt_keys.get_secret_value()})
    for args in (["audit", "verify"], ["users", "list"], ["migrate"]):
        done = subprocess.run(phivault_command(*args), env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 3, (args, done.stderr)
        assert done.stdout == ""
        assert done.stderr == ("phivault: the database is unavailable; nothing was done (try "
                               "again when it is back)\n"), (args, done.stderr)
