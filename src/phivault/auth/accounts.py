"""Accounts: patient registration, staff onboarding with one-time setup tokens (and, with staff
approval on, a second admin's approval first), legacy import, and the administration of users
(list, re-role, disable, end sessions), the doctor directory and the caller's own account.

Every email is sealed under its row's data key and found by its blind index; an admin sees
emails (they administer accounts) but never a profile, record or other PHI.

Separation of duties (SPEC §6): with staff approval on, a staff account an admin creates is
`pending` and has no setup token at all. Only `approve_staff` (and later `renew_invitation`),
called by another admin, makes its token, and hands it to the new member by mail (or, with no
mail configured, to the calling admin), never to the creator. A pending account has no password
and no token, so it can neither log in nor redeem anything, and no other change of the API
(`update_user`) makes it active.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.access.permissions import Role
from phivault.audit import service as audit
from phivault.audit.actions import Action, Outcome
from phivault.auth.models import AuthSession, StaffProfile, User
from phivault.auth.passwords import Passwords, is_bcrypt_hash, password_problem
from phivault.auth.schemas import (
    ConsentChoices,
    CreateStaff,
    DoctorView,
    Me,
    RegisterRequest,
    SetupInvitation,
    UserView,
)
from phivault.auth.service import (
    email_lookup,
    email_lookups,
    new_opaque_token,
    revoke_sessions,
    token_digest,
    user_cipher,
)
from phivault.clinical.models import PatientProfile
from phivault.crypto.blind_index import BlindIndex
from phivault.crypto.envelope import Envelope
from phivault.db.base import utcnow
from phivault.db.paging import fetch_page
from phivault.db.phases import reads_only
from phivault.errors import (
    Conflict,
    EmailTaken,
    Forbidden,
    InvalidToken,
    NotFound,
    WeakPassword,
)
from phivault.keys.service import new_row_cipher, row_cipher
from phivault.ops.mail import Outbox, invitation
from phivault.privacy.models import Consent
from phivault.request_context import Actor

SETUP_TOKEN_HOURS = 72
STAFF_ROLES = frozenset({Role.DOCTOR, Role.ADMIN, Role.AUDITOR})
PENDING = "pending"


@dataclass(frozen=True, slots=True)
class CreatedAccount:
    user: User
    email: str
    setup_token: str | None = None


@dataclass(frozen=True, slots=True)
class ImportReport:
    imported: int
    skipped: int
    problems: list[str]


class Accounts:
    def __init__(self, envelope: Envelope, blind_index: BlindIndex, passwords: Passwords) -> None:
        self.envelope = envelope
        self.blind_index = blind_index
        self.passwords = passwords

    async def _email_free(self, session: AsyncSession, email: str) -> None:
        """Refuse an email some account has, under either index key during a rotation."""
        taken = (await session.execute(select(User.id).where(
            User.email_index.in_(email_lookups(self.blind_index, email))).limit(1))
                 ).scalar_one_or_none()
        if taken is not None:
            raise EmailTaken()

    def _new_user(self, session: AsyncSession, email: str, role: str,
                  password_hash: str | None) -> User:
        user_id = uuid.uuid4()
        cipher = new_row_cipher(session, self.envelope, "users", user_id)
        user = User(id=user_id, data_key_id=cipher.data_key_id, email=cipher.seal("email", email),
                    email_index=email_lookup(self.blind_index, email), password_hash=password_hash,
                    role=role, status="active", totp_enabled=False, created_at=utcnow())
        session.add(user)
        return user

    def _new_patient_profile(self, session: AsyncSession, user: User, full_name: str,
                             birth_date: date | None = None, sex: str | None = None,
                             phone: str | None = None, address: str | None = None) -> None:
        cipher = new_row_cipher(session, self.envelope, "patient_profiles", user.id)
        session.add(PatientProfile(
            user_id=user.id, data_key_id=cipher.data_key_id,
            full_name=cipher.seal("full_name", full_name),
            birth_date=cipher.seal_optional("birth_date",
                                            birth_date.isoformat() if birth_date else None),
            sex=cipher.seal_optional("sex", sex), phone=cipher.seal_optional("phone", phone),
            address=cipher.seal_optional("address", address)))

    async def register(self, session: AsyncSession, request: RegisterRequest) -> CreatedAccount:
        """A new patient, their sealed profile and their first consents (all false unless the
        body sets them)."""
        problem = password_problem(request.password, request.email)
        if problem:
            raise WeakPassword(f"The password {problem}.")
        # Hashed before the transaction begins (`db/phases.py`): no lock is held meanwhile.
        password_hash = await self.passwords.hash(request.password)
        await self._email_free(session, request.email)
        user = self._new_user(session, request.email, Role.PATIENT, password_hash)
        await session.flush()
        self._new_patient_profile(session, user, request.full_name, request.birth_date,
                                  request.sex, request.phone, request.address)
        choices = request.consents or ConsentChoices()
        session.add(Consent(id=uuid.uuid4(), patient_id=user.id, version=1,
                            marketing=choices.marketing,
                            data_sharing=choices.data_sharing, analytics=choices.analytics,
                            consent_date=utcnow()))
        actor = Actor(user.id, Role.PATIENT)
        audit.record(session, Action.CREATE_USER, actor=actor, resource_type="user",
                     resource_id=user.id, patient_id=user.id, metadata={"role": "patient"})
        audit.record(session, Action.CONSENT_CHANGED, actor=actor, resource_type="consent",
                     patient_id=user.id, metadata={
                         "marketing": choices.marketing, "data_sharing": choices.data_sharing,
                         "analytics": choices.analytics})
        return CreatedAccount(user, request.email)

    async def create_staff(self, session: AsyncSession, request: CreateStaff, *,
                           creator: uuid.UUID | None = None,
                           approval: bool = False) -> CreatedAccount:
        """A staff account with no password, created by the admin `creator`.

        Without `approval`, the answer's one-time setup token (valid 72 h, stored hashed) lets
        the new user choose their password, so the admin never knows it. With `approval`, the
        account is `pending` and has no token yet: `approve_staff` by another admin makes it."""
        if request.specialty is not None and request.role != "doctor":
            raise Conflict("Only doctors have a specialty.")
        await self._email_free(session, request.email)
        user = self._new_user(session, request.email, request.role, None)
        user.created_by = creator
        token = None
        if approval:
            user.status = PENDING
        else:
            token = self._new_setup_token(user)
        await session.flush()
        session.add(StaffProfile(user_id=user.id, full_name=request.full_name,
                                 specialty=request.specialty))
        audit.record(session, Action.CREATE_USER, resource_type="user", resource_id=user.id,
                     metadata={"role": request.role, "status": user.status})
        return CreatedAccount(user, request.email, token)

    @staticmethod
    def _new_setup_token(user: User) -> str:
        token = new_opaque_token()
        user.setup_token_hash = token_digest(token)
        user.setup_expires_at = utcnow() + timedelta(hours=SETUP_TOKEN_HOURS)
        return token

    async def approve_staff(self, session: AsyncSession, approver: uuid.UUID,
                            user_id: uuid.UUID, outbox: Outbox | None) -> SetupInvitation | None:
        """A second admin approves a pending staff account: it becomes `active` and gets its
        one-time setup token (valid 72 h from now). With an `outbox` (mail configured) the
        token is mailed to the account's own address once this commits, and None returned;
        without, the token is returned for the approving admin to hand over.

        The admin who created the account may never approve it (`Forbidden`, audited as
        `ACCESS_DENIED`); an account that is not pending is a `Conflict`."""
        user = await self._account_unless_created_by(session, user_id, approver,
                                                     "creator_cannot_approve")
        if user.status != PENDING:
            raise Conflict("Only a pending account can be approved.")
        token = new_opaque_token()
        expires_at = utcnow() + timedelta(hours=SETUP_TOKEN_HOURS)
        # Exactly one approval, even against a concurrent one by a third admin.
        claimed = await session.execute(
            update(User).where(User.id == user.id, User.status == PENDING)
            .values(status="active", setup_token_hash=token_digest(token),
                    setup_expires_at=expires_at)
            .execution_options(synchronize_session=False))
        if int(claimed.rowcount) != 1:  # type: ignore[attr-defined]
            raise Conflict("Only a pending account can be approved.")
        await session.refresh(user)
        audit.record(session, Action.APPROVE_USER, resource_type="user", resource_id=user.id,
                     metadata={"role": user.role,
                               "delivery": "mail" if outbox is not None else "answer"})
        return await self._hand_over(session, user, token, expires_at, outbox)

    async def renew_invitation(self, session: AsyncSession, admin: uuid.UUID,
                               user_id: uuid.UUID, outbox: Outbox | None, *,
                               approval: bool) -> SetupInvitation | None:
        """A new one-time setup token (valid 72 h) for an active staff account whose owner has
        not chosen a password yet: an invitation that could not be mailed, was lost, or ran
        out. The previous token dies. It goes as `approve_staff`'s does (mailed, or returned).

        With staff `approval` on, the account's creator may not renew it (`Forbidden`, as for
        approving). An account that is pending (approve it), has a password, or is not active
        is a `Conflict`: a renewal never reopens an account someone already holds."""
        user = await self._account_unless_created_by(
            session, user_id, admin if approval else None, "creator_cannot_invite")
        token = new_opaque_token()
        expires_at = utcnow() + timedelta(hours=SETUP_TOKEN_HOURS)
        # Checked in the write itself: a password chosen meanwhile (a concurrent redeem) wins.
        claimed = await session.execute(
            update(User).where(User.id == user.id, User.status == "active",
                               User.role.in_(STAFF_ROLES), User.password_hash.is_(None))
            .values(setup_token_hash=token_digest(token), setup_expires_at=expires_at)
            .execution_options(synchronize_session=False))
        if int(claimed.rowcount) != 1:  # type: ignore[attr-defined]
            raise Conflict("Only an active staff account whose owner has not chosen a password "
                           "yet gets a new invitation.")
        await session.refresh(user)
        audit.record(session, Action.RENEW_SETUP_TOKEN, resource_type="user",
                     resource_id=user.id,
                     metadata={"role": user.role,
                               "delivery": "mail" if outbox is not None else "answer"})
        return await self._hand_over(session, user, token, expires_at, outbox)

    async def _account_unless_created_by(self, session: AsyncSession, user_id: uuid.UUID,
                                         not_by: uuid.UUID | None, reason: str) -> User:
        """The account, unless it is unknown (`NotFound`) or was created by `not_by`
        (`Forbidden`, audited as `ACCESS_DENIED` with `reason`)."""
        user = await session.get(User, user_id)
        if user is None:
            raise NotFound()
        if not_by is not None and user.created_by == not_by:
            audit.record(session, Action.ACCESS_DENIED, outcome=Outcome.DENIED,
                         resource_type="user", resource_id=user.id, metadata={"reason": reason})
            raise Forbidden("The admin who created an account cannot approve it or hand out "
                            "its setup token: another admin must.")
        return user

    async def _hand_over(self, session: AsyncSession, user: User, token: str,
                         expires_at: datetime, outbox: Outbox | None) -> SetupInvitation | None:
        """Mail the setup token to the account's own address once the work commits, or, with
        no mail, return it for the calling admin to hand over."""
        if outbox is None:
            return SetupInvitation(setup_token=token, setup_expires_at=expires_at)
        email = (await user_cipher(session, self.envelope, user)).open("email",
                                                                       user.email or b"")
        outbox.post(invitation(user.id, email, user.role, token, expires_at))
        return None

    async def create_with_password(self, session: AsyncSession, email: str, role: str,
                                   full_name: str, specialty: str | None,
                                   password: str) -> User:
        """For `phivault users create` (the first admin): the operator types the password."""
        problem = password_problem(password, email)
        if problem:
            raise WeakPassword(f"The password {problem}.")
        password_hash = await self.passwords.hash(password)  # before the transaction begins
        await self._email_free(session, email)
        user = self._new_user(session, email, role, password_hash)
        await session.flush()
        if role == Role.PATIENT:
            self._new_patient_profile(session, user, full_name)
            session.add(Consent(id=uuid.uuid4(), patient_id=user.id, version=1, marketing=False,
                                data_sharing=False, analytics=False, consent_date=utcnow()))
        else:
            session.add(StaffProfile(user_id=user.id, full_name=full_name, specialty=specialty))
        audit.record(session, Action.CREATE_USER, resource_type="user", resource_id=user.id,
                     metadata={"role": role, "via": "cli"})
        return user

    async def redeem_setup(self, session: AsyncSession, token: str, password: str) -> None:
        now = utcnow()
        async with reads_only(session):
            user = (await session.execute(select(User).where(
                User.setup_token_hash == token_digest(token)))).scalar_one_or_none()
            if (user is None or user.setup_expires_at is None or now >= user.setup_expires_at
                    or user.status != "active"):
                raise InvalidToken("The setup token is unknown, used or expired.")
            email = (await user_cipher(session, self.envelope, user)).open("email",
                                                                           user.email or b"")
        problem = password_problem(password, email)
        if problem:
            raise WeakPassword(f"The password {problem}.")
        password_hash = await self.passwords.hash(password)  # no transaction open meanwhile
        # Redeem exactly once, even against a concurrent redeem of the same token.
        claimed = await session.execute(
            update(User).where(User.id == user.id, User.setup_token_hash == token_digest(token),
                               User.status == "active")
            .values(setup_token_hash=None, setup_expires_at=None)
            .execution_options(synchronize_session=False))
        if int(claimed.rowcount) != 1:  # type: ignore[attr-defined]
            raise InvalidToken("The setup token is unknown, used or expired.")
        user.password_hash = password_hash
        user.password_changed_at = now
        audit.record(session, Action.ACCOUNT_SETUP, actor=Actor(user.id, user.role),
                     resource_type="user", resource_id=user.id)

    async def import_users(self, session: AsyncSession, lines: Iterable[str]) -> ImportReport:
        """Users from another system: one JSON object a line with `email`, `role`,
        `full_name` and a bcrypt `password_hash`. They sign in with their old password and
        are moved to argon2id then. Bad lines and taken emails are skipped, not fatal."""
        imported, problems = 0, []
        seen: set[bytes] = set()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            problem = await self._import_one(session, line, seen)
            if problem:
                problems.append(f"line {number}: {problem}")
            else:
                imported += 1
        audit.record(session, Action.IMPORT_USERS,
                     metadata={"imported": imported, "skipped": len(problems)})
        return ImportReport(imported, len(problems), problems)

    async def _import_one(self, session: AsyncSession, line: str, seen: set[bytes]) -> str | None:
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            return "not JSON"
        if not isinstance(item, dict) or set(item) != {"email", "role", "full_name",
                                                       "password_hash"}:
            return "needs exactly email, role, full_name and password_hash"
        email, role, name, hashed = (item["email"], item["role"], item["full_name"],
                                     item["password_hash"])
        if not all(isinstance(v, str) for v in (email, role, name, hashed)):
            return "every field must be a string"
        if role not in {r.value for r in Role}:
            return "unknown role"
        if "@" not in email or not 3 <= len(email) <= 254 or not 1 <= len(name.strip()) <= 200:
            return "bad email or full_name"
        if not is_bcrypt_hash(hashed):
            return "password_hash is not a bcrypt hash"
        lookup = email_lookup(self.blind_index, email)
        taken = (await session.execute(select(User.id).where(
            User.email_index.in_(email_lookups(self.blind_index, email))).limit(1))
                 ).scalar_one_or_none()
        if taken is not None or lookup in seen:
            return "email already registered"
        seen.add(lookup)
        user = self._new_user(session, email.strip(), role, hashed)
        await session.flush()
        if role == Role.PATIENT:
            self._new_patient_profile(session, user, name.strip())
            session.add(Consent(id=uuid.uuid4(), patient_id=user.id, version=1, marketing=False,
                                data_sharing=False, analytics=False, consent_date=utcnow()))
        else:
            session.add(StaffProfile(user_id=user.id, full_name=name.strip(), specialty=None))
        return None

    async def has_active_admin(self, session: AsyncSession) -> bool:
        """Whether any admin account is active (`phivault init` hints at the first one until
        then). Reads no PHI, so it records no event."""
        found = await session.execute(select(User.id).where(
            User.role == Role.ADMIN, User.status == "active").limit(1))
        return found.first() is not None

    async def list_users(self, session: AsyncSession, limit: int,
                         offset: int) -> tuple[list[UserView], int]:
        users, total = await fetch_page(session, select(User).order_by(User.created_at, User.id),
                                        limit, offset)
        views = [await self._view(session, user) for user in users]
        audit.record(session, Action.VIEW_USERS, resource_type="user",
                     metadata={"count": len(views), "offset": offset})
        return views, total

    async def _view(self, session: AsyncSession, user: User) -> UserView:
        email = None
        if user.email is not None:
            email = (await user_cipher(session, self.envelope, user)).open("email", user.email)
        return UserView(id=user.id, email=email, role=user.role, status=user.status,
                        created_at=user.created_at)

    async def update_user(self, session: AsyncSession, admin_id: uuid.UUID, user_id: uuid.UUID,
                          role: str | None, status: str | None) -> UserView:
        """Re-role (among staff roles) or disable/re-enable. Either revokes every session of
        the user, so no token with the old role or status lives on."""
        user = await session.get(User, user_id)
        if user is None:
            raise NotFound()
        if user.status == "deleted":
            raise Conflict("An erased account cannot be changed.")
        if user.id == admin_id:
            raise Conflict("You cannot change your own role or status.")
        if role is not None and role != user.role and user.role == Role.PATIENT:
            raise Conflict("A patient account cannot become a staff account.")
        if status is not None and status != user.status and user.status == PENDING:
            raise Conflict("A pending account becomes active only when a second admin "
                           "approves it (POST /users/{id}/approve).")
        changed: dict[str, str] = {}
        if role is not None and role != user.role:
            changed["role"] = role
            user.role = role
        if status is not None and status != user.status:
            changed["status"] = status
            user.status = status
        if changed:
            revoked = await revoke_sessions(session, AuthSession.user_id == user.id)
            audit.record(session, Action.UPDATE_USER, resource_type="user", resource_id=user.id,
                         metadata={**changed, "sessions_revoked": revoked})
        else:
            # Nothing changed, but the answer still discloses the account (its email).
            audit.record(session, Action.UPDATE_USER, resource_type="user", resource_id=user.id,
                         metadata={"changed": False})
        return await self._view(session, user)

    async def end_sessions(self, session: AsyncSession, user_id: uuid.UUID) -> None:
        if await session.get(User, user_id) is None:
            raise NotFound()
        revoked = await revoke_sessions(session, AuthSession.user_id == user_id)
        audit.record(session, Action.SESSION_REVOKED, resource_type="user", resource_id=user_id,
                     metadata={"sessions_revoked": revoked})

    async def doctors(self, session: AsyncSession, limit: int,
                      offset: int) -> tuple[list[DoctorView], int]:
        where = (User.role == Role.DOCTOR, User.status == "active")
        total = int((await session.execute(
            select(func.count()).select_from(User).where(*where))).scalar_one())
        rows = (await session.execute(
            select(User.id, StaffProfile.full_name, StaffProfile.specialty)
            .join(StaffProfile, StaffProfile.user_id == User.id).where(*where)
            .order_by(StaffProfile.full_name, User.id).limit(limit).offset(offset))).all()
        return [DoctorView(id=i, full_name=n, specialty=s) for i, n, s in rows], total

    async def me(self, session: AsyncSession, user_id: uuid.UUID, *,
                 record_view: bool = True) -> Me:
        """The caller's account and profile. `record_view=False` when the answer follows a
        change the caller just made (rectification), which has its own event."""
        user = await session.get(User, user_id)
        if user is None:
            raise InvalidToken()
        view = await self._view(session, user)
        me = Me(id=user.id, email=view.email, role=user.role, status=user.status,
                mfa_enabled=user.totp_enabled, created_at=user.created_at)
        if user.role == Role.PATIENT:
            profile = await session.get(PatientProfile, user.id)
            if profile is not None:
                cipher = await row_cipher(session, self.envelope, "patient_profiles", user.id,
                                          profile.data_key_id)
                birth = cipher.open_optional("birth_date", profile.birth_date)
                me = me.model_copy(update={
                    "full_name": cipher.open_optional("full_name", profile.full_name),
                    "birth_date": date.fromisoformat(birth) if birth else None,
                    "sex": cipher.open_optional("sex", profile.sex),
                    "phone": cipher.open_optional("phone", profile.phone),
                    "address": cipher.open_optional("address", profile.address)})
            if record_view:
                audit.record(session, Action.VIEW_PROFILE, resource_type="patient_profile",
                             resource_id=user.id, patient_id=user.id)
        else:
            staff = await session.get(StaffProfile, user.id)
            if staff is not None:
                me = me.model_copy(update={"full_name": staff.full_name,
                                           "specialty": staff.specialty})
        return me


async def account_email(session: AsyncSession, envelope: Envelope,
                        user_id: uuid.UUID) -> str | None:
    """The account's email, opened (PHI: only to mail its owner), or None when the account is
    unknown or erased."""
    user = await session.get(User, user_id)
    if user is None or user.email is None:
        return None
    return (await user_cipher(session, envelope, user)).open("email", user.email)
