"""Password rules and hashing, as units."""

from __future__ import annotations

import bcrypt
import pytest

from phivault.auth.passwords import (
    Argon2Parameters,
    Passwords,
    common_passwords,
    is_bcrypt_hash,
    normalise,
    password_problem,
)


def test_bundled_list_holds_at_least_the_10000_most_common() -> None:
    common = common_passwords()
    assert len(common) >= 10_000
    for password in ("123456", "password", "qwerty", "iloveyou", "dragon"):
        assert password in common


@pytest.mark.parametrize("password, email, problem", [
    ("a" * 14, None, "at least 15"),
    ("a" * 129, None, "at most 128"),
    ("q" * 20, None, "repeated"),
    ("Password" * 2, None, "too common"),
    ("ILOVEYOUILOVEYOU", None, "too common"),
    ("the jsmith secret phrase", "jsmith@example.org", "email"),
    ("the JSMITH secret phrase", "JSmith@example.org", "email"),
])
def test_refused(password: str, email: str | None, problem: str) -> None:
    reason = password_problem(password, email)
    assert reason is not None and problem in reason and password not in reason


@pytest.mark.parametrize("password, email", [
    ("fifteen chars!!", None),
    ("a short local part: js", "js@example.org"),  # 2-letter local parts are not checked
    ("日本語のパスワードはとても長い", None),
    ("tab\tand\nnewline are fine ok", None),
])
def test_accepted(password: str, email: str | None) -> None:
    assert password_problem(password, email) is None


def test_normalisation_makes_one_form() -> None:
    composed, decomposed = "caf\u00e9 au lait please", "cafe\u0301 au lait please"
    assert normalise(composed) == normalise(decomposed)


async def test_hash_verify_and_rehash_detection() -> None:
    cheap = Passwords(Argon2Parameters(8, 1, 1))
    strong = Passwords(Argon2Parameters(64, 2, 1))
    stored = await cheap.hash("cafe\u0301 au lait please")
    assert stored.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert await cheap.verify(stored, "caf\u00e9 au lait please")  # NFKC both ways
    assert not await cheap.verify(stored, "cafe au lait please")
    assert not cheap.needs_rehash(stored) and strong.needs_rehash(stored)
    assert not await cheap.verify(None, "anything at all here")
    assert not await cheap.verify("garbage", "anything at all here")
    assert cheap.needs_rehash("garbage")


async def test_bcrypt_legacy() -> None:
    passwords = Passwords(Argon2Parameters(8, 1, 1))
    legacy = bcrypt.hashpw(b"an old legacy password", bcrypt.gensalt(rounds=4)).decode()
    assert is_bcrypt_hash(legacy) and not is_bcrypt_hash("$2b$10$short")
    assert await passwords.verify(legacy, "an old legacy password")
    assert not await passwords.verify(legacy, "an old legacy passwore")
    assert passwords.needs_rehash(legacy)
    assert not await passwords.verify("$2b$04$" + "x" * 53, "whatever it is here")
