"""`phivault audit checkpoint` and `audit verify --checkpoint` as an operator runs them, the
checkpoint key's generation, and `init --dev` making one."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.crypto.keys import KeyKind, generate_key_line, is_dev_key, parse_keyed_line
from phivault.runtime import Runtime
from tests.audit.factories import tamper, write_chain
from tests.helpers import cli_env, run_cli


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
    env.update(extra)
    return env


@pytest.fixture
async def instance(fresh_runtime: Callable[..., Any], tmp_path: Path
                   ) -> tuple[Runtime, dict[str, str], Path]:
    """A chain of 20 events, and a checkpoint file of its head made by the CLI."""
    key = generate_key_line(KeyKind.AUDIT_SIGNING)
    rt: Runtime = await fresh_runtime(audit_signing_key=key)
    await write_chain(rt, 20)
    env = cli_env(rt, PHIVAULT_AUDIT_SIGNING_KEY=key)
    path = tmp_path / "checkpoint.json"
    made = run_cli("audit", "checkpoint", "--out", str(path), env=env)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == f"checkpoint of the head at seq 20 written to {path}"
    return rt, env, path


@pytest.mark.parametrize("args", [["audit", "checkpoint"], ["audit", "verify"]])
def test_help(args: list[str]) -> None:
    result = run_cli(*args, "--help", env=_env())
    assert result.returncode == 0 and "Usage:" in result.stdout
    assert "checkpoint" in result.stdout


async def test_checkpoint_then_verify_from_it(
        instance: tuple[Runtime, dict[str, str], Path]) -> None:
    rt, env, path = instance
    checkpoint = json.loads(path.read_text())
    assert set(checkpoint) == {"seq", "hash", "at", "key_id", "signature"}
    assert checkpoint["seq"] == 20 and re.fullmatch(r"[0-9a-f]{64}", checkpoint["hash"])
    printed = run_cli("audit", "checkpoint", env=env)
    assert printed.returncode == 0, printed.stderr
    # The first checkpoint's own event (AUDIT_CHECKPOINT) is in the chain now.
    assert json.loads(printed.stdout)["seq"] == 21
    async with rt.sessions() as session:
        actions = (await session.execute(select(AuditEvent.action, AuditEvent.resource_id)
                                         .where(AuditEvent.seq == 21))).one()
    assert tuple(actions) == ("AUDIT_CHECKPOINT", "20")

    good = run_cli("audit", "verify", "--checkpoint", str(path), "--json", env=env)
    assert good.returncode == 0, good.stderr
    # After seq 20: the two AUDIT_CHECKPOINT events (21, 22).
    assert json.loads(good.stdout) == {"ok": True, "events": 2, "first_bad_seq": None,
                                   "queue_tampered": [], "queue_stale": 0}
    human = run_cli("audit", "verify", "--checkpoint", str(path), env=env)
    assert human.returncode == 0
    # ... and the VERIFY_AUDIT_CHAIN event of the run before.
    assert human.stdout.strip() == ("checkpoint at seq 20 holds; audit chain holds: 3 events "
                                    "after the checkpoint at seq 20")


@pytest.mark.tampers
async def test_a_broken_chain_gets_no_checkpoint(
        instance: tuple[Runtime, dict[str, str], Path], tmp_path: Path) -> None:
    rt, env, path = instance
    later = tmp_path / "later.json"
    made = run_cli("audit", "checkpoint", "--after", str(path), "--out", str(later), env=env)
    assert made.returncode == 0, made.stderr
    assert json.loads(later.read_text())["seq"] == 21  # the first checkpoint's event
    await tamper(rt, "UPDATE audit_events SET ip = '198.51.100.9' WHERE seq = 7")
    refused = run_cli("audit", "checkpoint", env=env)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == ("phivault: audit chain BROKEN at seq 7: no checkpoint signed "
                              "(run `phivault audit verify` for the details)\n")
    # With --after, only what follows the previous checkpoint is verified: seq 7 is before it.
    assert run_cli("audit", "checkpoint", "--after", str(later), env=env).returncode == 0
    async with rt.sessions() as session:
        outcomes = (await session.execute(
            select(AuditEvent.outcome).where(AuditEvent.action == "AUDIT_CHECKPOINT")
            .order_by(AuditEvent.seq))).scalars().all()
    assert outcomes == ["success", "success", "error", "success"]


@pytest.mark.tampers
async def test_a_truncated_tail_fails_against_the_checkpoint(
        instance: tuple[Runtime, dict[str, str], Path]) -> None:
    rt, env, path = instance
    async with rt.sessions() as session:
        hash_15 = (await session.execute(
            select(AuditEvent.hash).where(AuditEvent.seq == 15))).scalar_one()
    await tamper(rt, "DELETE FROM audit_events WHERE seq > 15")
    await tamper(rt, "UPDATE audit_head SET seq = 15, hash = :hash", hash=hash_15)
    whole = run_cli("audit", "verify", "--json", env=env)
    assert whole.returncode == 0  # truncation is invisible to the chain alone
    # That verification's own event is now seq 16; seq 17 up to the checkpoint's 20 are gone.
    from_checkpoint = run_cli("audit", "verify", "--checkpoint", str(path), "--json", env=env)
    assert from_checkpoint.returncode == 1
    assert json.loads(from_checkpoint.stdout)["first_bad_seq"] == 17
    human = run_cli("audit", "verify", "--checkpoint", str(path), env=env)
    assert human.returncode == 1  # (and the run before added seq 17)
    assert human.stdout == ("audit chain BROKEN at seq 18 (0 events read after the checkpoint "
                            "at seq 20)\n")


async def test_an_edited_checkpoint_exits_1_with_one_line(
        instance: tuple[Runtime, dict[str, str], Path], tmp_path: Path) -> None:
    _rt, env, path = instance
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({**json.loads(path.read_text()), "seq": 19}))
    result = run_cli("audit", "verify", "--checkpoint", str(edited), env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"phivault: checkpoint {edited}: the signature does not verify"]

    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    result = run_cli("audit", "verify", "--checkpoint", str(garbage), env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"phivault: checkpoint {garbage}: not JSON"]


async def test_a_checkpoint_of_another_key_exits_1(
        instance: tuple[Runtime, dict[str, str], Path]) -> None:
    _rt, env, path = instance
    other = {**env, "PHIVAULT_AUDIT_SIGNING_KEY": generate_key_line(KeyKind.AUDIT_SIGNING)}
    result = run_cli("audit", "verify", "--checkpoint", str(path), env=other)
    assert result.returncode == 1
    kid = json.loads(path.read_text())["key_id"]
    assert result.stderr.splitlines() == [
        f"phivault: checkpoint {path}: key id {kid!r} is not in PHIVAULT_AUDIT_SIGNING_KEY"]


async def test_without_the_key_both_commands_exit_2(
        instance: tuple[Runtime, dict[str, str], Path]) -> None:
    _rt, env, path = instance
    del env["PHIVAULT_AUDIT_SIGNING_KEY"]
    for args in (["audit", "checkpoint"], ["audit", "verify", "--checkpoint", str(path)]):
        result = run_cli(*args, env=env)
        assert result.returncode == 2, args
        (line,) = result.stderr.splitlines()
        assert line.startswith("phivault: PHIVAULT_AUDIT_SIGNING_KEY: is required")
    assert run_cli("audit", "verify", env=env).returncode == 0  # a plain verify needs none


def test_keys_generate_audit_signing() -> None:
    result = run_cli("keys", "generate", "--kind", "audit-signing", env=_env())
    assert result.returncode == 0
    key_id, seed = parse_keyed_line(result.stdout.strip())
    assert key_id.startswith("ck-") and len(seed) == 32 and not is_dev_key(seed)


def test_init_dev_makes_a_checkpoint_key_and_adds_one_to_an_older_instance(
        tmp_path: Path) -> None:
    first = run_cli("init", "--dev", env=_env(), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    env_file = tmp_path / "var" / "phivault.env"
    lines = env_file.read_text().splitlines()
    (signing,) = [line for line in lines if line.startswith("PHIVAULT_AUDIT_SIGNING_KEY=")]
    key_id, seed = parse_keyed_line(signing.split("=", 1)[1])
    assert key_id.startswith("dev-ck-") and is_dev_key(seed)

    # An instance made before checkpoints: its file gains the line, and nothing else changes.
    older = [line for line in lines if not line.startswith("PHIVAULT_AUDIT_SIGNING_KEY=")]
    env_file.write_text("\n".join(older) + "\n")
    second = run_cli("init", "--dev", env=_env(), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    now = env_file.read_text().splitlines()
    assert now[:-1] == older and now[-1].startswith("PHIVAULT_AUDIT_SIGNING_KEY=dev-ck-")
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    third = run_cli("init", "--dev", env=_env(), cwd=tmp_path)
    assert third.returncode == 0 and env_file.read_text().splitlines() == now

    values = dict(line.split("=", 1) for line in now if line.startswith("PHIVAULT_"))
    made = run_cli("audit", "checkpoint", env=_env(**values), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["key_id"] == now[-1].split("=", 1)[1].split(":")[0]
