"""`phivault users create|list|disable|import` against a real database."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt

from phivault.runtime import Runtime
from tests.conftest import client_for
from tests.factories import PASSWORD, new_email
from tests.helpers import cli_env, run_cli

LOGIN = "/api/v1/auth/login"


async def test_create_the_first_admin_and_log_in(fresh_runtime: Callable[..., Any]) -> None:
    rt: Runtime = await fresh_runtime()
    env = cli_env(rt)
    email = new_email("admin")
    created = run_cli("users", "create", email, "--role", "admin", "--full-name", "Ada Admin",
                      "--password-stdin", env=env, stdin=PASSWORD + "\n")
    assert created.returncode == 0, created.stderr
    user_id = uuid.UUID(created.stdout.strip())
    assert PASSWORD not in created.stdout + created.stderr
    async with client_for(rt) as c:
        login = await c.post(LOGIN, json={"email": email, "password": PASSWORD})
        assert login.status_code == 200
        me = await c.get("/api/v1/me", headers={
            "Authorization": f"Bearer {login.json()['access_token']}"})
    assert me.json()["id"] == str(user_id) and me.json()["role"] == "admin"

    taken = run_cli("users", "create", email, "--role", "admin", "--full-name", "Again",
                    "--password-stdin", env=env, stdin=PASSWORD)
    assert taken.returncode == 1 and taken.stderr.startswith("phivault: An account with")
    weak = run_cli("users", "create", new_email(), "--role", "doctor", "--full-name", "D",
                   "--password-stdin", env=env, stdin="short")
    assert weak.returncode == 1 and "at least 15" in weak.stderr
    no_stdin = run_cli("users", "create", new_email(), "--role", "doctor", "--full-name", "D",
                       env=env)
    assert no_stdin.returncode == 2


async def test_list_and_disable(fresh_runtime: Callable[..., Any]) -> None:
    rt: Runtime = await fresh_runtime()
    env = cli_env(rt)
    email = new_email("doc")
    user_id = run_cli("users", "create", email, "--role", "doctor", "--full-name", "Dr D",
                      "--specialty", "Cardiology", "--password-stdin", env=env,
                      stdin=PASSWORD).stdout.strip()
    async with client_for(rt) as c:
        pair = (await c.post(LOGIN, json={"email": email, "password": PASSWORD})).json()
    listed = run_cli("users", "list", "--json", env=env)
    assert listed.returncode == 0
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["id"], r["email"], r["role"], r["status"]) for r in rows] == [
        (user_id, email, "doctor", "active")]
    disabled = run_cli("users", "disable", user_id, env=env)
    assert disabled.returncode == 0
    async with client_for(rt) as c:
        me = await c.get("/api/v1/me", headers={
            "Authorization": f"Bearer {pair['access_token']}"})
        assert me.status_code == 401
        assert (await c.post(LOGIN, json={"email": email,
                                          "password": PASSWORD})).status_code == 401
    assert run_cli("users", "disable", str(uuid.uuid4()), env=env).returncode == 1
    assert "disabled" in run_cli("users", "list", env=env).stdout


async def test_import_bcrypt_users(fresh_runtime: Callable[..., Any], tmp_path: Path) -> None:
    rt: Runtime = await fresh_runtime()
    env = cli_env(rt)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    long_password = "é" * 40 + " a long legacy passphrase"  # over bcrypt's 72 bytes
    long_hash = bcrypt.hashpw(long_password.encode()[:72], bcrypt.gensalt(rounds=4)).decode()
    doctor, patient, long_user = new_email("doc"), new_email("pat"), new_email("long")
    lines = [
        {"email": doctor, "role": "doctor", "full_name": "Dr Imported", "password_hash": hashed},
        {"email": patient, "role": "patient", "full_name": "Pat Imported",
         "password_hash": hashed},
        {"email": long_user, "role": "auditor", "full_name": "Long", "password_hash": long_hash},
        {"email": doctor, "role": "doctor", "full_name": "Duplicate", "password_hash": hashed},
        {"email": new_email(), "role": "doctor", "full_name": "Plain", "password_hash": "x"},
        {"email": new_email(), "role": "wizard", "full_name": "W", "password_hash": hashed},
        {"email": new_email(), "role": "doctor", "full_name": "Extra", "password_hash": hashed,
         "is_admin": True},
    ]
    path = tmp_path / "users.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n\n")
    result = run_cli("users", "import", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported 3, skipped 5"
    assert "line 4: email already registered" in result.stderr
    assert hashed not in result.stderr and doctor not in result.stderr
    async with client_for(rt) as c:
        for email, password in ((doctor, PASSWORD), (patient, PASSWORD),
                                (long_user, long_password)):
            response = await c.post(LOGIN, json={"email": email, "password": password})
            assert response.status_code == 200, email
            again = await c.post(LOGIN, json={"email": email, "password": password})
            assert again.status_code == 200  # now against the argon2id re-hash
    missing = run_cli("users", "import", str(tmp_path / "nope.jsonl"), env=env)
    assert missing.returncode == 2
