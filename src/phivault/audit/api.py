"""Audit trail routes: search and verification for auditors (`/audit`), and a patient's own
access log (`/me/access-log`)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel

from phivault.access.guards import Allow
from phivault.access.permissions import Role
from phivault.audit import access_log, search, service
from phivault.audit.actions import Action
from phivault.audit.schemas import AccessLogEntry, AuditEventView, AuditSearch
from phivault.auth.tokens import AccessClaims
from phivault.errors import InvalidRequest, RateLimited
from phivault.web.dependencies import RuntimeDep, SessionDep
from phivault.web.errors import responses
from phivault.web.pagination import PageDep

router = APIRouter(prefix="/audit", tags=["audit"])
patient_router = APIRouter(prefix="/me", tags=["me"])

Auditor = Annotated[AccessClaims, Depends(Allow(Role.AUDITOR))]
Patient = Annotated[AccessClaims, Depends(Allow(Role.PATIENT))]


async def single_valued_query(request: Request) -> None:
    """Each query parameter at most once: `?action=A&action=B` would otherwise search for B
    alone, silently."""
    if len(request.query_params.multi_items()) != len(request.query_params):
        raise InvalidRequest("Give each query parameter at most once.")


@router.get("", summary="Search the audit trail", responses=responses(401, 403, 422, 500),
            dependencies=[Depends(single_valued_query)])
async def search_trail(
    _: Auditor, filters: Annotated[AuditSearch, Query()], page: PageDep,
    response: Response, runtime: RuntimeDep, session: SessionDep,
) -> list[AuditEventView]:
    """The chained events that match every filter given, ordered by `seq` (the chain order):
    newest first by default, oldest first with `order=asc`. `since` is inclusive and `until`
    exclusive, ISO 8601 with an offset (`Z`, or `%2B01:00` in a URL); `resource_id` needs
    `resource_type`. An unknown action or outcome, a malformed id or time, or an unknown or
    repeated query parameter answers 422. Auditor only.

    `X-Total-Count` is exact when `X-Total-Count-Exact` is `true`: always without filters, and
    with filters up to 10,000 matching events; beyond that it is 10,000 and `X-Total-Count-Exact`
    is `false` (at least that many), so that a broad filter costs no more than a page.
    Events committed before the call are included (the trail is sequenced first).

    No PHI: `metadata` holds ids, counts and codes only. The one exception is on purpose:
    a `BREAK_GLASS` event carries `break_glass_reason`, the reason the doctor gave, because
    reviewing break-glass is the auditor's job; each reason answered is itself audited
    (`VIEW_BREAK_GLASS_REASON`, in the patient's access log). The search is audited as
    `VIEW_AUDIT_TRAIL` with its filters."""
    found = await search.search_events(session, runtime.sequencer, runtime.envelope,
                                       runtime.reason_mac, filters,
                                       page.limit, page.offset)
    page.answer(response, found.total.count)
    response.headers["X-Total-Count-Exact"] = "true" if found.total.exact else "false"
    return found.events


class VerifyAnswer(BaseModel):
    ok: bool
    events: int
    first_bad_seq: int | None
    # Queue ids of queued events the sequencer rejected (edited, forged, replayed): `ok` is
    # false while any exist. And how many had waited past the merge delay (a stalled sequencer).
    queue_tampered: list[int]
    queue_stale: int


def verification_gate(request: Request) -> asyncio.Lock:
    """One verification at a time per server process: on PostgreSQL each one runs a process
    per core and a connection each, so auditors (or a stolen auditor token) asking at once
    would otherwise multiply them. A second request answers 429 at once, holding nothing."""
    gate: asyncio.Lock | None = getattr(request.app.state, "verification_gate", None)
    if gate is None:
        gate = request.app.state.verification_gate = asyncio.Lock()
    return gate


@router.get("/verify", summary="Verify the audit chain",
            responses=responses(401, 403, 429))
async def verify_chain(
    _: Annotated[AccessClaims, Depends(Allow(Role.AUDITOR))],
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
) -> VerifyAnswer:
    """Recompute the HMAC chain over every event (SPEC §8). Auditor only.

    `first_bad_seq` is the first `seq` at which an event was changed, removed, inserted or
    reordered, or null when the chain holds. The check itself is audited. One verification
    runs at a time per server process; another asked meanwhile answers 429 `rate_limited`
    with `Retry-After`.
    """
    gate = verification_gate(request)
    if gate.locked():
        raise RateLimited(10, "A verification is already running; try again when it ends.")
    async with gate:
        result = await service.verify_snapshot(runtime.sessions, runtime.audit_key,
                                                runtime.sequencer, runtime.queue_key)
    service.record(session, Action.VERIFY_AUDIT_CHAIN,
                   metadata={"ok": result.ok, "events": result.events,
                             "first_bad_seq": result.first_bad_seq})
    return VerifyAnswer(**result.report())


@patient_router.get("/access-log", summary="Who accessed my data",
                    responses=responses(401, 403, 422))
async def my_access_log(claims: Patient, page: PageDep, response: Response,
                        runtime: RuntimeDep, session: SessionDep) -> list[AccessLogEntry]:
    """Every access to your data by someone else (doctors, staff, the system), newest first:
    when, who (role, and a staff member's name), what, whether it was allowed (`outcome`:
    refused attempts are listed too), and whether it was an emergency `break_glass` access.
    Your own actions are not listed. Patient only.

    `X-Total-Count` is exact when `X-Total-Count-Exact` is `true`: up to 10,000 entries;
    beyond that it is 10,000 and `X-Total-Count-Exact` is `false` (at least that many)."""
    entries, total = await access_log.view(session, runtime.sequencer, claims.user_id,
                                           page.limit, page.offset)
    page.answer(response, total.count)
    response.headers["X-Total-Count-Exact"] = "true" if total.exact else "false"
    return entries
