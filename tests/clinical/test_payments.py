"""Payments (SPEC §4, §10): an amount in integer minor units, a currency code and a provider
reference, nothing else; no card data is ever accepted (nor a card number in the reference)."""

from __future__ import annotations

import random
import uuid
from typing import Any

import httpx
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from phivault.clinical.consultations import _looks_like_card_number
from phivault.clinical.models import Payment
from phivault.runtime import Runtime
from tests.clinical.world import API, book, expect
from tests.factories import TestUser, signed_in

VALID = {"amount": 4500, "currency": "EUR", "provider_reference": "pi_3MtwBwLkdIwHu7ix28a3tqPa"}


def luhn_complete(body: str) -> str:
    """`body` plus the Luhn check digit."""
    total = 0
    for i, char in enumerate(reversed(body)):
        digit = int(char)
        if i % 2 == 0:  # these are doubled once the check digit is appended
            digit = digit * 2 - 9 if digit * 2 > 9 else digit * 2
        total += digit
    return body + str((10 - total % 10) % 10)


def luhn_number(length: int, seed: int = 0) -> str:
    rng = random.Random(seed * 100 + length)
    return luhn_complete("".join(rng.choice("0123456789") for _ in range(length - 1)))


def test_the_luhn_helper_makes_known_card_numbers() -> None:
    assert luhn_complete("411111111111111") == "4111111111111111"
    assert luhn_complete("37828224631000") == "378282246310005"


@given(st.integers(13, 19).flatmap(
    lambda n: st.text("0123456789", min_size=n - 1, max_size=n - 1)))
def test_every_luhn_valid_13_to_19_digit_number_is_a_card_number(body: str) -> None:
    number = luhn_complete(body)
    assert _looks_like_card_number(number)
    grouped = "-".join(number[i:i + 4] for i in range(0, len(number), 4))
    assert _looks_like_card_number(grouped)


@given(st.integers(13, 19).flatmap(
    lambda n: st.text("0123456789", min_size=n - 1, max_size=n - 1)))
def test_a_card_number_inside_a_reference_is_found(body: str) -> None:
    assert _looks_like_card_number(f"pi_{luhn_complete(body)}_x")


async def consultation_of(client: httpx.AsyncClient, runtime: Runtime) -> tuple[
        TestUser, TestUser, str]:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    return patient, doctor, (await book(client, patient, doctor))["id"]


async def pay(client: httpx.AsyncClient, user: TestUser, consultation_id: object,
              body: dict[str, Any]) -> httpx.Response:
    return await client.post(f"{API}/consultations/{consultation_id}/payments",
                             headers=user.headers, json=body)


async def test_a_payment_is_recorded_and_listed(client: httpx.AsyncClient,
                                                runtime: Runtime) -> None:
    patient, _doctor, consultation = await consultation_of(client, runtime)
    created = expect(await pay(client, patient, consultation, VALID), 201)
    assert created["amount"] == 4500 and created["currency"] == "EUR"
    assert created["provider_reference"] == VALID["provider_reference"]
    assert created["consultation_id"] == consultation
    assert created["patient_id"] == str(patient.id) and created["status"] == "pending"
    listing = await client.get(f"{API}/me/payments", headers=patient.headers)
    assert [p["id"] for p in expect(listing, 200)] == [created["id"]]
    assert listing.headers["x-total-count"] == "1"


ACCEPTED = [
    {**VALID, "amount": 1},
    {**VALID, "amount": 100_000_000},
    {**VALID, "currency": "JPY", "amount": 500},
    {**VALID, "provider_reference": "4111111111111112"},  # 16 digits, Luhn-invalid
    {**VALID, "provider_reference": luhn_number(12)},  # too short for a card
    {**VALID, "provider_reference": luhn_number(20)},  # too long for a card
    {**VALID, "provider_reference": "ord-2031-000017"},
]

REFUSED: list[dict[str, Any]] = [
    # Card data in any field of its own.
    {**VALID, "card_number": "4111111111111111"},
    {**VALID, "cvv": "123"},
    {**VALID, "cvc": "123"},
    {**VALID, "expiry": "12/34"},
    {**VALID, "card": {"number": "4111111111111111", "exp_month": 12}},
    {**VALID, "pan": "4111111111111111"},
    {**VALID, "status": "paid"},
    # A card number where the provider reference belongs.
    {**VALID, "provider_reference": "4111111111111111"},
    {**VALID, "provider_reference": "4111-1111-1111-1111"},
    {**VALID, "provider_reference": "378282246310005"},
    {**VALID, "provider_reference": "4222222222222"},
    *({**VALID, "provider_reference": luhn_number(n, seed)} for n in range(13, 20)
      for seed in range(2)),
    # Amounts: strict integers in minor units, 1 to 100,000,000.
    {**VALID, "amount": "12"},
    {**VALID, "amount": 12.5},
    {**VALID, "amount": 12.0},
    {**VALID, "amount": True},
    {**VALID, "amount": None},
    {**VALID, "amount": 0},
    {**VALID, "amount": -100},
    {**VALID, "amount": 100_000_001},
    {k: v for k, v in VALID.items() if k != "amount"},
    # Currencies: three capital letters.
    {**VALID, "currency": "eur"},
    {**VALID, "currency": "EU"},
    {**VALID, "currency": "EURO"},
    {**VALID, "currency": "E1R"},
    {**VALID, "currency": ""},
    {**VALID, "currency": "EUR\n"},
    {k: v for k, v in VALID.items() if k != "currency"},
    # Provider references: present, bounded, plain.
    {k: v for k, v in VALID.items() if k != "provider_reference"},
    {**VALID, "provider_reference": ""},
    {**VALID, "provider_reference": "x" * 129},
    {**VALID, "provider_reference": "ref with spaces"},
    {**VALID, "provider_reference": 4111111111111111},
]


async def test_payment_bodies_accepted_and_refused(client: httpx.AsyncClient,
                                                   runtime: Runtime) -> None:
    patient, _doctor, consultation = await consultation_of(client, runtime)
    wrong = []
    for body in ACCEPTED:
        response = await pay(client, patient, consultation, body)
        if response.status_code != 201:
            wrong.append(f"refused {body}: {response.status_code} {response.text[:200]}")
    for body in REFUSED:
        response = await pay(client, patient, consultation, body)
        if response.status_code != 422:
            wrong.append(f"accepted {body}: {response.status_code}")
        elif "4111111111111111" in response.text or "1111-1111" in response.text:
            wrong.append(f"the 422 echoes the card number: {response.text}")
    assert wrong == [], "\n".join(wrong)
    async with runtime.sessions() as session:
        stored = (await session.execute(select(Payment.provider_reference).where(
            Payment.patient_id == patient.id))).scalars().all()
    assert sorted(stored) == sorted(b["provider_reference"] for b in ACCEPTED)


async def test_only_the_patient_of_the_consultation_pays(client: httpx.AsyncClient,
                                                         runtime: Runtime) -> None:
    patient, doctor, consultation = await consultation_of(client, runtime)
    other = await signed_in(runtime, "patient")
    expect(await pay(client, other, consultation, VALID), 404, "not_found")
    expect(await pay(client, other, uuid.uuid4(), VALID), 404, "not_found")
    expect(await pay(client, doctor, consultation, VALID), 403, "forbidden")
    expect(await pay(client, await signed_in(runtime, "admin"), consultation, VALID), 403,
           "forbidden")
    listing = await client.get(f"{API}/me/payments", headers=other.headers)
    assert expect(listing, 200) == [] and listing.headers["x-total-count"] == "0"
    expect(await pay(client, patient, consultation, VALID), 201)
