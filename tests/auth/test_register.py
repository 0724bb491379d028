"""Patient registration: strict body, password rules, taken emails, encrypted profile."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from phivault.privacy.models import Consent
from phivault.runtime import Runtime
from tests.conftest import client_for
from tests.factories import PASSWORD, new_email
from tests.storage import raw_storage


def body(**overrides: object) -> dict[str, object]:
    values: dict[str, object] = {"email": new_email("pat"), "password": PASSWORD,
                                 "full_name": "Jane Roe"}
    values.update(overrides)
    return values


async def test_register_then_login_then_me(client: httpx.AsyncClient) -> None:
    request = body(birth_date="1984-02-29", sex="female", phone="+33 6 12 34 56 78",
                   address="12 rue de la Paix, Paris")
    created = await client.post("/api/v1/auth/register", json=request)
    assert created.status_code == 201, created.text
    answer = created.json()
    assert set(answer) == {"id", "email", "role"}
    assert answer["email"] == request["email"] and answer["role"] == "patient"
    assert created.headers["cache-control"] == "no-store"

    login = await client.post("/api/v1/auth/login", json={"email": request["email"],
                                                          "password": PASSWORD})
    assert login.status_code == 200
    me = await client.get("/api/v1/me", headers={
        "Authorization": f"Bearer {login.json()['access_token']}"})
    assert me.status_code == 200
    profile = me.json()
    assert profile["full_name"] == "Jane Roe" and profile["birth_date"] == "1984-02-29"
    assert profile["sex"] == "female" and profile["phone"] == "+33 6 12 34 56 78"
    assert profile["mfa_enabled"] is False and profile["role"] == "patient"


async def test_consents_start_false_unless_set(client: httpx.AsyncClient,
                                               runtime: Runtime) -> None:
    plain = (await client.post("/api/v1/auth/register", json=body())).json()
    chosen = (await client.post("/api/v1/auth/register", json=body(
        consents={"data_sharing": True, "analytics": True}))).json()
    async with runtime.sessions() as session:
        for answer, expected in ((plain, (False, False, False)), (chosen, (False, True, True))):
            consent = (await session.execute(select(Consent).where(
                Consent.patient_id == uuid.UUID(answer["id"])))).scalar_one()
            assert (consent.marketing, consent.data_sharing, consent.analytics) == expected


async def test_taken_email_is_409_whatever_its_case(client: httpx.AsyncClient) -> None:
    email = new_email("taken")
    assert (await client.post("/api/v1/auth/register", json=body(email=email))).status_code == 201
    again = await client.post("/api/v1/auth/register",
                              json=body(email=f"  {email.upper()} "))
    assert again.status_code == 409
    assert again.json()["error"] == "email_taken"


@pytest.mark.parametrize("password, reason", [
    ("fourteen chars", "at least 15"),
    ("x" * 129, "at most 128"),
    ("aaaaaaaaaaaaaaaaaaaa", "repeated"),
    ("passwordpassword", "too common"),
    ("1234567812345678", "too common"),
    ("abcabcabcabcabcabc", "too common"),
    ("janedoe-rules-the-world", "email"),
    ("my phivault password!", "service"),
])
async def test_weak_passwords_are_422_without_echo(client: httpx.AsyncClient, password: str,
                                                   reason: str) -> None:
    # Every one of these is refused, so the address is never taken.
    response = await client.post("/api/v1/auth/register", json=body(
        email="janedoe@clinic.example", password=password))
    assert response.status_code == 422
    assert response.json()["error"] == "weak_password"
    assert reason in response.json()["detail"]
    assert password not in response.text


@pytest.mark.parametrize("password", [
    "fifteen chars!!", ("The quick brown fox jumps over the lazy dog. " * 3)[:128],
    "Ünïcødé pass phrase 🙂🙂", "  spaces count too  ",
    "correct horse battery staple",
])
async def test_any_characters_are_fine(client: httpx.AsyncClient, password: str) -> None:
    response = await client.post("/api/v1/auth/register", json=body(password=password))
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("changes", [
    {"role": "admin"}, {"is_admin": True}, {"email": 7}, {"full_name": ""},
    {"full_name": "x" * 201}, {"birth_date": "1984-02-30"}, {"birth_date": 449366400},
    {"sex": "yes"}, {"phone": "call me"}, {"consents": {"marketing": "true"}},
    {"consents": {"marketing": 1}}, {"email": "not-an-email"}, {"password": "p" * 2000},
])
async def test_bad_bodies_are_422(client: httpx.AsyncClient, changes: dict[str, object]) -> None:
    response = await client.post("/api/v1/auth/register", json=body(**changes))
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error"


async def test_profile_and_email_are_never_stored_in_plaintext(
        fresh_runtime: Callable[..., Any], tmp_path: Path) -> None:
    rt = await fresh_runtime()
    canaries = {"email": "canary.q7zx@example.org", "full_name": "Canaryname Q7zx",
                "phone": "+1 555 0199 7788", "address": "77 Canary Q7zx Street"}
    async with client_for(rt) as c:
        response = await c.post("/api/v1/auth/register", json=body(
            **canaries, birth_date="1931-07-14", sex="other"))
        assert response.status_code == 201
        await c.post("/api/v1/auth/login", json={"email": canaries["email"],
                                                 "password": PASSWORD})
    storage = await raw_storage(rt, tmp_path)
    for value in [*canaries.values(), "1931-07-14", "canary.q7zx"]:
        assert value.encode() not in storage, value
