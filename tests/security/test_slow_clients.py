"""Slow clients and slow hashes hold no transaction (issue 10, finding 1, HIGH).

An outside review had a patient trickle an attachment's body at a byte every 25 s: the upload
held its transaction, so on SQLite the only write lock (every audited request and `/readyz`
failed after 30 s) and on PostgreSQL a pooled connection (twenty such uploads drained the pool).
Bad logins hashed argon2 inside the write lock too. Here the invariant is proved directly (no
connection is checked out while a body arrives or a password hashes, on any path that hashes)
and by its effect (other patients keep their pace while both attacks run).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import text

from phivault.auth.models import User
from phivault.clinical import attachments
from phivault.keys.service import row_cipher
from phivault.runtime import Runtime
from phivault.web.app import create_app
from tests.clinical.test_attachments import stored_count
from tests.clinical.world import API, BOUNDARY, book, expect, file_of, set_consent, set_status
from tests.conftest import client_for
from tests.factories import PASSWORD, TestUser, new_email, signed_in

UPLOADS = 6  # more than the pool (2 kept + 2 overflow on PostgreSQL, 2 on SQLite) can hold
BAD_LOGINS = 8
# Another patient's request while the attacks run. Without the fix it waits for the busy
# timeout or the pool timeout (30 s); with it, for its own work only. Generous for a shared,
# noisy 2-core machine, far below what the attack used to cost.
PACE_LIMIT = 2.5
CONSENTS = {"marketing": False, "data_sharing": False, "analytics": True}


class Gate:
    """A body that sends its head, then waits until the gate opens (a trickling client)."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.waiting = 0

    async def body(self, head: bytes, rest: bytes) -> AsyncIterator[bytes]:
        yield head
        self.waiting += 1
        await self.opened.wait()
        yield rest


def split_upload(data: bytes, filename: str = "scan.pdf") -> tuple[str, bytes, bytes]:
    """(Content-Type, the head with the first 200 file bytes, the rest of the body)."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/pdf\r\n\r\n").encode()
    body = head + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    cut = len(head) + 200
    return f"multipart/form-data; boundary={BOUNDARY}", body[:cut], body[cut:]


def checked_out(rt: Runtime) -> int:
    return int(rt.engine.pool.checkedout())  # type: ignore[attr-defined]


def spy_on_hashing(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many pooled connections are checked out whenever a password hashes."""
    seen: list[int] = []
    passwords = rt.authenticator.passwords
    assert rt.accounts.passwords is passwords

    def spied(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any) -> Any:
            seen.append(checked_out(rt))
            return await original(*args)
        return call

    monkeypatch.setattr(passwords, "hash", spied(passwords.hash))
    monkeypatch.setattr(passwords, "verify", spied(passwords.verify))
    return seen


def during_the_next_hash(runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
                         request: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]
                         ) -> None:
    """The next password check is followed, before its request goes on, by `request` (made by
    another client, which must succeed): a race decided inside the hash's window."""
    passwords = runtime.authenticator.passwords
    original = passwords.verify
    fired = False

    async def verify_then(stored: str | None, password: str) -> bool:
        nonlocal fired
        result = await original(stored, password)
        if not fired:
            fired = True
            async with client_for(runtime) as other:
                assert (await request(other)).status_code == 204
        return result

    monkeypatch.setattr(passwords, "verify", verify_then)


async def timed(request: Awaitable[httpx.Response], status: int) -> float:
    started = time.monotonic()
    response = await asyncio.wait_for(request, timeout=40)
    assert response.status_code == status, response.text
    return time.monotonic() - started


async def test_no_connection_is_held_while_a_password_hashes(
        runtime: Runtime, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path that hashes or checks a password: nothing checked out meanwhile."""
    admin = await signed_in(runtime, "admin")
    patient = await signed_in(runtime, "patient")
    other = await signed_in(runtime, "patient")
    seen = spy_on_hashing(runtime, monkeypatch)
    auth = f"{API}/auth"

    expect(await client.post(f"{auth}/login", json={
        "email": patient.email, "password": PASSWORD}), 200)
    expect(await client.post(f"{auth}/login", json={
        "email": patient.email, "password": "wrong " + PASSWORD}), 401, "invalid_credentials")
    expect(await client.post(f"{auth}/login", json={
        "email": new_email("nobody"), "password": PASSWORD}), 401, "invalid_credentials")
    expect(await client.post(f"{auth}/register", json={
        "email": new_email("new"), "password": PASSWORD, "full_name": "New Patient"}), 201)
    expect(await client.post(f"{auth}/mfa/setup", headers=patient.headers,
                             json={"password": PASSWORD}), 200)
    expect(await client.post(f"{auth}/password", headers=patient.headers, json={
        "current_password": "wrong " + PASSWORD, "new_password": PASSWORD + " new"}),
        401, "invalid_credentials")
    expect(await client.post(f"{auth}/password", headers=patient.headers, json={
        "current_password": PASSWORD, "new_password": PASSWORD + " new"}), 204)
    created = expect(await client.post(f"{API}/users", headers=admin.headers, json={
        "email": new_email("doc"), "full_name": "Dr Slow Hash", "role": "doctor"}), 201)
    expect(await client.post(f"{auth}/setup", json={
        "setup_token": created["setup_token"], "password": PASSWORD}), 204)
    expect(await client.request("DELETE", f"{API}/me", headers=other.headers,
                                json={"password": "wrong " + PASSWORD}),
           401, "invalid_credentials")
    expect(await client.request("DELETE", f"{API}/me", headers=other.headers,
                                json={"password": PASSWORD}), 204)

    assert len(seen) >= 11
    assert seen == [0] * len(seen), f"connections checked out while hashing: {seen}"


async def test_a_login_racing_a_password_change_fails(runtime: Runtime,
                                                      client: httpx.AsyncClient,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The password is checked outside the transaction: one changed meanwhile wins."""
    patient = await signed_in(runtime, "patient")
    during_the_next_hash(runtime, monkeypatch, lambda other: other.post(
        f"{API}/auth/password", headers=patient.headers,
        json={"current_password": PASSWORD, "new_password": PASSWORD + " 2"}))
    expect(await client.post(f"{API}/auth/login", json={
        "email": patient.email, "password": PASSWORD}), 401, "invalid_credentials")
    monkeypatch.undo()
    expect(await client.post(f"{API}/auth/login", json={
        "email": patient.email, "password": PASSWORD + " 2"}), 200)


async def test_slow_uploads_and_slow_logins_leave_other_patients_their_pace(
        fresh_runtime: Callable[..., Awaitable[Runtime]]) -> None:
    """Uploads that stall mid-body, more than the pool holds, and bad logins with real argon2
    costs, all at once: nothing is checked out while the uploads wait, and other patients'
    reads and writes answer at their usual pace; then the uploads finish and read back
    intact."""
    rt = await fresh_runtime(db_pool_size=2, argon2_memory_kib=65536, argon2_time_cost=2)
    uploaders = [await signed_in(rt, "patient") for _ in range(UPLOADS)]  # two each at most
    others = [await signed_in(rt, "patient") for _ in range(3)]
    data = file_of("application/pdf", 300_000, seed=7)
    kind, head, rest = split_upload(data)
    gate = Gate()

    async with client_for(rt) as client:
        async def pace() -> list[float]:
            took = []
            for other in others:
                took.append(await timed(client.get(f"{API}/me", headers=other.headers), 200))
                took.append(await timed(client.put(f"{API}/me/consents", headers=other.headers,
                                                   json=CONSENTS), 200))
            return took

        before = await pace()
        uploads = [asyncio.create_task(client.post(
            f"{API}/patients/{uploader.id}/attachments", content=gate.body(head, rest),
            headers={"Content-Type": kind, **uploader.headers})) for uploader in uploaders]
        deadline = time.monotonic() + 20
        while gate.waiting < UPLOADS and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert gate.waiting == UPLOADS
        assert checked_out(rt) == 0, "a stalled upload holds a pooled connection"

        logins = [asyncio.create_task(client.post(f"{API}/auth/login", json={
            "email": new_email("guess"), "password": "guess " + PASSWORD}))
            for _ in range(BAD_LOGINS)]
        during = await pace()
        for login in logins:
            expect(await login, 401, "invalid_credentials")
        assert max(during) < PACE_LIMIT, (before, during)

        gate.opened.set()
        created = [expect(await task, 201) for task in uploads]
        assert {row["size"] for row in created} == {len(data)}
        back = await client.get(f"{API}/attachments/{created[0]['id']}",
                                headers=uploaders[0].headers)
        assert back.status_code == 200 and back.content == data


async def test_an_upload_that_stops_halfway_leaves_nothing(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    """A body that ends halfway: no key, row or segment is stored (the write is one short
    transaction after the whole body)."""
    patient = await signed_in(runtime, "patient")
    kind, head, _rest = split_upload(file_of("application/pdf", 300_000, seed=8))

    async def halfway() -> AsyncIterator[bytes]:
        yield head

    expect(await client.post(f"{API}/patients/{patient.id}/attachments", content=halfway(),
                             headers={"Content-Type": kind, **patient.headers}),
           422, "invalid_request")
    listed = expect(await client.get(f"{API}/patients/{patient.id}/attachments",
                                     headers=patient.headers), 200)
    assert listed == []
    assert await stored_count(runtime, patient.id) == (0, 0)


async def test_an_upload_after_care_ended_midway_is_refused(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    """Access is checked again when the body is in: a doctor whose access ended while the body
    arrived stores nothing."""
    patient = await signed_in(runtime, "patient")
    doctor = await signed_in(runtime, "doctor", full_name="Dr Upload")
    await set_consent(client, patient, True)
    consultation = await book(client, patient, doctor)
    gate, task = await stalled_upload(client, doctor, patient.id)
    await set_status(client, patient, consultation["id"], "cancelled")
    gate.opened.set()
    expect(await task, 403)
    assert await stored_count(runtime, uuid.UUID(str(patient.id))) == (0, 0)


async def test_a_trickled_json_body_holds_no_connection(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    """A JSON body is read whole before the unit of work touches the database."""
    patient = await signed_in(runtime, "patient")
    gate = Gate()
    whole = json.dumps(CONSENTS).encode()
    task = asyncio.create_task(client.put(
        f"{API}/me/consents", content=gate.body(whole[:10], whole[10:]),
        headers={"Content-Type": "application/json", **patient.headers}))
    while gate.waiting < 1:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert checked_out(runtime) == 0
    gate.opened.set()
    assert expect(await task, 200)["analytics"] is True


async def test_a_download_holds_no_connection_between_pieces(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    """A slow reader of a download: each batch of segments is read in a short session of its
    own, so between two pieces of the body nothing is checked out."""
    patient = await signed_in(runtime, "patient")
    data = file_of("application/pdf", 3 * 1024 * 1024, seed=10)
    kind, head, rest = split_upload(data)
    created = expect(await client.post(f"{API}/patients/{patient.id}/attachments",
                                       content=head + rest,
                                       headers={"Content-Type": kind, **patient.headers}), 201)
    claims = runtime.authenticator.tokens.verify(patient.access_token)
    async with runtime.unit_of_work() as session:
        served = await attachments.download(
            session, runtime.sessions, runtime.envelope, claims, uuid.UUID(created["id"]),
            care_days=runtime.settings.care_relationship_days)
    pieces = []
    async for piece in served.body:
        assert checked_out(runtime) == 0
        pieces.append(piece)
    assert len(pieces) > 2 and b"".join(pieces) == data


# The second phase reads the caller's account and session again (an outside review of the first
# version of the fix stored uploads for accounts erased, disabled or signed out meanwhile).

async def stalled_upload(client: httpx.AsyncClient, uploader: TestUser, patient_id: object,
                         filename: str = "scan.pdf") -> tuple[Gate, asyncio.Task[httpx.Response]]:
    kind, head, rest = split_upload(file_of("application/pdf", 5000, seed=21), filename)
    gate = Gate()
    task = asyncio.create_task(client.post(
        f"{API}/patients/{patient_id}/attachments", content=gate.body(head, rest),
        headers={"Content-Type": kind, **uploader.headers}))
    while gate.waiting < 1:
        await asyncio.sleep(0.01)
    return gate, task


async def test_a_patient_erased_while_their_upload_arrives_keeps_no_attachment(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    """Erasure promises neutral file names: an upload landing after it would bring one back."""
    patient = await signed_in(runtime, "patient")
    gate, task = await stalled_upload(client, patient, patient.id,
                                      filename="Jane-Roe-test-result.pdf")
    expect(await client.request("DELETE", f"{API}/me", headers=patient.headers,
                                json={"password": PASSWORD}), 204)
    gate.opened.set()
    expect(await task, 401, "invalid_token")
    assert await stored_count(runtime, patient.id) == (0, 0)


@pytest.mark.parametrize("who", ["patient", "doctor"])
async def test_an_uploader_disabled_midway_stores_nothing(
        runtime: Runtime, client: httpx.AsyncClient, who: str) -> None:
    admin = await signed_in(runtime, "admin")
    patient = await signed_in(runtime, "patient")
    uploader = patient
    if who == "doctor":
        uploader = await signed_in(runtime, "doctor", full_name="Dr Gone")
        await set_consent(client, patient, True)
        await book(client, patient, uploader)
    gate, task = await stalled_upload(client, uploader, patient.id)
    expect(await client.patch(f"{API}/users/{uploader.id}", headers=admin.headers,
                              json={"status": "disabled"}), 200)
    gate.opened.set()
    expect(await task, 401, "invalid_token")
    assert await stored_count(runtime, patient.id) == (0, 0)


async def test_an_upload_on_a_session_revoked_midway_stores_nothing(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    """A stolen token: the owner changes the password (every session ends) while the thief's
    upload trickles in; the revocation is read past the session cache."""
    patient = await signed_in(runtime, "patient")
    gate, task = await stalled_upload(client, patient, patient.id)
    expect(await client.post(f"{API}/auth/password", headers=patient.headers, json={
        "current_password": PASSWORD, "new_password": PASSWORD + " new"}), 204)
    gate.opened.set()
    expect(await task, 401, "invalid_token")
    assert await stored_count(runtime, patient.id) == (0, 0)


async def test_uploads_are_gated_per_account(runtime: Runtime,
                                             client: httpx.AsyncClient) -> None:
    """Each stalled upload holds its spool: two at once per account, the third is refused at
    once (429), and another account is not affected."""
    patient, other = await signed_in(runtime, "patient"), await signed_in(runtime, "patient")
    held = [await stalled_upload(client, patient, patient.id) for _ in range(2)]
    kind, head, rest = split_upload(file_of("application/pdf", 5000, seed=22))
    third = await client.post(f"{API}/patients/{patient.id}/attachments", content=head + rest,
                              headers={"Content-Type": kind, **patient.headers})
    expect(third, 429, "rate_limited")
    assert int(third.headers["Retry-After"]) > 0
    expect(await client.post(f"{API}/patients/{other.id}/attachments", content=head + rest,
                             headers={"Content-Type": kind, **other.headers}), 201)
    for gate, task in held:
        gate.opened.set()
        expect(await task, 201)
    expect(await client.post(f"{API}/patients/{patient.id}/attachments", content=head + rest,
                             headers={"Content-Type": kind, **patient.headers}), 201)


# Logins and TOTP set-up decide on the user's row as it is after the hash, not before.

async def _enroll_secret(client: httpx.AsyncClient, user: TestUser) -> str:
    return str(expect(await client.post(f"{API}/auth/mfa/setup", headers=user.headers,
                                        json={"password": PASSWORD}), 200)["secret"])


def enable_during_the_hash(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, user: TestUser,
                           secret: str) -> None:
    during_the_next_hash(runtime, monkeypatch, lambda other: other.post(
        f"{API}/auth/mfa/enable", headers=user.headers,
        json={"code": pyotp.TOTP(secret).now()}))


async def test_a_login_racing_mfa_enable_still_needs_the_code(
        runtime: Runtime, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    patient = await signed_in(runtime, "patient")
    enable_during_the_hash(runtime, monkeypatch, patient, await _enroll_secret(client, patient))
    answer = await client.post(f"{API}/auth/login", json={"email": patient.email,
                                                          "password": PASSWORD})
    expect(answer, 401, "mfa_required")


async def test_mfa_setup_racing_enable_never_replaces_an_enabled_secret(
        runtime: Runtime, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    patient = await signed_in(runtime, "patient")
    first = await _enroll_secret(client, patient)
    enable_during_the_hash(runtime, monkeypatch, patient, first)
    second = await client.post(f"{API}/auth/mfa/setup", headers=patient.headers,
                               json={"password": PASSWORD})
    assert second.status_code in (401, 409), second.text  # the enable ended this session
    async with runtime.sessions() as session:
        user = await session.get(User, patient.id)
        assert user is not None and user.totp_enabled
        cipher = await row_cipher(session, runtime.envelope, "users", user.id, user.data_key_id)
        assert cipher.open("totp_secret", user.totp_secret or b"") == first


async def test_readyz_does_not_queue_behind_a_writer(runtime: Runtime,
                                                    client: httpx.AsyncClient) -> None:
    """On SQLite a writer at work (a long upload's store) must not make the instance look
    down: `/readyz` reads without the write lock."""
    async with runtime.engine.connect() as writer:
        await writer.execute(text("SELECT 1"))  # on SQLite: BEGIN IMMEDIATE, the write lock
        started = time.monotonic()
        answer = await asyncio.wait_for(client.get("/readyz"), timeout=10)
        took = time.monotonic() - started
        await writer.rollback()
    assert answer.status_code == 200 and took < 1.0, (answer.status_code, took)


async def test_a_client_that_leaves_midway_is_no_server_error(
        runtime: Runtime, client: httpx.AsyncClient, captured_logs: io.StringIO) -> None:
    """A dropped upload is the client's doing: logged as 499 at info level, not as an
    `unhandled_error`, and nothing is stored."""
    patient = await signed_in(runtime, "patient")
    kind, head, _rest = split_upload(file_of("application/pdf", 5000, seed=23))
    app = create_app(runtime=runtime)
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": head, "more_body": True},
                {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"host", b"testserver"), (b"content-type", kind.encode()),
               (b"authorization", patient.headers["Authorization"].encode())]
    path = f"{API}/patients/{patient.id}/attachments"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "https", "path": path,
             "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": headers, "client": ("203.0.113.9", 50000),
             "server": ("testserver", 443), "state": {}}
    await app(scope, receive, send)  # type: ignore[arg-type]
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    assert not [line for line in lines if line["event"] == "unhandled_error"]
    assert [line["status"] for line in lines if line["event"] == "request"] == [499]
    assert not [m for m in sent if m["type"] == "http.response.start"
                and m["status"] >= 500]
    assert await stored_count(runtime, patient.id) == (0, 0)
