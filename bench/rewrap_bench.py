"""Benchmark master-key rotation at scale (issue 11, item 8): `phivault keys rewrap` over
1,000,000 data keys on PostgreSQL, with the server serving record reads meanwhile.

Run from the repository root: `PYTHONPATH=src python bench/rewrap_bench.py [--deks N]
[--batch-size B]`. Needs `wrk`. A fresh database is seeded as in bench/api_bench.py (a doctor,
a patient, a record) and served by `phivault serve` (1 worker) with the master keys `new,old`
(the new one active); N data keys wrapped under the old key are then loaded with COPY, and the
real command rewraps them while wrk reads the record at 8 connections. The figure is data keys
re-wrapped per second of the command's wall time (target >= 20,000/s, so 1,000,000 in under a
minute), with what the server answered meanwhile (no error allowed). Writes
bench/results/rewrap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from api_bench import DATABASE, keys, served, wrk  # type: ignore[import-not-found]
from harness import machine_info, pg_url  # type: ignore[import-not-found]
from phivault.crypto.envelope import Envelope, MasterKeyRing
from phivault.crypto.keys import KeyKind, generate_key_line, parse_key_ring

RESULTS = Path(__file__).parent / "results"
TARGET_PER_SECOND = 20_000
CHUNK = 50_000  # data keys generated and copied at a time


async def load_old_keys(old_line: str, count: int) -> float:
    """`count` data keys wrapped by the old master key, copied into `data_keys`; seconds."""
    envelope = Envelope(MasterKeyRing(parse_key_ring(old_line)))
    (kek_id, _), = parse_key_ring(old_line)
    started = time.perf_counter()
    connection = await asyncpg.connect(pg_url(DATABASE).replace("+asyncpg", "", 1))
    try:
        now = datetime.datetime.now(datetime.UTC)
        for start in range(0, count, CHUNK):
            records = []
            for _ in range(min(CHUNK, count - start)):
                key = envelope.new_data_key(uuid.uuid4())
                records.append((key.id, kek_id, key.wrapped, now))
            await connection.copy_records_to_table(
                "data_keys", records=records, columns=["id", "kek_id", "wrapped", "created_at"])
    finally:
        await connection.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deks", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    args = parser.parse_args()

    old, new = generate_key_line(KeyKind.MASTER), generate_key_line(KeyKind.MASTER)
    values: dict[str, Any] = {**keys(), "master_keys": f"{new},{old}",
                              "database_url": pg_url(DATABASE),
                              "argon2_memory_kib": 8, "argon2_time_cost": 1}
    with served(values, workers=1) as (base, ids, _tmp):
        load_seconds = asyncio.run(load_old_keys(old, args.deks))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
        env.update({f"PHIVAULT_{k.upper()}": str(v) for k, v in values.items()})
        env.update(PHIVAULT_LOG_LEVEL="warning")
        reads: dict[str, Any] = {}

        def load() -> None:
            reads.update(wrk(f"{base}/api/v1/records/{ids['record']}", 20, ids["token"],
                             connections=8))

        reader = threading.Thread(target=load)
        started = time.perf_counter()
        reader.start()
        done = subprocess.run([sys.executable, "-m", "phivault.cli.main", "keys", "rewrap",
                               "--batch-size", str(args.batch_size)], env=env,
                              capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        reader.join()
        if done.returncode != 0:
            raise SystemExit(f"rewrap failed: {done.stderr.strip()}")
        status = subprocess.run([sys.executable, "-m", "phivault.cli.main", "keys", "status",
                                 "--json"], env=env, capture_output=True, text=True,
                                check=True)
    per_second = round(args.deks / seconds)
    result = {
        "machine": machine_info(),
        "command": "PYTHONPATH=src python bench/rewrap_bench.py"
                   + (f" --deks {args.deks}" if args.deks != 1_000_000 else ""),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "method": "PostgreSQL; phivault serve (1 worker) with the new master key active; "
                  "data keys under the old key loaded with COPY; `phivault keys rewrap` timed "
                  "from start to exit while wrk -c8 reads one record for 20 s; 2 cores shared "
                  "by the server, PostgreSQL, wrk and the command",
        "deks": args.deks,
        "batch_size": args.batch_size,
        "load_seconds": round(load_seconds, 1),
        "rewrap_seconds": round(seconds, 2),
        "rewrapped_per_second": per_second,
        "target_per_second": TARGET_PER_SECOND,
        "meets_target": per_second >= TARGET_PER_SECOND,
        "key_status_after": json.loads(status.stdout),
        "server_during_rewrap": reads,
        "server_kept_serving": reads.get("non_2xx") == 0 and reads.get("requests_per_second",
                                                                         0) > 0,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rewrap.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
