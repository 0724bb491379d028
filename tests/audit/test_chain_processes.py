"""Several processes appending at once on PostgreSQL still make one gap-free valid chain."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from phivault.audit import service
from tests.helpers import ROOT, cli_env

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
    result = await service.verify_snapshot(rt.sessions, rt.audit_key)
    assert result.as_dict() == {"ok": True, "events": 300, "first_bad_seq": None}
