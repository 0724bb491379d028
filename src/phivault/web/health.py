"""Liveness, readiness and metrics, outside `/api/v1`.

Readiness is bounded: when the database neither answers nor refuses (a host that drops packets,
a server that accepts and then says nothing, a pool that stays full), `/readyz` says 503
`not_ready` after `READY_TIMEOUT_SECONDS`, so a load balancer takes the instance out of rotation
instead of waiting with it. The API answers the same outage 503 `unavailable` (web/errors.py).
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import text

from phivault.access.guards import LoopbackOrToken, Public
from phivault.db.engine import READ_ONLY
from phivault.ops import metrics
from phivault.web.dependencies import RuntimeDep
from phivault.web.errors import framework_error, responses

router = APIRouter(tags=["health"])

# The longest `/readyz` takes; less than a new connection's own limit (db/engine.py), so that a
# database that does not answer is told within it.
READY_TIMEOUT_SECONDS = 3.0


class Health(BaseModel):
    status: Literal["ok", "ready"]


@router.get("/healthz", dependencies=[Depends(Public())], summary="Liveness")
async def healthz() -> Health:
    """The process is up. Public; touches nothing."""
    return Health(status="ok")


@router.get("/readyz", dependencies=[Depends(Public())], summary="Readiness",
            response_model=Health, responses=responses(503))
async def readyz(runtime: RuntimeDep) -> Health | JSONResponse:
    """The database answers within 3 s, and so does the shared rate-limit store when one is
    configured (Redis). Public; 503 `not_ready` otherwise."""
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS), \
                runtime.engine.connect() as connection:
            # A read: on SQLite a deferred BEGIN, so a writer at work (a long upload's store)
            # does not make a healthy instance look down.
            await connection.execution_options(**{READ_ONLY: True})
            await connection.execute(text("SELECT 1"))
    except Exception:
        return framework_error(503)
    # Auth fails closed without its rate-limit store (Redis, when configured): not ready.
    if not await runtime.authenticator.limits.ready():
        return framework_error(503)
    return Health(status="ready")


@router.get("/metrics", dependencies=[Depends(LoopbackOrToken())], summary="Metrics",
            response_class=Response, responses={
                200: {"description": "Prometheus text (version 0.0.4).",
                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                **responses(403)})
async def prometheus_metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics of every worker of this server (`ops/metrics.py`): requests and
    latency by route template, auth failures, lock-outs, integrity failures, the audit
    queue's depth and merge delay, the database connections. No PHI and no ids in any label.
    From this host (loopback), or with `Authorization: Bearer $PHIVAULT_METRICS_TOKEN`."""
    body, media_type = await metrics.render(runtime.engine)
    return Response(body, media_type=media_type, headers={"Cache-Control": "no-store"})
