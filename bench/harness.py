"""What the benchmarks share: the machine they ran on, interleaved timing, ratios, and the
PostgreSQL server they make scratch databases on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

PG = os.environ.get("PHIVAULT_TEST_DATABASE_URL",
                    "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(**extra: str) -> dict[str, object]:
    return {"platform": platform.platform(), "cpu_model": cpu_model(),
            "cores": os.cpu_count() or 0, "python": platform.python_version(), **extra}


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def interleave(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per round of each variant, run one after another round after round, so that the
    noise of a shared machine falls on all of them alike (after one warm-up each)."""
    for run in variants.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            seconds[name].append(timed(run))
    return seconds


def ratio(seconds: dict[str, list[float]], name: str, baseline: str) -> float:
    """The median over rounds of `name`'s speed relative to `baseline`'s."""
    per_round = [b / a for a, b in zip(seconds[name], seconds[baseline], strict=True)]
    return round(statistics.median(per_round), 3)


def pg_url(database: str) -> str:
    return PG.rsplit("/", 1)[0] + "/" + database


async def pg_admin(sql: str) -> None:
    """Run one statement (CREATE/DROP DATABASE) on the benchmark's PostgreSQL server."""
    connection = await asyncpg.connect(PG.replace("postgresql+asyncpg", "postgresql", 1),
                                       timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()
