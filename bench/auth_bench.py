"""Benchmark refresh-token rotation (SPEC §14: >= 100x the naive design).

Ours: the real `Authenticator.refresh` on PostgreSQL, each rotation one unit of work: look the
token up by its SHA-256, mark it used, issue a new pair, write the TOKEN_REFRESH audit event.
The naive design: refresh tokens stored bcrypt-hashed (cost 10), so a presented token is found
by comparing it against each of the user's 20 live tokens, and the new one is bcrypt-hashed too;
measured as that CPU work alone (no database), which flatters it.

Run from the repository root: `PYTHONPATH=src python bench/auth_bench.py`. Writes
bench/results/auth.json.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import secrets
import statistics
import time
from pathlib import Path
from typing import Any

import bcrypt

from harness import (  # type: ignore[import-not-found]
    PG,
    machine_info,
    pg_admin,
)
from phivault.config import load_settings
from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.db.migrate import upgrade
from phivault.runtime import Runtime

RESULT = Path(__file__).parent / "results" / "auth.json"
LIVE_TOKENS = 20
BCRYPT_COST = 10
PASSWORD = "rotation timing passphrase 2026"  # noqa: S105 - a throwaway bench account
TARGET = 100


async def ours(rt: Runtime, rotations: int, concurrency: int) -> float:
    """Rotations per second: `concurrency` clients each rotating its own session's token."""
    async with rt.unit_of_work() as session:
        await rt.accounts.create_with_password(session, "bench@clinic.example", "patient",
                                               "Bench Patient", None, PASSWORD)
    tokens = []
    for _ in range(max(concurrency, LIVE_TOKENS)):  # 20 live sessions for the user
        async with rt.unit_of_work() as session:
            issued = await rt.authenticator.login(session, "bench@clinic.example", PASSWORD,
                                                  None)
        tokens.append(issued.refresh_token)
    per_client = rotations // concurrency

    async def client(index: int) -> None:
        token = tokens[index]
        for _ in range(per_client):
            async with rt.unit_of_work() as session:
                token = (await rt.authenticator.refresh(session, token)).refresh_token

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return per_client * concurrency / (time.perf_counter() - start)


def naive(rotations: int) -> float:
    """Rotations per second of the bcrypt design: the presented token is, on average, found
    half-way through the user's 20 live hashes (every one is tried when it is not there)."""
    live = [secrets.token_urlsafe(32) for _ in range(LIVE_TOKENS)]
    hashes = [bcrypt.hashpw(t.encode(), bcrypt.gensalt(BCRYPT_COST)) for t in live]
    start = time.perf_counter()
    for i in range(rotations):
        presented = live[i % LIVE_TOKENS].encode()
        for stored in hashes:
            if bcrypt.checkpw(presented, stored):
                break
        new = secrets.token_urlsafe(32)
        hashes[i % LIVE_TOKENS] = bcrypt.hashpw(new.encode(), bcrypt.gensalt(BCRYPT_COST))
        live[i % LIVE_TOKENS] = new
    return rotations / (time.perf_counter() - start)


async def main() -> None:
    await pg_admin('DROP DATABASE IF EXISTS "phivault_bench_auth" WITH (FORCE)')
    await pg_admin('CREATE DATABASE "phivault_bench_auth"')
    settings = load_settings(
        database_url=PG.rsplit("/", 1)[0] + "/phivault_bench_auth",
        master_keys=generate_key_line(KeyKind.MASTER), index_key=generate_key_line(KeyKind.INDEX),
        audit_key=generate_key_line(KeyKind.AUDIT), jwt_keys=generate_key_line(KeyKind.JWT),
        auth_rate_limit="1000000/minute", argon2_memory_kib=19456, argon2_time_cost=2)
    rt = Runtime.from_settings(settings, pool_size=16)
    try:
        await upgrade(rt.engine)
        ours_rates = [await ours(rt, 2000, 16) for _ in range(1)]
        naive_rates = [naive(20) for _ in range(3)]
    finally:
        await rt.close()
        await pg_admin('DROP DATABASE IF EXISTS "phivault_bench_auth" WITH (FORCE)')
    ours_rate, naive_rate = statistics.median(ours_rates), statistics.median(naive_rates)
    ratio = ours_rate / naive_rate
    document: dict[str, Any] = {
        "machine": machine_info(),
        "command": "PYTHONPATH=src python bench/auth_bench.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "ours_rotations_per_second": round(ours_rate, 1),
        "naive_bcrypt_rotations_per_second": round(naive_rate, 2),
        "ratio": round(ratio, 1),
        "target_ratio": TARGET,
        "meets_target": ratio >= TARGET,
        "method": ("ours: Authenticator.refresh on PostgreSQL, 16 concurrent clients, 2000 "
                   "rotations, each a committed unit of work with its audit event; naive: "
                   f"bcrypt cost {BCRYPT_COST}, {LIVE_TOKENS} live tokens per user, CPU only, "
                   "median of 3 runs of 20 rotations"),
    }
    RESULT.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
