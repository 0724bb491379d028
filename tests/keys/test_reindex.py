"""Index-key rotation (issue 11, item 8): `PHIVAULT_INDEX_KEY_PREVIOUS` during the move, and
`phivault keys reindex`; logins work before, during and after, and erased accounts stay
without an index."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.auth.models import User
from phivault.auth.reindex import reindex_batch
from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.privacy import erasure
from phivault.runtime import Runtime
from tests.conftest import client_for
from tests.factories import PASSWORD, make_user, new_email, sign_in
from tests.helpers import cli_env, run_cli

API = "/api/v1"


async def login(rt: Runtime, email: str) -> int:
    async with client_for(rt) as client:
        return (await client.post(f"{API}/auth/login",
                                  json={"email": email, "password": PASSWORD})).status_code


async def register(client: httpx.AsyncClient, email: str) -> httpx.Response:
    return await client.post(f"{API}/auth/register", json={
        "email": email, "password": PASSWORD, "full_name": "Rotating Patient"})


async def indexes(rt: Runtime) -> dict[Any, bytes | None]:
    async with rt.sessions() as session:
        return {row.id: row.email_index for row in
                (await session.execute(select(User.id, User.email_index))).all()}


async def test_logins_work_before_during_and_after_the_move(
        fresh_runtime: Callable[..., Any]) -> None:
    old = await fresh_runtime()
    emails = [new_email("p") for _ in range(5)]
    for email in emails:
        await make_user(old, email=email)
    erased = await make_user(old, email=new_email("gone"))
    async with old.unit_of_work() as session:
        await erasure.erase(session, old.envelope, erased.id)
    assert [await login(old, email) for email in emails] == [200] * 5  # before

    url = old.settings.database_url_value
    new_key = generate_key_line(KeyKind.INDEX)
    old_key = old.settings.index_key.get_secret_value()
    # The new key alone, before the move: the stored indexes are the old key's.
    alone = await fresh_runtime(database_url=url, index_key=new_key)
    assert await login(alone, emails[0]) == 401
    during = await fresh_runtime(database_url=url, index_key=new_key,
                                 index_key_previous=old_key)
    assert [await login(during, email) for email in emails] == [200] * 5
    async with client_for(during) as client:
        assert (await register(client, emails[1].upper())).status_code == 409  # still taken
        fresh = new_email("new")
        assert (await register(client, fresh)).status_code == 201  # under the new key

    # Part of the move (one batch of 2), then logins again: moved and unmoved alike.
    async with during.unit_of_work() as session:
        first = await reindex_batch(session, during.envelope, during.blind_index, None, 2)
    assert first.seen == 2 and first.last_id is not None
    assert [await login(during, email) for email in [*emails, fresh]] == [200] * 6

    # The rest, from the command line (the server's settings), then the new key alone.
    env = cli_env(during, PHIVAULT_INDEX_KEY=new_key, PHIVAULT_INDEX_KEY_PREVIOUS=old_key)
    done = run_cli("keys", "reindex", "--batch-size", "2", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("every email index is under the current PHIVAULT_INDEX_KEY")
    after = await fresh_runtime(database_url=url, index_key=new_key)
    assert [await login(after, email) for email in [*emails, fresh]] == [200] * 6
    assert (await indexes(after))[erased.id] is None  # an erased account got none back
    again = run_cli("keys", "reindex", env=env)
    assert again.returncode == 0 and "0 made again" in again.stdout  # idempotent
    async with after.sessions() as session:
        events = (await session.execute(select(AuditEvent.event_metadata).where(
            AuditEvent.action == "KEY_REINDEX").order_by(AuditEvent.seq))).scalars().all()
    # Six accounts have an index (the erased one none): one registered under the new key, and
    # the first batch's (two, perhaps that one among them) were moved already.
    assert first.changed in (1, 2)
    assert [(e["accounts"], e["reindexed"], e["failed"]) for e in events] == [
        (6, 5 - first.changed, 0), (6, 0, 0)]


async def test_a_rotation_keeps_one_lockout_per_account(
        fresh_runtime: Callable[..., Any]) -> None:
    """Logins and password re-checks (TOTP set-up, erasure) count failures under one key, the
    email's digest under the current index key, also before the account is reindexed: a
    stolen access token gets no guessing budget of its own (an outside review)."""
    old = await fresh_runtime()
    user = await make_user(old, email=new_email("lock"))
    during = await fresh_runtime(database_url=old.settings.database_url_value,
                                 index_key=generate_key_line(KeyKind.INDEX),
                                 index_key_previous=old.settings.index_key.get_secret_value())
    await sign_in(during, user)
    async with client_for(during) as client:
        for _ in range(6):
            await client.post(f"{API}/auth/mfa/setup", headers=user.headers,
                              json={"password": "wrong " + PASSWORD})
        answer = await client.post(f"{API}/auth/login", json={"email": user.email,
                                                               "password": PASSWORD})
    assert answer.status_code == 429, answer.text  # the same lock-out


async def test_two_accounts_under_one_email_cannot_sign_in_nor_stop_the_reindex(
        fresh_runtime: Callable[..., Any]) -> None:
    """A server run with the new key and without the previous one lets a second account take
    an email: neither then signs in (never a 500, never as the other), and `reindex` leaves
    that row, reports it and carries on with the rest."""
    old = await fresh_runtime()
    email = new_email("twice")
    await make_user(old, email=email)
    others = [await make_user(old, email=new_email("p")) for _ in range(3)]
    url, old_key = old.settings.database_url_value, old.settings.index_key.get_secret_value()
    new_key = generate_key_line(KeyKind.INDEX)
    misrun = await fresh_runtime(database_url=url, index_key=new_key)
    async with client_for(misrun) as client:
        assert (await register(client, email)).status_code == 201  # the operator's mistake
    during = await fresh_runtime(database_url=url, index_key=new_key,
                                 index_key_previous=old_key)
    assert await login(during, email) == 401
    env = cli_env(during, PHIVAULT_INDEX_KEY=new_key, PHIVAULT_INDEX_KEY_PREVIOUS=old_key)
    done = run_cli("keys", "reindex", "--batch-size", "2", env=env)
    assert done.returncode == 1 and "1 accounts share an email" in done.stderr, done.stderr
    after = await fresh_runtime(database_url=url, index_key=new_key)
    assert [await login(after, other.email) for other in others] == [200] * 3
