"""Key material formats: base64url keys, key lines and rings, dev marks, key ids."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from phivault.crypto import KeyFormatError
from phivault.crypto.keys import (
    KEY_BYTES,
    KEY_ID_RE,
    KeyKind,
    b64url_encode,
    decode_key,
    generate_key,
    generate_key_line,
    is_dev_key,
    is_dev_key_id,
    new_key_id,
    parse_key_ring,
    parse_keyed_line,
)

RAW = bytes(range(32))
UNPADDED = base64.urlsafe_b64encode(RAW).decode().rstrip("=")


def test_b64url_encode_has_no_padding_and_round_trips() -> None:
    assert b64url_encode(RAW) == UNPADDED
    assert "=" not in UNPADDED and len(UNPADDED) == 43
    assert decode_key(b64url_encode(RAW)) == RAW


@pytest.mark.parametrize("text", [UNPADDED, UNPADDED + "=", f"  {UNPADDED}\n", f"\t{UNPADDED}=\n"])
def test_decode_key_accepts_padding_and_surrounding_whitespace(text: str) -> None:
    assert decode_key(text) == RAW


def test_decode_key_refuses_the_standard_alphabet() -> None:
    raw = bytes([0xFB, 0xFF] * 16)
    standard = base64.b64encode(raw).decode()
    assert "+" in standard or "/" in standard
    with pytest.raises(KeyFormatError, match="^not base64url$"):
        decode_key(standard)
    assert decode_key(base64.urlsafe_b64encode(raw).decode()) == raw


@pytest.mark.parametrize(
    "text",
    [
        UNPADDED + "==",  # wrong padding
        UNPADDED[:20] + " " + UNPADDED[20:],  # inner whitespace
        UNPADDED[:-1] + "!",
        UNPADDED[:-1] + "B",  # non-canonical: unused trailing bits set
        "A",
        "=",
    ],
)
def test_decode_key_refuses_malformed_text(text: str) -> None:
    with pytest.raises(KeyFormatError, match="^not base64url$"):
        decode_key(text)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_decode_key_refuses_wrong_lengths(size: int) -> None:
    with pytest.raises(KeyFormatError, match=f"^must decode to 32 bytes, got {size}$"):
        decode_key(b64url_encode(bytes(size)))


def test_parse_keyed_line() -> None:
    assert parse_keyed_line(f" mk-1:{UNPADDED} ") == ("mk-1", RAW)
    assert parse_keyed_line(f"a.b_c-D9:{UNPADDED}=") == ("a.b_c-D9", RAW)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (UNPADDED, "expected id:base64url"),
        (f":{UNPADDED}", "key id must be"),
        (f"bad id:{UNPADDED}", "key id must be"),
        (f"{'x' * 65}:{UNPADDED}", "key id must be"),
        (f"mk-1:{b64url_encode(bytes(31))}", "must decode to 32 bytes, got 31"),
        ("mk-1:not*base64", "not base64url"),
    ],
)
def test_parse_keyed_line_refuses(text: str, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message) as caught:
        parse_keyed_line(text)
    assert UNPADDED[:10] not in str(caught.value)


def test_parse_key_ring_keeps_order() -> None:
    other = generate_key()
    ring = parse_key_ring(f"new:{b64url_encode(other)}, old:{UNPADDED}")
    assert ring == [("new", other), ("old", RAW)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no key given"),
        ("   ", "no key given"),
        (f"a:{UNPADDED},", "item 2 is empty"),
        (f"a:{UNPADDED},,b:{UNPADDED}", "item 2 is empty"),
        (f"a:{UNPADDED},a:{b64url_encode(bytes(range(32, 64)))}", "item 2: duplicate key id 'a'"),
        (f"a:{UNPADDED},b:short", "item 2: key 'b': not base64url"),
    ],
)
def test_parse_key_ring_refuses(text: str, message: str) -> None:
    with pytest.raises(KeyFormatError, match=re.escape(message)) as caught:
        parse_key_ring(text)
    assert UNPADDED not in str(caught.value)


def test_key_format_error_is_a_value_error() -> None:
    assert issubclass(KeyFormatError, ValueError)


def test_generated_keys_are_random_32_bytes() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(len(key) == KEY_BYTES for key in keys)


def test_dev_keys_carry_the_documented_mark() -> None:
    key = generate_key(dev=True)
    assert len(key) == KEY_BYTES
    expected = hmac.new(b"phivault dev key marker v1", key[:24], hashlib.sha256).digest()[:8]
    assert key[24:] == expected
    assert is_dev_key(key)
    assert generate_key(dev=True)[:24] != key[:24]


def test_normal_and_tampered_keys_are_not_dev() -> None:
    assert not any(is_dev_key(generate_key()) for _ in range(1000))
    key = bytearray(generate_key(dev=True))
    key[0] ^= 1
    assert not is_dev_key(bytes(key))
    assert not is_dev_key(generate_key(dev=True)[:31])


@pytest.mark.parametrize(("kind", "prefix"), [(KeyKind.MASTER, "mk"), (KeyKind.JWT, "jk")])
def test_new_key_id(kind: KeyKind, prefix: str) -> None:
    key_id = new_key_id(kind)
    assert re.fullmatch(rf"{prefix}-20\d{{6}}-[0-9a-f]{{6}}", key_id)
    assert KEY_ID_RE.fullmatch(key_id)
    assert not is_dev_key_id(key_id)
    dev_id = new_key_id(kind, dev=True)
    assert dev_id.startswith(f"dev-{prefix}-") and KEY_ID_RE.fullmatch(dev_id)
    assert is_dev_key_id(dev_id)


@pytest.mark.parametrize("dev", [False, True])
def test_generate_key_line(dev: bool) -> None:
    for kind in (KeyKind.MASTER, KeyKind.JWT):
        key_id, raw = parse_keyed_line(generate_key_line(kind, dev=dev))
        assert is_dev_key(raw) is dev
        assert is_dev_key_id(key_id) is dev
    for kind in (KeyKind.INDEX, KeyKind.AUDIT):
        line = generate_key_line(kind, dev=dev)
        assert ":" not in line
        assert is_dev_key(decode_key(line)) is dev
