"""Prometheus metrics (`GET /metrics`, SPEC §10): what operators watch, with no PHI and no ids.

Every label takes its values from a closed set: the route's template (`/api/v1/records/{record_id}`,
never the path a client sent), the method, the status code, a failure's reason from a fixed
list, a pool state. So no label can hold an id, an email or anything a client chose.

With `--workers N` the workers are separate processes, and a scrape reaches one of them. The
supervisor gives every worker one directory (`PROMETHEUS_MULTIPROC_DIR`, set before they start),
where prometheus-client keeps each process's values in a file of its own; a scrape of any worker
adds them all up (its multiprocess mode), and a worker that dies is marked dead so that its live
gauges leave the sum. Without the variable (one process, tests) the values live in memory.

Metrics:
- `phivault_http_requests_total{method,route,status}`, `phivault_http_request_duration_seconds
  {method,route}`: every request, by route template;
- `phivault_auth_failures_total{reason}`: failed logins (`unknown_account`, `bad_password`,
  `inactive`, `bad_totp`), `phivault_lockouts_total`, `phivault_integrity_failures_total`;
- `phivault_audit_queue_depth` (read at scrape time) and `phivault_audit_merge_delay_seconds`
  (from an event's time to its chaining);
- `phivault_db_connections{state}`: the database pools' connections checked out and kept;
- `phivault_direct_path_total{route,outcome}`: requests the direct path (`db/direct.py`)
  `answered`, `declined` (handed to the unit of work: a refusal, an erased patient, a row that
  is not there, a ciphertext that fails) or handed over after it `failed`.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
AUTH_FAILURE_REASONS = ("unknown_account", "bad_password", "inactive", "bad_totp")
UNMATCHED = "unmatched"  # a request no route took (404, 405): never its path

REQUESTS = Counter("phivault_http_requests", "HTTP requests answered, by route template.",
                   ["method", "route", "status"])
LATENCY = Histogram("phivault_http_request_duration_seconds",
                    "Time to answer an HTTP request, by route template.", ["method", "route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
AUTH_FAILURES = Counter("phivault_auth_failures", "Failed logins, by reason.", ["reason"])
LOCKOUTS = Counter("phivault_lockouts", "Login attempts refused by an account's lock-out.")
INTEGRITY_FAILURES = Counter("phivault_integrity_failures",
                             "Ciphertexts or chain rows that failed authentication.")
QUEUE_DEPTH = Gauge("phivault_audit_queue_depth", "Audit events committed, not yet chained.",
                    multiprocess_mode="mostrecent")
MERGE_DELAY = Histogram("phivault_audit_merge_delay_seconds",
                        "From an audit event's time to its chaining.",
                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 30, 300))
DIRECT_PATH = Counter("phivault_direct_path", "Requests the direct path answered, declined "
                      "or handed over after a failure, by route.", ["route", "outcome"])
DB_CONNECTIONS = Gauge("phivault_db_connections", "Database connections, by state.",
                       ["state"], multiprocess_mode="livesum")


def route_of(scope: MutableMapping[str, Any]) -> str:
    """The template of the route that took the request (`/api/v1/records/{record_id}`), or
    `UNMATCHED`. A route included with a prefix knows its template without the prefix; the
    prefix is the static part of the path before the template's segments (no route takes a
    parameter that spans segments)."""
    route = scope.get("route")
    template = getattr(route, "path_format", None)
    if not isinstance(template, str) or not template.startswith("/"):
        return UNMATCHED
    parts = str(scope.get("path", "")).split("/")
    segments = template.count("/")
    return "/".join(parts[:len(parts) - segments]) + template


# HTTP's methods; any other word a client sends (h11 takes any token) is `other`: a label value
# a client chose would let it add series without bound, and write its own text in them.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    method = method if method in METHODS else "other"
    REQUESTS.labels(method, route, str(status)).inc()
    LATENCY.labels(method, route).observe(seconds)


def auth_failure(reason: str) -> None:
    if reason in AUTH_FAILURE_REASONS:
        AUTH_FAILURES.labels(reason).inc()


def instrument_pool(engine: AsyncEngine) -> None:
    """Count the engine's connections as the pool hands them out and takes them back."""
    pool = engine.sync_engine.pool

    @event.listens_for(pool, "connect")
    def _opened(*_: Any) -> None:
        DB_CONNECTIONS.labels("open").inc()

    @event.listens_for(pool, "close")
    def _closed(*_: Any) -> None:
        DB_CONNECTIONS.labels("open").dec()

    @event.listens_for(pool, "checkout")
    def _out(*_: Any) -> None:
        DB_CONNECTIONS.labels("checked_out").inc()

    @event.listens_for(pool, "checkin")
    def _in(*_: Any) -> None:
        DB_CONNECTIONS.labels("checked_out").dec()


async def render(engine: AsyncEngine) -> tuple[bytes, str]:
    """The Prometheus text of every worker's metrics (see the module docstring)."""
    from phivault.audit.models import QueuedEvent  # the trail's model, at scrape time only

    async with engine.connect() as connection:
        depth = (await connection.execute(select(func.count()).select_from(QueuedEvent))
                 ).scalar_one()
        await connection.rollback()
    QUEUE_DEPTH.set(int(depth))
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def worker_died(pid: int) -> None:
    """A worker is gone: its live gauges leave the sum (multiprocess mode only)."""
    if os.environ.get(MULTIPROC_ENV):
        prometheus_multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
