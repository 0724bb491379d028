"""Shared fixtures for the crypto tests: fixed-id master key rings and an envelope over them."""

from __future__ import annotations

import pytest

from phivault.crypto.envelope import Envelope, MasterKeyRing
from phivault.crypto.keys import generate_key

OLD_KEK_ID = "mk-20250101-000001"
NEW_KEK_ID = "mk-20261123-9f3a1c"


@pytest.fixture(scope="session")
def old_kek() -> bytes:
    return generate_key()


@pytest.fixture(scope="session")
def new_kek() -> bytes:
    return generate_key()


@pytest.fixture(scope="session")
def old_envelope(old_kek: bytes) -> Envelope:
    """An envelope whose ring holds only the old KEK (the state before a rotation)."""
    return Envelope(MasterKeyRing([(OLD_KEK_ID, old_kek)]))


@pytest.fixture(scope="session")
def envelope(old_kek: bytes, new_kek: bytes) -> Envelope:
    """An envelope after a rotation: the new KEK is active, the old one still decrypts."""
    return Envelope(MasterKeyRing([(NEW_KEK_ID, new_kek), (OLD_KEK_ID, old_kek)]))
