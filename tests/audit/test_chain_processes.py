"""Several processes appending at once on PostgreSQL still make one gap-free valid chain: plain
writers (each chaining when it closes) and two servers with their background sequencers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from phivault.audit import service
from phivault.audit.models import AuditEvent, QueuedEvent
from phivault.crypto.tls import write_self_signed_certificate
from tests.factories import signed_in
from tests.helpers import (
    ROOT,
    cli_env,
    client_context,
    free_port,
    phivault_command,
    wait_listening,
)

APPENDER = """
import asyncio, sys
from phivault.audit import service
from phivault.audit.actions import Action
from phivault.config import load_settings
from phivault.runtime import Runtime

async def main(worker: int, count: int) -> None:
    rt = Runtime.from_settings(load_settings(), pool_size=8)
    async def one(i: int) -> None:
        async with rt.unit_of_work() as session:
            service.record(session, Action.VIEW_PROFILE, metadata={"offset": worker, "count": i})
    await asyncio.gather(*(one(i) for i in range(count)))
    await rt.close()

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


async def test_three_processes_append_one_chain(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    if rt.engine.dialect.name != "postgresql":
        pytest.skip("several writer processes are a PostgreSQL deployment")
    env = cli_env(rt)
    workers = [subprocess.Popen([sys.executable, "-c", APPENDER, str(w), "100"], env=env,
                                cwd=ROOT, stderr=subprocess.PIPE, text=True)
               for w in range(3)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr
    result = await service.verify_snapshot(rt.sessions, rt.audit_key, rt.sequencer,
                                           rt.queue_key)
    assert result.as_dict() == {"ok": True, "events": 300, "first_bad_seq": None}


@pytest.mark.slow
async def test_two_servers_under_load_leave_one_chain_with_every_request(
        fresh_runtime: Callable[..., Any], tmp_path: Path) -> None:
    """Two `phivault serve` processes on one PostgreSQL, each with its background sequencer,
    under concurrent audited requests: one valid, gap-free chain holding every request's event
    exactly once."""
    rt = await fresh_runtime()
    if rt.engine.dialect.name != "postgresql":
        pytest.skip("several server processes are a PostgreSQL deployment")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed_certificate(cert, key)
    env = cli_env(rt, PHIVAULT_TLS_CERT_FILE=str(cert), PHIVAULT_TLS_KEY_FILE=str(key))
    ports = [free_port(), free_port()]
    servers = [subprocess.Popen(phivault_command("serve", "--port", str(port)), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for port in ports]
    try:
        for port, process in zip(ports, servers, strict=True):
            wait_listening(port, process)
        patients = [await signed_in(rt) for _ in range(4)]
        request_ids: list[str] = []

        async def hammer(port: int, patient_index: int) -> None:
            async with httpx.AsyncClient(verify=client_context(cert), timeout=60,
                                         base_url=f"https://127.0.0.1:{port}") as client:
                for _ in range(25):
                    patient = patients[patient_index % len(patients)]
                    answer = await client.get("/api/v1/me", headers=patient.headers)
                    assert answer.status_code == 200, answer.text
                    request_ids.append(answer.headers["x-request-id"])

        await asyncio.gather(*(hammer(ports[i % 2], i) for i in range(16)))
        for process in servers:
            process.send_signal(signal.SIGTERM)
        for process in servers:
            _, stderr = process.communicate(timeout=60)
            assert process.returncode == 0, stderr
    finally:
        for process in servers:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
    # Each server chained what it committed before it exited; nothing is left queued.
    async with rt.sessions() as session:
        assert (await session.execute(select(func.count()).select_from(QueuedEvent))
                ).scalar_one() == 0
        seen = list((await session.execute(
            select(AuditEvent.request_id).where(AuditEvent.action == "VIEW_PROFILE"))).scalars())
    assert len(request_ids) == 400
    assert sorted(seen) == sorted(request_ids)
    result = await service.verify_snapshot(rt.sessions, rt.audit_key, rt.sequencer,
                                           rt.queue_key)
    assert result.ok and result.first_bad_seq is None
