"""The `phivault` command as an operator runs it: help, one-line failures, init, keys, verify."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from phivault.audit import service
from phivault.audit.actions import Action
from phivault.crypto.keys import is_dev_key
from tests.conftest import KEY_VARIABLES, generate_keys
from tests.helpers import cli_env, run_cli

COMMANDS = [[], ["init"], ["migrate"], ["serve"], ["keys"], ["keys", "generate"],
            ["keys", "status"], ["keys", "rewrap"], ["audit"], ["audit", "verify"], ["users"],
            ["users", "create"], ["users", "list"], ["users", "disable"], ["users", "import"]]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
    env.update(extra)
    return env


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "phivault")
def test_every_command_has_help(args: list[str]) -> None:
    result = run_cli(*args, "--help", env=_env())
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


@pytest.mark.parametrize("variable", KEY_VARIABLES)
def test_missing_key_exits_2_with_one_line(variable: str, tmp_path: Path) -> None:
    keys = generate_keys()
    del keys[variable]
    result = run_cli("migrate", env=_env(**keys), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"phivault: {variable}: is required but not set"]
    assert "Traceback" not in result.stderr + result.stdout


def test_malformed_key_exits_2_without_echoing_it(tmp_path: Path) -> None:
    keys = generate_keys()
    keys["PHIVAULT_AUDIT_KEY"] = "dGhpcy1pcy1ub3QtMzItYnl0ZXM"
    result = run_cli("keys", "status", env=_env(**keys), cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("phivault: PHIVAULT_AUDIT_KEY: must decode to 32 bytes")
    assert keys["PHIVAULT_AUDIT_KEY"] not in line


@pytest.mark.parametrize("kind, pattern", [
    ("master", r"^[A-Za-z0-9_.-]{1,64}:[A-Za-z0-9_-]{43}$"),
    ("jwt", r"^[A-Za-z0-9_.-]{1,64}:[A-Za-z0-9_-]{43}$"),
    ("index", r"^[A-Za-z0-9_-]{43}$"),
    ("audit", r"^[A-Za-z0-9_-]{43}$"),
])
def test_keys_generate_forms(kind: str, pattern: str) -> None:
    lines = set()
    for _ in range(2):
        result = run_cli("keys", "generate", "--kind", kind, env=_env())
        assert result.returncode == 0
        line = result.stdout.strip()
        assert re.match(pattern, line), line
        raw = base64.urlsafe_b64decode(line.split(":")[-1] + "=")
        assert len(raw) == 32 and not is_dev_key(raw)
        lines.add(line)
    assert len(lines) == 2


def test_init_dev_creates_and_reuses_an_instance(tmp_path: Path) -> None:
    first = run_cli("init", "--dev", env=_env(), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "created development instance" in first.stdout
    env_file = tmp_path / "var" / "phivault.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "var" / "tls" / "key.pem").stat().st_mode) == 0o600
    assert (tmp_path / "var" / "phivault.db").exists()
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                  if line.startswith("PHIVAULT_"))
    assert set(KEY_VARIABLES) <= set(values)

    second = run_cli("init", "--dev", env=_env(), cwd=tmp_path)
    assert second.returncode == 0 and "reusing" in second.stdout
    assert "newest schema" in second.stdout
    assert dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                if line.startswith("PHIVAULT_")) == values

    prod = run_cli("migrate", env=_env(**{**values, "PHIVAULT_ENV": "prod"}), cwd=tmp_path)
    assert prod.returncode == 2
    assert prod.stderr.startswith("phivault: PHIVAULT_MASTER_KEYS: holds a key made by")


async def test_audit_verify_cli(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    async with rt.unit_of_work() as session:
        for _ in range(3):
            service.record(session, Action.VIEW_PROFILE)
    env = cli_env(rt)
    good = run_cli("audit", "verify", "--json", env=env)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout) == {"ok": True, "events": 3, "first_bad_seq": None,
                                   "queue_tampered": [], "queue_stale": 0}
    human = run_cli("audit", "verify", env=env)
    assert human.returncode == 0 and "audit chain holds: 4 events" in human.stdout

    async with rt.engine.begin() as connection:
        if rt.engine.dialect.name == "postgresql":
            await connection.execute(text("SET LOCAL session_replication_role = replica"))
        else:
            await connection.execute(text("DROP TRIGGER audit_events_no_update"))
        await connection.execute(text("UPDATE audit_events SET actor_role = 'admin' "
                                      "WHERE seq = 2"))
    bad = run_cli("audit", "verify", "--json", env=env)
    assert bad.returncode == 1
    assert json.loads(bad.stdout) == {"ok": False, "events": 5, "first_bad_seq": 2,
                                   "queue_tampered": [], "queue_stale": 0}
