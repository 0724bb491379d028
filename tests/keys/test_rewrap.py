"""Master-key rotation: status counts, rewrap without touching PHI, resumable after kill -9."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, insert, select

from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.db.base import utcnow
from phivault.keys import service
from phivault.keys.models import DataKeyRow
from phivault.runtime import Runtime
from tests.helpers import cli_env, phivault_command, run_cli


async def _seal_rows(rt: Runtime, n: int) -> list[tuple[uuid.UUID, uuid.UUID, bytes]]:
    """n rows' worth of data keys, each sealing one value; returns (row, dek, ciphertext)."""
    rows = []
    async with rt.unit_of_work() as session:
        for i in range(n):
            row_id = uuid.uuid4()
            cipher = service.new_row_cipher(session, rt.envelope, "medical_records", row_id)
            rows.append((row_id, cipher.data_key_id, cipher.seal("diagnosis", f"value {i}")))
    return rows


async def _bulk_keys(rt: Runtime, n: int) -> None:
    """n data keys inserted in bulk (fast set-up for the crash test)."""
    async with rt.unit_of_work() as session:
        batch = []
        for _ in range(n):
            key = rt.envelope.new_data_key(uuid.uuid4())
            batch.append({"id": key.id, "kek_id": key.kek_id, "wrapped": key.wrapped,
                          "created_at": utcnow()})
        await session.execute(insert(DataKeyRow), batch)


def _rotated(rt: Runtime) -> str:
    return generate_key_line(KeyKind.MASTER) + "," + rt.settings.master_keys.get_secret_value()


async def test_rotation_then_rewrap(fresh_runtime: Callable[..., Any]) -> None:
    old = await fresh_runtime()
    rows = await _seal_rows(old, 30)
    new = await fresh_runtime(master_keys=_rotated(old),
                              database_url=old.settings.database_url_value)
    async with new.sessions() as session:
        status = await service.key_status(session, new.envelope)
    assert status.deks == {old.envelope.ring.active_id: 30, new.envelope.ring.active_id: 0}

    # New writes use the new key; old rows still open.
    await _seal_rows(new, 5)
    async with new.unit_of_work() as session:
        assert (await service.rewrap_batch(session, new.envelope, 7)).rewritten == 7
    async with new.unit_of_work() as session:
        while (await service.rewrap_batch(session, new.envelope, 10)).rewritten:
            pass
    async with new.sessions() as session:
        status = await service.key_status(session, new.envelope)
        assert status.deks == {old.envelope.ring.active_id: 0,
                               new.envelope.ring.active_id: 35}
        for row_id, dek_id, ciphertext in rows:
            cipher = await service.row_cipher(session, new.envelope, "medical_records",
                                              row_id, dek_id)
            assert cipher.open("diagnosis", ciphertext).startswith("value ")


async def test_rewrap_cli_survives_kill_9(fresh_runtime: Callable[..., Any]) -> None:
    old = await fresh_runtime()
    await _bulk_keys(old, 20_000)
    env = cli_env(old, PHIVAULT_MASTER_KEYS=_rotated(old))
    process = subprocess.Popen(phivault_command("keys", "rewrap", "--batch-size", "500"),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stderr is not None
    first = process.stderr.readline()  # the first progress line: it is under way
    assert first.startswith("rewrap: "), first
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL

    status = run_cli("keys", "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)["deks"]
    assert sum(counts.values()) == 20_000  # nothing lost

    again = run_cli("keys", "rewrap", env=env)
    assert again.returncode == 0, again.stderr
    final = json.loads(run_cli("keys", "status", "--json", env=env).stdout)
    assert final["deks"][final["active"]] == 20_000 and sum(final["deks"].values()) == 20_000
    assert run_cli("keys", "rewrap", env=env).returncode == 0  # idempotent

    # Every data key still unwraps under the rotated ring.
    new = await fresh_runtime(master_keys=env["PHIVAULT_MASTER_KEYS"],
                              database_url=old.settings.database_url_value)
    async with new.sessions() as session:
        for key_id, wrapped in (await session.execute(select(DataKeyRow.id,
                                                             DataKeyRow.wrapped))).all():
            assert new.envelope.unwrap(key_id, wrapped).kek_id == final["active"]
        assert (await session.execute(select(func.count()).select_from(DataKeyRow))
                ).scalar_one() == 20_000


async def test_status_reports_keys_missing_from_the_ring(
        fresh_runtime: Callable[..., Any]) -> None:
    old = await fresh_runtime()
    await _seal_rows(old, 3)
    env = cli_env(old, PHIVAULT_MASTER_KEYS=generate_key_line(KeyKind.MASTER))
    status = run_cli("keys", "status", env=env)
    assert status.returncode == 0
    assert "NOT IN PHIVAULT_MASTER_KEYS" in status.stdout
    assert "cannot be read" in status.stderr
    rewrap = run_cli("keys", "rewrap", env=env)
    assert rewrap.returncode == 1
    assert "3 data keys are still under a master key" in rewrap.stderr


async def test_rewrap_skips_damaged_keys_and_repairs_mislabelled_ones(
        fresh_runtime: Callable[..., Any]) -> None:
    old = await fresh_runtime()
    await _bulk_keys(old, 10)
    async with old.sessions() as session:
        ids = [row for (row,) in (await session.execute(
            select(DataKeyRow.id).order_by(DataKeyRow.id))).all()]
    env = cli_env(old, PHIVAULT_MASTER_KEYS=_rotated(old))
    new = await fresh_runtime(master_keys=env["PHIVAULT_MASTER_KEYS"],
                              database_url=old.settings.database_url_value)
    async with new.unit_of_work() as session:
        # One key damaged on disk; one already re-wrapped but still labelled with the old id.
        damaged = (await session.get(DataKeyRow, ids[3]))
        assert damaged is not None
        damaged.wrapped = damaged.wrapped[:-1] + bytes([damaged.wrapped[-1] ^ 1])
        mislabelled = await session.get(DataKeyRow, ids[6])
        assert mislabelled is not None
        mislabelled.wrapped = new.envelope.rewrap(ids[6], mislabelled.wrapped) or b""
    result = run_cli("keys", "rewrap", "--batch-size", "3", env=env)
    assert result.returncode == 1
    assert "1 data keys failed their integrity check" in result.stderr
    final = json.loads(run_cli("keys", "status", "--json", env=env).stdout)
    assert final["deks"][final["active"]] == 9
    assert final["deks"][old.envelope.ring.active_id] == 1
