"""Password rules (NIST SP 800-63B-4) and hashing (argon2id; legacy bcrypt verified, then moved).

Hashing runs in worker threads, at most one per core at a time, so a login storm queues for the
CPU instead of blocking the event loop or exhausting memory (argon2id takes `m` KiB per hash).
"""

from __future__ import annotations

import asyncio
import os
import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from importlib import resources

import bcrypt
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 15
MAX_LENGTH = 128
BCRYPT_HASH = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
# Words that make a password guessable in this service's own context.
CONTEXT_WORDS = ("phivault",)


def normalise(password: str) -> str:
    """NFKC, as SP 800-63B asks, so that one password has one form whatever the keyboard."""
    return unicodedata.normalize("NFKC", password)


@cache
def common_passwords() -> frozenset[str]:
    text = resources.files("phivault.auth").joinpath("data/common-passwords.txt").read_text(
        encoding="utf-8")
    return frozenset(line for line in text.splitlines() if line and not line.startswith("#"))


def password_problem(password: str, email: str | None = None) -> str | None:
    """Why `password` is refused, or None. Length 15 to 128 characters, not a common or breached
    password (or one repeated), not the email's local part, no composition rules."""
    password = normalise(password)
    if len(password) < MIN_LENGTH:
        return f"must be at least {MIN_LENGTH} characters"
    if len(password) > MAX_LENGTH:
        return f"must be at most {MAX_LENGTH} characters"
    lowered = password.lower()
    if len(set(lowered)) == 1:
        return "must not be one character repeated"
    common = common_passwords()
    if lowered in common or _is_repetition_of_common(lowered, common):
        return "is too common: it appears in lists of breached passwords"
    if email:
        local = email.split("@", 1)[0].strip().lower()
        # A local part of one or two letters would refuse half of all passwords.
        if len(local) >= 3 and local in lowered:
            return "must not contain your email address"
    if any(word in lowered for word in CONTEXT_WORDS):
        return "must not contain the service's name"
    return None


def _is_repetition_of_common(lowered: str, common: frozenset[str]) -> bool:
    for size in range(1, len(lowered) // 2 + 1):
        if len(lowered) % size == 0:
            unit = lowered[:size]
            if unit * (len(lowered) // size) == lowered and (size < 4 or unit in common):
                return True
    return False


@dataclass(frozen=True)
class Argon2Parameters:
    memory_kib: int
    time_cost: int
    parallelism: int


class Passwords:
    """argon2id hashing and verification, off the event loop."""

    def __init__(self, params: Argon2Parameters, concurrency: int | None = None) -> None:
        self._hasher = PasswordHasher(time_cost=params.time_cost, memory_cost=params.memory_kib,
                                      parallelism=params.parallelism, type=Type.ID)
        # At most one hash per core but one: a login storm leaves a core to every other request
        # (bench/login_storm_bench.py: on 2 cores, reads during a storm went from about 120 to
        # 220 req/s and their p99 from about 130 to 90 ms; logins from 11 to 7 per second).
        self._slots = asyncio.Semaphore(concurrency or max(1, (os.cpu_count() or 2) - 1))
        self._dummy: str | None = None

    async def _run(self, fn: object, *args: object) -> object:
        async with self._slots:
            return await asyncio.to_thread(fn, *args)  # type: ignore[arg-type]

    async def hash(self, password: str) -> str:
        result = await self._run(self._hasher.hash, normalise(password))
        assert isinstance(result, str)  # noqa: S101 - argon2 returns the encoded hash
        return result

    async def verify(self, stored: str | None, password: str) -> bool:
        """True when `password` matches `stored` (argon2id, or a legacy bcrypt hash). A missing
        hash (unknown account, or staff before setup) is checked against a dummy hash, so that
        the answer takes about as long either way."""
        if stored is None:
            await self._run(self._verify_argon2, await self._dummy_hash(), password)
            return False
        if stored.startswith("$2"):
            return bool(await self._run(_verify_bcrypt, stored, password))
        return bool(await self._run(self._verify_argon2, stored, password))

    def needs_rehash(self, stored: str) -> bool:
        """A legacy bcrypt hash, or an argon2 hash with other (weaker) parameters."""
        if stored.startswith("$2"):
            return True
        try:
            return self._hasher.check_needs_rehash(stored)
        except InvalidHashError:
            return True

    def _verify_argon2(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, normalise(password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = await self.hash(os.urandom(16).hex())
        return self._dummy


def _verify_bcrypt(stored: str, password: str) -> bool:
    # Legacy systems hashed at most 72 bytes (bcrypt's limit) and ignored the rest.
    try:
        return bcrypt.checkpw(normalise(password).encode()[:72], stored.encode())
    except ValueError:
        return False


def is_bcrypt_hash(value: str) -> bool:
    return bool(BCRYPT_HASH.match(value))
