"""Blind indexes: per-column HKDF keys, HMAC-SHA256 digests, email normalisation."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from phivault.crypto import KeyFormatError
from phivault.crypto.blind_index import BlindIndex, normalise_email
from phivault.crypto.keys import b64url_encode

INDEX_KEY = bytes(range(32))


def _expected(table: str, column: str, value: str) -> bytes:
    info = b"phivault/blind-index/v1/" + table.encode() + b"/" + column.encode()
    column_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(INDEX_KEY)
    return hmac.new(column_key, value.encode(), hashlib.sha256).digest()


def test_digest_matches_an_independent_construction() -> None:
    index = BlindIndex(INDEX_KEY)
    digest = index.digest("users", "email", "ada@example.org")
    assert digest == _expected("users", "email", "ada@example.org")
    assert len(digest) == 32
    assert index.digest("users", "email", "ada@example.org") == digest  # cached key, same answer


def test_columns_never_share_a_key() -> None:
    index = BlindIndex(INDEX_KEY)
    value = "ada@example.org"
    digests = {
        index.digest("users", "email", value),
        index.digest("users", "email2", value),
        index.digest("patients", "email", value),
        index.digest("users", "email", value + " "),
    }
    assert len(digests) == 4
    assert BlindIndex(bytes(32)).digest("users", "email", value) not in digests


def test_email_normalisation() -> None:
    assert normalise_email("  Ada.Lovelace@Example.ORG \n") == "ada.lovelace@example.org"
    index = BlindIndex(INDEX_KEY)
    assert index.digest_email("users", "email", " ADA@example.org") == index.digest(
        "users", "email", "ada@example.org"
    )


@pytest.mark.parametrize(("table", "column"), [("a/b", "c"), ("a", "b/c"), ("", "c"), ("a", "")])
def test_ambiguous_names_are_refused(table: str, column: str) -> None:
    with pytest.raises(ValueError, match="no '/'"):
        BlindIndex(INDEX_KEY).digest(table, column, "x")


def test_wrong_key_length_is_refused() -> None:
    with pytest.raises(KeyFormatError, match="must be 32 bytes, got 16"):
        BlindIndex(bytes(16))


def test_repr_is_masked() -> None:
    index = BlindIndex(INDEX_KEY)
    assert repr(index) == "BlindIndex(index_key=<masked>)"
    assert b64url_encode(INDEX_KEY) not in repr(index) and INDEX_KEY.hex() not in str(index)
