"""Audit trail routes for auditors."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from phivault.access.guards import Allow
from phivault.access.permissions import Role
from phivault.audit import service
from phivault.audit.actions import Action
from phivault.auth.tokens import AccessClaims
from phivault.web.dependencies import RuntimeDep, SessionDep
from phivault.web.errors import responses

router = APIRouter(prefix="/audit", tags=["audit"])


class VerifyAnswer(BaseModel):
    ok: bool
    events: int
    first_bad_seq: int | None


@router.get("/verify", summary="Verify the audit chain", responses=responses(401, 403))
async def verify_chain(
    _: Annotated[AccessClaims, Depends(Allow(Role.AUDITOR))],
    runtime: RuntimeDep,
    session: SessionDep,
) -> VerifyAnswer:
    """Recompute the HMAC chain over every event (SPEC §8). Auditor only.

    `first_bad_seq` is the first `seq` at which an event was changed, removed, inserted or
    reordered, or null when the chain holds. The check itself is audited.
    """
    result = await service.verify_snapshot(runtime.sessions, runtime.audit_key)
    service.record(session, Action.VERIFY_AUDIT_CHAIN,
                   metadata={"ok": result.ok, "events": result.events,
                             "first_bad_seq": result.first_bad_seq})
    return VerifyAnswer(**result.as_dict())
