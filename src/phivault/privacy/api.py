"""The patient's data-subject rights (SPEC §9): consents, export, rectification, erasure."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from phivault.access.guards import Allow
from phivault.access.permissions import Role
from phivault.auth.tokens import AccessClaims
from phivault.privacy import consents
from phivault.privacy.consents import ConsentChoice, ConsentView
from phivault.web.dependencies import SessionDep
from phivault.web.errors import responses

router = APIRouter(tags=["privacy"])
Patient = Annotated[AccessClaims, Depends(Allow(Role.PATIENT))]


@router.get("/me/consents", responses=responses(401, 403), summary="My current consents")
async def read_consents(claims: Patient, session: SessionDep) -> ConsentView:
    return await consents.current(session, claims.user_id)


@router.put("/me/consents", responses=responses(401, 403, 422), summary="Change my consents")
async def change_consents(body: ConsentChoice, claims: Patient,
                          session: SessionDep) -> ConsentView:
    """All three booleans; a new version is appended to the history. Withdrawing
    `data_sharing` closes your chart to doctors at once (break-glass excepted)."""
    return await consents.change(session, claims.user_id, body)


@router.get("/me/consents/history", responses=responses(401, 403), summary="My consent history")
async def consent_history(claims: Patient, session: SessionDep) -> list[ConsentView]:
    return await consents.history(session, claims.user_id)
