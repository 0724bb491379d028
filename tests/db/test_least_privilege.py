"""Least privilege on PostgreSQL (SPEC §8): after `deploy/postgres-roles.sql`, the runtime role
may only append to the audit trail and may run no DDL, and the app still works as that role.

The database is migrated by an owner role that is not a superuser, the shipped file is run
through psql exactly as an operator runs it, and every refusal is proven by PostgreSQL's own
answer. Roles are cluster-wide, so each run makes roles of its own and drops them at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from sqlalchemy import URL, func, make_url, select

from phivault.audit import service as audit_service
from phivault.audit.actions import Action
from phivault.audit.models import AuditEvent, QueuedEvent
from phivault.db.migrate import upgrade
from phivault.runtime import Runtime
from tests.conftest import Backend, build_settings, client_for, pg_base_url
from tests.factories import PASSWORD, new_email
from tests.helpers import ROOT, cli_env, run_cli

ROLES_SQL = ROOT / "deploy" / "postgres-roles.sql"
INSUFFICIENT_PRIVILEGE = "42501"


@dataclass
class Deployment:
    """A database migrated by `owner`, with `app` set up by the shipped roles file."""

    database: str
    owner: str
    app: str
    app_password: str

    def url(self, user: str, password: str | None = None, *, driver: str = "postgresql") -> str:
        base: URL = make_url(pg_base_url())
        url = base.set(drivername=driver, username=user, password=password,
                       database=self.database)
        return url.render_as_string(hide_password=False)

    @property
    def app_url(self) -> str:
        """The runtime role's URL, as PHIVAULT_DATABASE_URL names it."""
        return self.url(self.app, self.app_password, driver="postgresql+asyncpg")


def _admin_url(database: str | None = None) -> str:
    url = make_url(pg_base_url()).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


async def _admin(sql: str, database: str | None = None) -> None:
    """Run `sql` as the test server's administrator (a superuser)."""
    connection = await asyncpg.connect(_admin_url(database), timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def _psql() -> str:
    psql = shutil.which("psql")
    if psql is None:
        message = "psql is not installed: the roles file is a psql script"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)
    return psql


def run_roles_file(url: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """Run the shipped file as an operator does: psql, no psqlrc, stop on the first error."""
    command = [_psql(), "-X", "-d", url, "-f", str(ROLES_SQL)]
    for name, value in variables.items():
        command += ["-v", f"{name}={value}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
async def deployment(backend: Backend, keys_env: dict[str, str]) -> AsyncIterator[Deployment]:
    if backend.name != "postgres":
        pytest.skip("roles and privileges are PostgreSQL's; SQLite has neither")
    _psql()
    suffix = f"{os.getpid()}_{secrets.token_hex(4)}"
    deployed = Deployment(database=f"phivault_lp_{suffix}", owner=f"phivault_lp_owner_{suffix}",
                          app=f"phivault_lp_app_{suffix}", app_password=secrets.token_hex(16))
    # The owner logs in and owns its database; it is no superuser and cannot create roles.
    await _admin(f'CREATE ROLE "{deployed.owner}" LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB')
    try:
        await _admin(f'CREATE DATABASE "{deployed.database}" OWNER "{deployed.owner}"')
        owner_runtime = Runtime.from_settings(
            build_settings(keys_env, deployed.url(deployed.owner, driver="postgresql+asyncpg")))
        try:
            await upgrade(owner_runtime.engine)
        finally:
            await owner_runtime.close()
        # First run: by the administrator, who creates the runtime role and its password and
        # makes the grants as the owner.
        first = run_roles_file(_admin_url(deployed.database), owner_role=deployed.owner,
                               app_role=deployed.app, app_password=deployed.app_password)
        assert first.returncode == 0, first.stderr
        yield deployed
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{deployed.database}" WITH (FORCE)')
        await _admin(f'DROP ROLE IF EXISTS "{deployed.app}"')
        await _admin(f'DROP ROLE IF EXISTS "{deployed.owner}"')


async def _connect_as_app(deployed: Deployment) -> asyncpg.Connection:
    return await asyncpg.connect(deployed.url(deployed.app, deployed.app_password), timeout=5)


async def test_roles_file_reruns_as_the_owner_after_each_migrate(
        deployment: Deployment) -> None:
    """The owner (no CREATEROLE) re-runs the file after a migrate; it is idempotent."""
    for _ in range(2):
        rerun = run_roles_file(deployment.url(deployment.owner), app_role=deployment.app)
        assert rerun.returncode == 0, rerun.stderr
        assert "holds least privilege" in rerun.stdout


# An event queued by the runtime role itself, never chained.
ENQUEUE_AND_DELETE = (
    "INSERT INTO audit_queue (event_id, at, action, outcome, metadata, mac) VALUES "
    "('00000000-0000-4000-8000-00000005ec0d', now(), 'VIEW_PROFILE', 'success', '{}', "
    "'\\x00'::bytea); "
    "DELETE FROM audit_queue WHERE event_id = '00000000-0000-4000-8000-00000005ec0d'")

# (case, statement as the runtime role, what PostgreSQL answers). Every refusal is SQLSTATE
# 42501; the message tells a missing privilege from a trigger's refusal.
REFUSALS = [
    ("update_audit_events", "UPDATE audit_events SET action = 'LOGOUT'",
     "permission denied for table audit_events"),
    ("delete_audit_events", "DELETE FROM audit_events",
     "permission denied for table audit_events"),
    ("truncate_audit_events", "TRUNCATE audit_events",
     "permission denied for table audit_events"),
    ("delete_audit_head", "DELETE FROM audit_head", "permission denied for table audit_head"),
    ("truncate_audit_head", "TRUNCATE audit_head", "permission denied for table audit_head"),
    ("insert_audit_head", "INSERT INTO audit_head VALUES (2, 0, '\\x00'::bytea)",
     "permission denied for table audit_head"),
    # The runtime role may DELETE from the queue (the sequencer does), so it is the trigger
    # that refuses an event not yet chained; the INSERT before it is allowed.
    ("delete_unchained_queued_event", ENQUEUE_AND_DELETE,
     "an event not yet chained cannot be deleted"),
    ("update_audit_queue", "UPDATE audit_queue SET action = 'LOGOUT'",
     "permission denied for table audit_queue"),
    ("truncate_audit_queue", "TRUNCATE audit_queue", "permission denied for table audit_queue"),
    ("setval_queue_sequence", "SELECT setval(pg_get_serial_sequence('audit_queue', 'id'), 1)",
     "permission denied for sequence"),
    ("truncate_application_table", "TRUNCATE users", "permission denied for table users"),
    # A patient's end of a doctor's care relationship (SPEC §7) is append-only.
    ("delete_care_ending", "DELETE FROM care_endings", "permission denied for table care_endings"),
    ("update_care_ending", "UPDATE care_endings SET ended_at = now()",
     "permission denied for table care_endings"),
    ("create_table", "CREATE TABLE intruder (id int)", "permission denied for schema"),
    # A temporary table is searched first: named audit_events, it would satisfy the queue
    # trigger's unqualified lookup and let an unchained event be deleted.
    ("shadow_audit_events_with_temp_table", "CREATE TEMP TABLE audit_events (event_id uuid)",
     "permission denied to create temporary tables"),
    ("create_schema", "CREATE SCHEMA intruder", "permission denied for database"),
    ("disable_append_only_trigger",
     "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete",
     "must be owner of table audit_events"),
    ("disable_all_triggers", "ALTER TABLE audit_events DISABLE TRIGGER ALL",
     "must be owner of table audit_events"),
    ("drop_append_only_trigger", "DROP TRIGGER audit_events_no_update_delete ON audit_events",
     "must be owner of relation audit_events"),
    ("drop_queue_trigger", "DROP TRIGGER audit_queue_chained_only ON audit_queue",
     "must be owner of relation audit_queue"),
    ("drop_table", "DROP TABLE audit_events", "must be owner of table audit_events"),
    ("alter_owner", "ALTER TABLE audit_queue OWNER TO CURRENT_USER",
     "must be owner of table audit_queue"),
    ("drop_trigger_function", "DROP FUNCTION phivault_audit_queue_chained_only()",
     "must be owner of function"),
    ("replace_trigger_function",
     "CREATE OR REPLACE FUNCTION phivault_audit_append_only() RETURNS trigger "
     "LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'", "permission denied for schema"),
    ("replication_role_skips_triggers", "SET session_replication_role = replica",
     'permission denied to set parameter "session_replication_role"'),
    ("become_the_owner", "SET ROLE {owner}", "permission denied to set role"),
]


@pytest.mark.parametrize(("statement", "answer"), [case[1:] for case in REFUSALS],
                         ids=[case[0] for case in REFUSALS])
async def test_runtime_role_is_refused(deployment: Deployment, statement: str,
                                       answer: str) -> None:
    connection = await _connect_as_app(deployment)
    try:
        with pytest.raises(asyncpg.PostgresError) as refused:
            async with connection.transaction():
                await connection.execute(statement.replace("{owner}", f'"{deployment.owner}"'))
    finally:
        await connection.close()
    assert refused.value.sqlstate == INSUFFICIENT_PRIVILEGE, refused.value
    assert answer in str(refused.value)


async def test_runtime_role_owns_nothing_and_holds_no_power(deployment: Deployment) -> None:
    connection = await _connect_as_app(deployment)
    try:
        role = await connection.fetchrow(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, "
            "rolcanlogin FROM pg_roles WHERE rolname = current_user")
        assert role is not None and dict(role) == {
            "rolsuper": False, "rolcreaterole": False, "rolcreatedb": False,
            "rolreplication": False, "rolbypassrls": False, "rolcanlogin": True}
        owned = await connection.fetchval(
            "SELECT count(*) FROM pg_class WHERE relowner = current_user::regrole")
        assert owned == 0
        memberships = await connection.fetchval(
            "SELECT count(*) FROM pg_auth_members WHERE member = current_user::regrole")
        assert memberships == 0
    finally:
        await connection.close()


async def test_runtime_role_serves_requests_and_chains_their_events(
        deployment: Deployment, keys_env: dict[str, str]) -> None:
    """The real app, built on the runtime role's URL: register, log in, read /me; the
    sequencer (as that role) chains the events; `phivault audit verify` holds."""
    rt = Runtime.from_settings(build_settings(keys_env, deployment.app_url))
    try:
        assert rt.settings.database_url_value == deployment.app_url
        email = new_email("pat")
        async with client_for(rt) as client:
            registered = await client.post("/api/v1/auth/register", json={
                "email": email, "password": PASSWORD, "full_name": "Jane Roe"})
            assert registered.status_code == 201, registered.text
            login = await client.post("/api/v1/auth/login",
                                      json={"email": email, "password": PASSWORD})
            assert login.status_code == 200, login.text
            me = await client.get("/api/v1/me", headers={
                "Authorization": f"Bearer {login.json()['access_token']}"})
            assert me.status_code == 200, me.text

        async with rt.sessions() as session:
            queued = await session.scalar(select(func.count()).select_from(QueuedEvent))
        assert queued
        # The background loop's path (try-lock) and the readers' path (wait for the lock).
        assert await rt.sequencer.sequence_batch() == queued
        await rt.sequencer.drain()
        async with rt.sessions() as session:
            assert await session.scalar(select(func.count()).select_from(QueuedEvent)) == 0
            actions = set((await session.scalars(select(AuditEvent.action))).all())
        assert Action.LOGIN_SUCCESS in actions

        result = await audit_service.verify_snapshot(rt.sessions, rt.audit_key, rt.sequencer,
                                                     rt.queue_key)
        assert result.ok and result.events == queued
    finally:
        await rt.close()

    # The CLI, as the runtime role, verifies and chains its own VERIFY_AUDIT_CHAIN event.
    verified = run_cli("audit", "verify", "--json", env=cli_env(rt))
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout) == {"ok": True, "events": queued, "first_bad_seq": None,
                                   "queue_tampered": [], "queue_stale": 0}
    again = run_cli("audit", "verify", "--json", env=cli_env(rt))
    assert json.loads(again.stdout) == {"ok": True, "events": queued + 1, "first_bad_seq": None,
                                   "queue_tampered": [], "queue_stale": 0}


async def test_tables_added_by_later_migrations_get_plain_dml_only(
        deployment: Deployment) -> None:
    """Default privileges: a table (and its sequence) the owner creates later is usable at once,
    with no TRUNCATE; re-running the file after the migration is what revokes more."""
    owner = await asyncpg.connect(deployment.url(deployment.owner), timeout=5)
    try:
        await owner.execute("CREATE TABLE later_feature (id bigserial PRIMARY KEY, note text)")
        app = await _connect_as_app(deployment)
        try:
            note_id = await app.fetchval(
                "INSERT INTO later_feature (note) VALUES ('a') RETURNING id")
            await app.execute("UPDATE later_feature SET note = 'b' WHERE id = $1", note_id)
            assert await app.fetchval("DELETE FROM later_feature RETURNING id") == note_id
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute("TRUNCATE later_feature")
        finally:
            await app.close()
    finally:
        await owner.execute("DROP TABLE IF EXISTS later_feature")
        await owner.close()


async def test_roles_file_repairs_grants_to_public(deployment: Deployment) -> None:
    """A privilege granted to PUBLIC reaches every role; the re-run takes it back."""
    await _admin("GRANT DELETE, TRUNCATE ON audit_events TO PUBLIC", deployment.database)
    rerun = run_roles_file(deployment.url(deployment.owner), app_role=deployment.app)
    assert rerun.returncode == 0, rerun.stderr
    connection = await _connect_as_app(deployment)
    try:
        for privilege in ("DELETE", "TRUNCATE"):
            assert not await connection.fetchval(
                "SELECT has_table_privilege('audit_events', $1)", privilege)
    finally:
        await connection.close()


async def test_roles_file_refuses_a_runtime_role_with_the_owners_powers(
        deployment: Deployment) -> None:
    """A membership of the owner role would hand the runtime role every DDL right: the file
    fails and says so rather than report least privilege."""
    await _admin(f'GRANT "{deployment.owner}" TO "{deployment.app}"')
    try:
        refused = run_roles_file(deployment.url(deployment.owner), app_role=deployment.app)
    finally:
        await _admin(f'REVOKE "{deployment.owner}" FROM "{deployment.app}"')
    assert refused.returncode != 0
    assert f"is a member of {deployment.owner}" in refused.stderr
    assert "holds least privilege" not in refused.stdout
