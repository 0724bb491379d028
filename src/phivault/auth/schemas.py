"""Request and response models of the auth, session and user-administration routes."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, StringConstraints

from phivault.schemas import (
    SINGLE_LINE,
    BirthDate,
    Email,
    Name,
    Password,
    RequestModel,
    examples,
)

Sex = Literal["female", "male", "other", "unknown"]
StaffRole = Literal["doctor", "admin", "auditor"]
Phone = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=40,
                                         pattern=r"^[0-9+().\- ]+$")]
Address = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500),
                    SINGLE_LINE]
OpaqueToken = Annotated[str, StringConstraints(min_length=16, max_length=128,
                                               pattern=r"^[A-Za-z0-9_-]+$")]
TotpCode = Annotated[str, StringConstraints(min_length=6, max_length=6, pattern=r"^[0-9]{6}$")]
Specialty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                             max_length=100), SINGLE_LINE]


class ConsentChoices(RequestModel):
    model_config = examples({"marketing": False, "data_sharing": True, "analytics": False})

    marketing: bool = False
    data_sharing: bool = False
    analytics: bool = False


class RegisterRequest(RequestModel):
    model_config = examples({
        "email": "alex.example@example.org", "password": "a long example passphrase",
        "full_name": "Alex Example", "birth_date": "1980-01-31", "sex": "unknown",
        "phone": "+44 20 7946 0000", "address": "1 Example Street, Exampleton",
        "consents": {"marketing": False, "data_sharing": True, "analytics": False}})

    email: Email
    password: Password
    full_name: Name
    birth_date: BirthDate | None = None
    sex: Sex | None = None
    phone: Phone | None = None
    address: Address | None = None
    consents: ConsentChoices | None = None


class RegisterAnswer(BaseModel):
    id: uuid.UUID
    email: str
    role: str


class LoginRequest(RequestModel):
    model_config = examples({
        "email": "alex.example@example.org", "password": "a long example passphrase",
        "totp_code": "123456"})

    email: Email
    password: Password
    totp_code: TotpCode | None = None


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth token type, not a secret
    expires_in: int


class RefreshRequest(RequestModel):
    model_config = examples({"refresh_token": "EXAMPLE-refresh-token-not-a-real-one_0123456789"})

    refresh_token: OpaqueToken


class SetupRequest(RequestModel):
    model_config = examples({
        "setup_token": "EXAMPLE-setup-token-not-a-real-one_0123456789",
        "password": "a long example passphrase"})

    setup_token: OpaqueToken
    password: Password


class PasswordChange(RequestModel):
    model_config = examples({
        "current_password": "a long example passphrase",
        "new_password": "another long example passphrase"})

    current_password: Password
    new_password: Password


class MfaSetupRequest(RequestModel):
    model_config = examples({"password": "a long example passphrase"})

    password: Password


class MfaSetupAnswer(BaseModel):
    secret: str
    otpauth_uri: str


class MfaEnableRequest(RequestModel):
    model_config = examples({"code": "123456"})

    code: TotpCode


class SessionView(BaseModel):
    id: uuid.UUID
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    ip: str | None
    user_agent: str | None
    current: bool


class Me(BaseModel):
    """The caller's own account. Patients see their profile; staff their directory entry."""

    id: uuid.UUID
    email: str | None
    role: str
    status: str
    mfa_enabled: bool
    created_at: datetime
    full_name: str | None = None
    specialty: str | None = None
    birth_date: date | None = None
    sex: str | None = None
    phone: str | None = None
    address: str | None = None


class ProfileRectification(RequestModel):
    """`PATCH /me` (SPEC §9, GDPR article 16): any of these fields; at least one. `phone`,
    `address` and `birth_date` may be sent as null to remove them; the name may not."""

    model_config = examples({"phone": "+44 20 7946 0001", "address": None})

    full_name: Name | None = None
    phone: Phone | None = None
    address: Address | None = None
    birth_date: BirthDate | None = None


class ErasureRequest(RequestModel):
    """`DELETE /me`: the current password again, so that a stolen access token alone cannot
    erase an account."""

    model_config = examples({"password": "a long example passphrase"})

    password: Password


class CreateStaff(RequestModel):
    model_config = examples({
        "email": "dr.sam.sample@clinic.example", "full_name": "Dr Sam Sample", "role": "doctor",
        "specialty": "General practice"})

    email: Email
    full_name: Name
    role: StaffRole
    specialty: Specialty | None = None


class CreatedStaff(BaseModel):
    """`setup_token` and `setup_expires_at` are null when staff approval is on (SPEC §6): the
    account is `pending`, and its setup token is made only when a second admin approves it."""

    id: uuid.UUID
    email: str
    role: str
    setup_token: str | None
    setup_expires_at: datetime | None


class SetupInvitation(BaseModel):
    """A staff account's one-time setup token, handed to the admin who approved the account
    when no mail is configured, for them to give to its owner (never to its creator)."""

    setup_token: str
    setup_expires_at: datetime


class UserView(BaseModel):
    id: uuid.UUID
    email: str | None
    role: str
    status: str
    created_at: datetime


class UpdateUser(RequestModel):
    model_config = examples({"status": "disabled"})

    role: StaffRole | None = None
    status: Literal["active", "disabled"] | None = None


class DoctorView(BaseModel):
    id: uuid.UUID
    full_name: str
    specialty: str | None
