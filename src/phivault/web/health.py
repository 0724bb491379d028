"""Liveness and readiness, outside `/api/v1`."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from phivault.access.guards import Public
from phivault.web.dependencies import RuntimeDep
from phivault.web.errors import framework_error, responses

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok", "ready"]


@router.get("/healthz", dependencies=[Depends(Public())], summary="Liveness")
async def healthz() -> Health:
    """The process is up. Public; touches nothing."""
    return Health(status="ok")


@router.get("/readyz", dependencies=[Depends(Public())], summary="Readiness",
            response_model=Health, responses=responses(503))
async def readyz(runtime: RuntimeDep) -> Health | JSONResponse:
    """The database answers. Public; 503 `not_ready` otherwise."""
    try:
        async with runtime.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception:
        return framework_error(503)
    return Health(status="ready")
