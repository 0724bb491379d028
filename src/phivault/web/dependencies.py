"""Dependencies every route uses: the runtime and the request's unit of work."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.runtime import Runtime


# Dependencies are `async def`: FastAPI runs a plain `def` dependency in a worker thread, a
# thread hop on every request for what is an attribute lookup (a test keeps it so).
def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_runtime(request: Request) -> Runtime:
    return runtime_of(request)


async def _unit_of_work(request: Request) -> AsyncIterator[AsyncSession]:
    async with runtime_of(request).unit_of_work() as session:
        yield session


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
# `scope="function"`: the unit of work commits when the route function returns, before the
# response is sent, so a failed commit (the audit event could not be written) fails the request.
SessionDep = Annotated[AsyncSession, Depends(_unit_of_work, scope="function")]
