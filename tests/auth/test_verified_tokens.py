"""Access tokens that passed verification are remembered by their exact text (auth/tokens.py):
a remembered token still expires, and no other text borrows its verdict."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from phivault.auth import tokens as tokens_module
from phivault.auth.tokens import LEEWAY_SECONDS, AccessTokens
from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.crypto.signing import parse_jwt_keys
from phivault.errors import InvalidToken


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def _tokens(clock: Clock) -> AccessTokens:
    return AccessTokens(parse_jwt_keys(generate_key_line(KeyKind.JWT)), 900, clock)


def test_a_remembered_token_still_expires() -> None:
    clock = Clock()
    tokens = _tokens(clock)
    user, session = uuid.uuid4(), uuid.uuid4()
    token = tokens.issue(user, "doctor", session)
    first = tokens.verify(token)
    assert tokens.verify(token) is first  # remembered
    clock.now += timedelta(seconds=900 + LEEWAY_SECONDS - 1)
    assert tokens.verify(token) == first
    clock.now += timedelta(seconds=1)
    with pytest.raises(InvalidToken):
        tokens.verify(token)
    with pytest.raises(InvalidToken):  # and forgotten: the full check refuses it too
        tokens.verify(token)


def test_only_the_exact_text_is_remembered() -> None:
    tokens = _tokens(Clock())
    token = tokens.issue(uuid.uuid4(), "patient", uuid.uuid4())
    tokens.verify(token)
    header, claims, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    for other in (f"{header}.{claims}.{flipped}", token + " ", token[:-1]):
        with pytest.raises(InvalidToken):
            tokens.verify(other)
    # A token of another key ring (another deployment) is no match for ours.
    with pytest.raises(InvalidToken):
        tokens.verify(_tokens(Clock()).issue(uuid.uuid4(), "patient", uuid.uuid4()))


def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens_module, "VERIFIED_CACHE_SIZE", 8)
    clock = Clock()
    tokens = _tokens(clock)
    issued = [tokens.issue(uuid.uuid4(), "patient", uuid.uuid4()) for _ in range(20)]
    for token in issued:
        tokens.verify(token)
        assert len(tokens._verified) <= 8
    for token in issued:  # forgetting costs a full check, never an answer
        assert tokens.verify(token).role == "patient"
