"""User administration (admins) and the doctor directory (everyone signed in)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Response, status

from phivault.access.guards import ANY_ROLE, Allow
from phivault.access.permissions import Role
from phivault.auth.schemas import (
    CreatedStaff,
    CreateStaff,
    DoctorView,
    SetupInvitation,
    UpdateUser,
    UserView,
)
from phivault.auth.tokens import AccessClaims
from phivault.ops.mail import outbox_for
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
async def create_staff(body: CreateStaff, claims: Admin, runtime: RuntimeDep,
                       session: SessionDep) -> CreatedStaff:
    """Admins only (403 `forbidden` for any other role). A doctor, admin or auditor; a
    taken email is 409 `email_taken`. With staff approval off (the dev default), the answer's
    one-time `setup_token` (valid 72 hours) goes to the new staff member, who sets their own
    password at `POST /auth/setup`. With it on (the prod default), the account is `pending`,
    `setup_token` and `setup_expires_at` are null, and another admin must approve it
    (`POST /users/{id}/approve`): its creator never sees its setup secret."""
    created = await runtime.accounts.create_staff(
        session, body, creator=claims.user_id,
        approval=runtime.settings.staff_approval_required)
    return CreatedStaff(id=created.user.id, email=created.email, role=created.user.role,
                        setup_token=created.setup_token,
                        setup_expires_at=created.user.setup_expires_at)


@users.post("/{user_id}/approve", response_model=SetupInvitation,
            responses={204: {"description": "Approved; the setup token was mailed to the new "
                                            "staff member."},
                       **responses(401, 403, 404, 409, 422)},
            summary="Approve a pending staff account")
async def approve_staff(user_id: uuid.UUID, claims: Admin, runtime: RuntimeDep,
                        session: SessionDep, tasks: BackgroundTasks) -> Response | SetupInvitation:
    """Admins only: a second admin, never the account's creator (403 `forbidden`), makes a
    `pending` staff account `active` (409 `conflict` when it is not pending; 404 `not_found` for
    an unknown id) and issues its one-time setup token, valid 72 hours. With mail configured
    (`PHIVAULT_SMTP_URL`) the token is mailed to the account's address once the approval has
    committed, and the answer is 204. Without mail the answer is 200 `{setup_token,
    setup_expires_at}`: the approving admin hands the token to the new staff member (check that
    the address is theirs before approving)."""
    handed = await runtime.accounts.approve_staff(session, claims.user_id, user_id,
                                                  outbox_for(runtime, tasks))
    if handed is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return handed


@users.post("/{user_id}/invitation", response_model=SetupInvitation,
            responses={204: {"description": "A new setup token was mailed to the staff "
                                            "member."},
                       **responses(401, 403, 404, 409, 422)},
            summary="Renew a staff member's invitation")
async def renew_invitation(user_id: uuid.UUID, claims: Admin, runtime: RuntimeDep,
                           session: SessionDep,
                           tasks: BackgroundTasks) -> Response | SetupInvitation:
    """Admins only. A new one-time setup token (valid 72 hours; the previous one dies) for an
    active staff account whose owner has not chosen a password yet: an invitation that could not
    be mailed, was lost, or ran out. 409 `conflict` for any other account (pending: approve it;
    a password set: the account is someone's). With staff approval on, the account's creator may
    not renew it (403 `forbidden`). Answered like the approval: 204 and mail, or 200
    `{setup_token, setup_expires_at}` when no mail is configured."""
    handed = await runtime.accounts.renew_invitation(
        session, claims.user_id, user_id, outbox_for(runtime, tasks),
        approval=runtime.settings.staff_approval_required)
    if handed is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return handed


@users.get("", responses=responses(401, 403, 422), summary="List users")
async def list_users(_: Admin, runtime: RuntimeDep, session: SessionDep, page: PageDep,
                     response: Response) -> list[UserView]:
    """Admins only. Every account, oldest first and paged (`limit`, `offset`; the total in
    `X-Total-Count`): id, email, role, status, created. No profile or other PHI. Audited as
    `VIEW_USERS`."""
    views, total = await runtime.accounts.list_users(session, page.limit, page.offset)
    page.answer(response, total)
    return views


@users.patch("/{user_id}", responses=responses(401, 403, 404, 409, 422),
             summary="Change a user's role or status")
async def update_user(user_id: uuid.UUID, body: UpdateUser, claims: Admin, runtime: RuntimeDep,
                      session: SessionDep) -> UserView:
    """Admins only. `role` among doctor/admin/auditor, `status` active or disabled (a
    patient's role never changes). Either change ends every session of the user at once. An
    admin cannot change their own account (409 `conflict`); an unknown id is 404
    `not_found`. Audited as `UPDATE_USER`."""
    return await runtime.accounts.update_user(session, claims.user_id, user_id, body.role,
                                              body.status)


@users.delete("/{user_id}/sessions", responses=responses(401, 403, 404),
              summary="End every session of a user", **NO_CONTENT)
async def end_user_sessions(user_id: uuid.UUID, _: Admin, runtime: RuntimeDep,
                            session: SessionDep) -> None:
    """Admins only. Ends every session of the user at once (a stolen device, a departure):
    their refresh and access tokens stop working; they may log in again. An unknown id is
    404 `not_found`. Audited as `SESSION_REVOKED`."""
    await runtime.accounts.end_sessions(session, user_id)


@doctors.get("", responses=responses(401, 422), summary="The doctor directory")
async def list_doctors(_: Anyone, runtime: RuntimeDep, session: SessionDep, page: PageDep,
                       response: Response) -> list[DoctorView]:
    """Any signed-in user. Active doctors, for booking (`POST /consultations` with a
    `doctor_id` from here): id, full name, specialty; paged, the total in `X-Total-Count`.
    Staff directory data only, so not audited."""
    views, total = await runtime.accounts.doctors(session, page.limit, page.offset)
    page.answer(response, total)
    return views
