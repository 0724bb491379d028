"""Nothing on a request's path hops to a worker thread: FastAPI runs a plain `def` endpoint or
dependency in the thread pool, which cost every request a round trip through it (found by
profiling; argon2 and the attachment streams go to threads on purpose, inside the services)."""

from __future__ import annotations

import gc
import inspect
from typing import Any

from phivault.access.guards import app_routes
from phivault.runtime import Runtime
from phivault.web.app import create_app


def _is_async(call: Any) -> bool:
    if inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
        return True
    if inspect.isfunction(call) or inspect.isclass(call) or not callable(call):
        return False
    method = type(call).__call__  # a dependency instance (Allow, HTTPBearer...)
    return inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method)


def _sync_calls(dependant: Any, path: list[str]) -> list[str]:
    found = []
    for dependency in dependant.dependencies:
        name = getattr(dependency.call, "__qualname__", type(dependency.call).__qualname__)
        if dependency.call is not None and not _is_async(dependency.call):
            found.append(" -> ".join([*path, name]))
        found += _sync_calls(dependency, [*path, name])
    return found


def test_every_endpoint_and_dependency_is_async(runtime: Runtime) -> None:
    offenders = []
    routes = [r for r in app_routes(create_app(runtime=runtime)) if r.dependant is not None]
    assert len(routes) > 30
    for route in routes:
        label = f"{sorted(route.methods)} {route.path}"
        if not _is_async(route.dependant.call):
            offenders.append(f"{label}: the endpoint")
        offenders += [f"{label}: {chain}" for chain in _sync_calls(route.dependant, [])]
    assert offenders == []


def test_the_check_sees_a_plain_def() -> None:
    def plain() -> None:
        return None

    async def coroutine() -> None:
        return None

    assert not _is_async(plain) and _is_async(coroutine)


def _calls(dependant: Any) -> list[str]:
    found = []
    for dependency in dependant.dependencies:
        found.append(getattr(dependency.call, "__qualname__", type(dependency.call).__qualname__))
        found += _calls(dependency)
    return found


def test_the_hot_routes_solve_only_their_access_rule(runtime: Runtime) -> None:
    """FastAPI's cost per dependency is paid on every request (it was a quarter of a record
    read's CPU, SPEC §14): the record routes take their caller from one access rule (which is
    the bearer scheme too, for the OpenAPI document) and their runtime from the request."""
    routes = {(method, r.path): r for r in app_routes(create_app(runtime=runtime))
              for method in r.methods}
    for key in (("GET", "/api/v1/records/{record_id}"),
                ("POST", "/api/v1/patients/{patient_id}/records")):
        assert _calls(routes[key].dependant) == ["Allow"], key


async def test_a_server_freezes_its_heap_once_started(fresh_runtime: Any) -> None:
    """A full collection walked the whole app under load (a pause of ~100 ms for every
    request in flight); frozen at start, it walks only what requests made since."""
    app = create_app(runtime=await fresh_runtime())
    gc.unfreeze()
    try:
        async with app.router.lifespan_context(app):
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
