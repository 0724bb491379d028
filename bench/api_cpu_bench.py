"""The worker's CPU per request, in process (SPEC §14's API rows, without the network): the app
called as ASGI by 32 concurrent tasks for `GET /healthz`, `GET /records/{id}` and
`POST /patients/{pid}/records` on PostgreSQL, each for `--seconds`, after a warm-up.

No TLS, no HTTP parsing and no load generator share the measurement, so the figure moves by a
few percent between runs where `api_bench.py`'s move by 10-20 %: it is the one to compare
designs of the request path with (how the direct path, one access-rule dependency and the
single-flight session check were chosen). The latencies are the tasks' own, in one event loop.

Run from the repository root: `PYTHONPATH=src python bench/api_cpu_bench.py [--seconds N]`.
Writes bench/results/api_cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import time
from pathlib import Path
from typing import Any

from api_bench import DATABASE, keys, seed  # type: ignore[import-not-found]
from harness import machine_info, pg_admin, pg_url  # type: ignore[import-not-found]
from phivault.config import load_settings
from phivault.observability import configure_logging
from phivault.web.app import create_app

RESULTS = Path(__file__).parent / "results"
CONCURRENCY = 32
WARM_UP_SECONDS = 2.0
BODY = b'{"diagnosis": "Acute bronchitis", "prescriptions": ["Rest"], "notes": "Bench"}'


async def call(app: Any, method: str, path: str, token: str, body: bytes) -> int:
    """One request through the ASGI app; its status."""
    headers = [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {token}".encode()),
               (b"user-agent", b"api_cpu_bench")]
    if body:
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "https", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8443), "state": {}}
    sent, status = False, 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def load(app: Any, method: str, path: str, token: str, body: bytes,
               seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    failed = 0
    end = time.monotonic() + seconds

    async def client() -> None:
        nonlocal failed
        while time.monotonic() < end:
            started = time.perf_counter()
            status = await call(app, method, path, token, body)
            latencies.append(time.perf_counter() - started)
            failed += status >= 300

    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    latencies.sort()
    n = len(latencies)
    return {"requests": n, "failed": failed, "cpu_ms_per_request": round(cpu / n * 1000, 3),
            "requests_per_second": round(n / wall, 1),
            **{f"p{q}_ms": round(latencies[min(n - 1, n * q // 100)] * 1000, 2)
               for q in (50, 90, 99)}}


async def measure(values: dict[str, Any], ids: dict[str, str], seconds: float
                  ) -> dict[str, Any]:
    app = create_app(load_settings(**values))
    routes = {"healthz": ("GET", "/healthz", b""),
              "get_record": ("GET", f"/api/v1/records/{ids['record']}", b""),
              "post_record": ("POST", f"/api/v1/patients/{ids['patient']}/records", BODY)}
    async with app.router.lifespan_context(app):  # the server's start: sequencer, gc.freeze
        for method, path, body in routes.values():
            await load(app, method, path, ids["token"], body, WARM_UP_SECONDS)
        return {name: await load(app, method, path, ids["token"], body, seconds)
                for name, (method, path, body) in routes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    configure_logging("warning")  # as `phivault serve` at that level: no line per request
    values = {**keys(), "database_url": pg_url(DATABASE), "argon2_memory_kib": 19456,
              "auth_rate_limit": "1000000/minute", "log_level": "warning"}
    asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
    asyncio.run(pg_admin(f'CREATE DATABASE "{DATABASE}"'))
    try:
        ids = asyncio.run(seed(values))
        runs = asyncio.run(measure(values, ids, args.seconds))
    finally:
        asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
    health = runs["healthz"]["cpu_ms_per_request"]
    document = {
        "machine": machine_info(),
        "command": f"PYTHONPATH=src python bench/api_cpu_bench.py --seconds {args.seconds:g}",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "method": f"the ASGI app in process, {CONCURRENCY} concurrent tasks per route after a "
                  f"{WARM_UP_SECONDS:g} s warm-up, PostgreSQL; CPU of this process (the "
                  "worker's share: no TLS, HTTP parsing or load generator) per request",
        "runs": runs,
        "cpu_relative_to_healthz": {name: round(run["cpu_ms_per_request"] / health, 2)
                                    for name, run in runs.items()},
    }
    (RESULTS / "api_cpu.json").write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
