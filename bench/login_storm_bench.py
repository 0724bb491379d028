"""Benchmark a login storm (SPEC §14: "argon2id costs what it costs; during a login storm other
requests' p99 stays < 100 ms"): the p99 of `GET /records/{id}` at 4 connections, alone and while
16 connections log in as fast as they can, with the production argon2id parameters.

Run from the repository root: `PYTHONPATH=src python bench/login_storm_bench.py [--seconds N]`.
Needs `wrk`. Writes bench/results/login_storm.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from api_bench import PASSWORD, keys, served, wrk  # type: ignore[import-not-found]
from harness import machine_info, pg_url  # type: ignore[import-not-found]
from phivault.config import Settings

RESULT = Path(__file__).parent / "results" / "login_storm.json"
TARGET_P99_MS = 100.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("login_storm_bench: needs wrk (apt-get install wrk)")
    # The production argon2id cost (the defaults); limits high enough not to stop the storm.
    values = {**keys(), "database_url": pg_url("phivault_bench_api"),
              "auth_rate_limit": "1000000/minute", "lockout": "1000000/minute"}
    with served(values, 1) as (base, ids, tmp):
        login = tmp / "login.lua"
        login.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                         'wrk.body = \'{"email": "doctor@clinic.example", "password": "'
                         + PASSWORD + '"}\'\n')
        record = f"{base}/api/v1/records/{ids['record']}"
        calm = wrk(record, args.seconds, ids["token"], connections=4)
        with ThreadPoolExecutor(2) as pool:
            storm = pool.submit(wrk, f"{base}/api/v1/auth/login", args.seconds, "-", login, 16)
            during = pool.submit(wrk, record, args.seconds, ids["token"], None, 4)
            logins, reads = storm.result(), during.result()
    defaults = Settings.model_fields
    document = {
        "machine": machine_info(),
        "command": f"PYTHONPATH=src python bench/login_storm_bench.py --seconds {args.seconds}",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "method": "phivault serve (1 worker, HTTPS, PostgreSQL); wrk -c4 on GET /records/{id}, "
                  "alone, then beside wrk -c16 on POST /auth/login (right password)",
        "argon2id": {"memory_kib": defaults["argon2_memory_kib"].default,
                     "time_cost": defaults["argon2_time_cost"].default,
                     "parallelism": defaults["argon2_parallelism"].default},
        "reads_alone": calm,
        "logins": logins,
        "reads_during_storm": reads,
        "target_p99_ms": TARGET_P99_MS,
        "meets_target": (reads["p99_ms"] or 1e9) < TARGET_P99_MS and reads["non_2xx"] == 0,
    }
    RESULT.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
