"""The routes about accounts: registration and set-up, MFA, the caller's own account, sessions,
consents, export and erasure, user administration, and the public routes outside `/api/v1`.

Login, refresh and logout are not here: they keep the session's tokens, so each client writes
them out (`sync.py`, `aio.py`).
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any, Literal

from phivault.client.models import (
    ConsentView,
    CreatedStaff,
    DoctorView,
    ExportFormat,
    Health,
    Me,
    MfaSetupAnswer,
    Page,
    RegisterAnswer,
    SessionView,
    SetupInvitation,
    Sex,
    StaffRole,
    UserView,
)
from phivault.client.routes import (
    API,
    UNSET,
    Call,
    body,
    endpoint,
    instant,
    json_object,
    nothing,
    one,
    one_or_none,
    page,
    paging,
    text,
    with_nulls,
)

Id = uuid.UUID | str


class AccountEndpoints:
    """Mixed into both clients; each attribute is a `Route` (see `routes.py`)."""

    # Public routes of /auth.

    @endpoint("POST", f"{API}/auth/register")
    @staticmethod
    def register(email: str, password: str, full_name: str, *, birth_date: date | None = None,
                 sex: Sex | None = None, phone: str | None = None, address: str | None = None,
                 consents: dict[str, bool] | None = None) -> Call[RegisterAnswer]:
        """Register a patient (staff come from `create_staff`). 409 `EmailTaken`, 422
        `WeakPassword`. Does not sign in: call `login` next."""
        return Call(one(RegisterAnswer), auth="none", json=body(
            email=email, password=password, full_name=full_name,
            birth_date=birth_date.isoformat() if birth_date else None, sex=sex, phone=phone,
            address=address, consents=consents))

    @endpoint("POST", f"{API}/auth/setup")
    @staticmethod
    def setup_account(setup_token: str, password: str) -> Call[None]:
        """A new staff member redeems their one-time `setup_token` with the password they
        choose. Does not sign in."""
        return Call(nothing, auth="none",
                    json={"setup_token": setup_token, "password": password})

    # MFA and password: the caller's session, or for MFA an enrolment token.

    @endpoint("POST", f"{API}/auth/mfa/setup")
    @staticmethod
    def start_mfa(password: str, *, enrollment_token: str | None = None
                  ) -> Call[MfaSetupAnswer]:
        """A new TOTP secret and its `otpauth://` URI. `enrollment_token`: the one from
        `MfaEnrollmentRequired`, for a role that must enrol before it gets a session."""
        return Call(one(MfaSetupAnswer), json={"password": password}, bearer=enrollment_token)

    @endpoint("POST", f"{API}/auth/mfa/enable")
    @staticmethod
    def enable_mfa(code: str, *, enrollment_token: str | None = None) -> Call[None]:
        """Turns TOTP on with a current code. Every session of the account ends (this client
        forgets its tokens): log in again with `totp_code`."""
        return Call(nothing, json={"code": code}, bearer=enrollment_token, ends_session=True)

    @endpoint("POST", f"{API}/auth/password")
    @staticmethod
    def change_password(current_password: str, new_password: str) -> Call[None]:
        """Every session of the account ends, this one included: log in again."""
        return Call(nothing, ends_session=True, json={
            "current_password": current_password, "new_password": new_password})

    # The caller's own account.

    @endpoint("GET", f"{API}/me")
    @staticmethod
    def me() -> Call[Me]:
        """The caller's account; a patient's includes their profile (and the read is audited)."""
        return Call(one(Me))

    @endpoint("PATCH", f"{API}/me")
    @staticmethod
    def update_me(*, full_name: str = UNSET, phone: str | None = UNSET,
                  address: str | None = UNSET, birth_date: date | None = UNSET) -> Call[Me]:
        """Rectify the patient's profile: only the fields given change; `phone`, `address` and
        `birth_date` given as None are removed."""
        iso = birth_date.isoformat() if isinstance(birth_date, date) else birth_date
        return Call(one(Me), json=with_nulls(full_name=full_name, phone=phone, address=address,
                                             birth_date=iso))

    @endpoint("DELETE", f"{API}/me")
    @staticmethod
    def erase_me(password: str) -> Call[None]:
        """Erase the patient's account (GDPR article 17), after the password again. Final."""
        return Call(nothing, json={"password": password}, ends_session=True)

    @endpoint("GET", f"{API}/me/sessions")
    @staticmethod
    def my_sessions() -> Call[Page[SessionView]]:
        """The account's live sessions; `current` marks this client's."""
        return Call(page(SessionView))

    @endpoint("DELETE", f"{API}/me/sessions/{{session_id}}")
    @staticmethod
    def end_my_session(session_id: Id) -> Call[None]:
        """End one of the caller's own sessions (see `my_sessions`)."""
        return Call(nothing, path_values={"session_id": session_id})

    @endpoint("GET", f"{API}/me/export")
    @staticmethod
    def export_my_data(format: ExportFormat = "json") -> Call[dict[str, Any]]:
        """Everything phivault holds about the patient: `json`, or a FHIR R4 Bundle (`fhir`);
        read up to the client's `max_export_bytes` (64 MiB by default)."""
        return Call(json_object, params={"format": format}, large_answer=True)

    @endpoint("GET", f"{API}/me/consents")
    @staticmethod
    def consents(at: datetime | None = None) -> Call[ConsentView]:
        """The patient's current consents, or those in force at `at` (an aware time)."""
        when = instant(at)
        return Call(one(ConsentView), params={"at": when} if when else None)

    @endpoint("PUT", f"{API}/me/consents")
    @staticmethod
    def set_consents(*, marketing: bool, data_sharing: bool, analytics: bool
                     ) -> Call[ConsentView]:
        """A new version of the consents (all three). Withdrawing `data_sharing` closes the
        chart to doctors at once."""
        return Call(one(ConsentView), json={"marketing": marketing,
                                            "data_sharing": data_sharing,
                                            "analytics": analytics})

    @endpoint("GET", f"{API}/me/consents/history")
    @staticmethod
    def consent_history() -> Call[Page[ConsentView]]:
        """Every version of the patient's consents."""
        return Call(page(ConsentView))

    # User administration (admins) and the doctor directory.

    @endpoint("POST", f"{API}/users")
    @staticmethod
    def create_staff(email: str, full_name: str, role: StaffRole, *,
                     specialty: str | None = None) -> Call[CreatedStaff]:
        """A doctor, admin or auditor; hand `setup_token` to them (null while the account
        waits for a second admin's approval)."""
        return Call(one(CreatedStaff), json=body(email=email, full_name=full_name, role=role,
                                                 specialty=specialty))

    @endpoint("GET", f"{API}/users")
    @staticmethod
    def list_users(*, limit: int | None = None, offset: int | None = None
                   ) -> Call[Page[UserView]]:
        """Admins: every account (id, email, role, status), no PHI."""
        return Call(page(UserView), params=paging(limit, offset))

    @endpoint("POST", f"{API}/users/{{user_id}}/approve")
    @staticmethod
    def approve_staff(user_id: Id) -> Call[SetupInvitation | None]:
        """A second admin approves a pending staff account: the setup token, or None when the
        server mailed it."""
        return Call(one_or_none(SetupInvitation), path_values={"user_id": user_id})

    @endpoint("POST", f"{API}/users/{{user_id}}/invitation")
    @staticmethod
    def renew_invitation(user_id: Id) -> Call[SetupInvitation | None]:
        """A fresh setup token for staff who have not chosen a password yet (None: mailed)."""
        return Call(one_or_none(SetupInvitation), path_values={"user_id": user_id})

    @endpoint("PATCH", f"{API}/users/{{user_id}}")
    @staticmethod
    def update_user(user_id: Id, *, role: StaffRole | None = None,
                    status: Literal["active", "disabled"] | None = None) -> Call[UserView]:
        """Change a staff member's role, or `status` to `active` or `disabled`."""
        return Call(one(UserView), path_values={"user_id": user_id},
                    json=body(role=role, status=status))

    @endpoint("DELETE", f"{API}/users/{{user_id}}/sessions")
    @staticmethod
    def end_user_sessions(user_id: Id) -> Call[None]:
        """Admins: end every session of a user at once."""
        return Call(nothing, path_values={"user_id": user_id})

    @endpoint("GET", f"{API}/doctors")
    @staticmethod
    def list_doctors(*, limit: int | None = None, offset: int | None = None
                     ) -> Call[Page[DoctorView]]:
        """The doctor directory (id, name, specialty), for booking."""
        return Call(page(DoctorView), params=paging(limit, offset))

    # Outside /api/v1: public, no session.

    @endpoint("GET", "/healthz")
    @staticmethod
    def healthz() -> Call[Health]:
        """Liveness: `ok` while the process is up."""
        return Call(one(Health), auth="none")

    @endpoint("GET", "/readyz")
    @staticmethod
    def readyz() -> Call[Health]:
        """`ready`, or `NotReady` when the database does not answer."""
        return Call(one(Health), auth="none")

    @endpoint("GET", "/metrics")
    @staticmethod
    def metrics(metrics_token: str | None = None) -> Call[str]:
        """Prometheus text: from the server's own host, or with `PHIVAULT_METRICS_TOKEN`."""
        return Call(text, auth="none", bearer=metrics_token)

    @endpoint("GET", "/.well-known/jwks.json")
    @staticmethod
    def jwks() -> Call[dict[str, Any]]:
        """The public keys that verify access tokens (a JWK Set)."""
        return Call(json_object, auth="none")

    @endpoint("GET", "/.well-known/audit-key.json")
    @staticmethod
    def audit_key() -> Call[dict[str, Any]]:
        """The public keys that verify audit checkpoints (a JWK Set)."""
        return Call(json_object, auth="none")

    @endpoint("GET", "/openapi.json")
    @staticmethod
    def openapi() -> Call[dict[str, Any]]:
        """The OpenAPI document of the server's API."""
        return Call(json_object, auth="none")


__all__ = ["AccountEndpoints", "Id"]
