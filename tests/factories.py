"""Users, sessions and tokens for tests, made through the real services (so they are audited
and encrypted like any other), so a test reads as its scenario."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field

from phivault.runtime import Runtime

PASSWORD = "correct horse battery staple 42"


@dataclass
class TestUser:
    __test__ = False  # not a pytest test class

    id: uuid.UUID
    email: str
    password: str
    role: str
    access_token: str = ""
    refresh_token: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


def new_email(prefix: str = "user") -> str:
    return f"{prefix}.{secrets.token_hex(6)}@clinic.example"


async def make_user(rt: Runtime, role: str = "patient", *, email: str | None = None,
                    password: str = PASSWORD, full_name: str = "Test Person",
                    specialty: str | None = None) -> TestUser:
    email = email or new_email(role)
    async with rt.unit_of_work() as session:
        user = await rt.accounts.create_with_password(session, email, role, full_name,
                                                      specialty, password)
    return TestUser(user.id, email, password, role)


async def sign_in(rt: Runtime, user: TestUser, totp_code: str | None = None) -> TestUser:
    async with rt.unit_of_work() as session:
        tokens = await rt.authenticator.login(session, user.email, user.password, totp_code)
    user.access_token, user.refresh_token = tokens.access_token, tokens.refresh_token
    return user


async def signed_in(rt: Runtime, role: str = "patient", **kwargs: object) -> TestUser:
    """A new user of `role` with a live session."""
    return await sign_in(rt, await make_user(rt, role, **kwargs))  # type: ignore[arg-type]


async def bearer(rt: Runtime, role: str) -> dict[str, str]:
    """Authorization headers of a new, signed-in user of `role`."""
    return (await signed_in(rt, role)).headers
