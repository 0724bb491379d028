"""User administration (admins) and the doctor directory (everyone signed in)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response, status

from phivault.access.guards import ANY_ROLE, Allow
from phivault.access.permissions import Role
from phivault.auth.schemas import CreatedStaff, CreateStaff, DoctorView, UpdateUser, UserView
from phivault.auth.tokens import AccessClaims
from phivault.web.dependencies import RuntimeDep, SessionDep
from phivault.web.errors import responses
from phivault.web.pagination import PageDep

users = APIRouter(prefix="/users", tags=["users"])
doctors = APIRouter(prefix="/doctors", tags=["users"])

Admin = Annotated[AccessClaims, Depends(Allow(Role.ADMIN))]
Anyone = Annotated[AccessClaims, Depends(Allow(*ANY_ROLE))]
NO_CONTENT: dict[str, Any] = {"status_code": status.HTTP_204_NO_CONTENT,
                              "response_class": Response}


@users.post("", status_code=201, responses=responses(401, 403, 409, 422),
            summary="Create a staff account")
async def create_staff(body: CreateStaff, _: Admin, runtime: RuntimeDep,
                       session: SessionDep) -> CreatedStaff:
    """A doctor, admin or auditor. The answer's one-time `setup_token` (valid 72 hours) goes to
    the new staff member, who sets their own password at `POST /auth/setup`."""
    created = await runtime.accounts.create_staff(session, body)
    assert created.setup_token is not None and created.user.setup_expires_at is not None  # noqa: S101
    return CreatedStaff(id=created.user.id, email=created.email, role=created.user.role,
                        setup_token=created.setup_token,
                        setup_expires_at=created.user.setup_expires_at)


@users.get("", responses=responses(401, 403, 422), summary="List users")
async def list_users(_: Admin, runtime: RuntimeDep, session: SessionDep, page: PageDep,
                     response: Response) -> list[UserView]:
    """Every account: id, email, role, status. No profile or other PHI."""
    views, total = await runtime.accounts.list_users(session, page.limit, page.offset)
    page.answer(response, total)
    return views


@users.patch("/{user_id}", responses=responses(401, 403, 404, 409, 422),
             summary="Change a user's role or status")
async def update_user(user_id: uuid.UUID, body: UpdateUser, claims: Admin, runtime: RuntimeDep,
                      session: SessionDep) -> UserView:
    """`role` among doctor/admin/auditor, `status` active or disabled. Either change ends every
    session of the user. An admin cannot change their own account (409)."""
    return await runtime.accounts.update_user(session, claims.user_id, user_id, body.role,
                                              body.status)


@users.delete("/{user_id}/sessions", responses=responses(401, 403, 404),
              summary="End every session of a user", **NO_CONTENT)
async def end_user_sessions(user_id: uuid.UUID, _: Admin, runtime: RuntimeDep,
                            session: SessionDep) -> None:
    await runtime.accounts.end_sessions(session, user_id)


@doctors.get("", responses=responses(401, 422), summary="The doctor directory")
async def list_doctors(_: Anyone, runtime: RuntimeDep, session: SessionDep, page: PageDep,
                       response: Response) -> list[DoctorView]:
    """Active doctors, for booking: id, full name, specialty."""
    views, total = await runtime.accounts.doctors(session, page.limit, page.offset)
    page.answer(response, total)
    return views
