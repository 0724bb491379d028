"""Text formats of phivault's key material: base64url keys, `id:key` lines, key rings, key ids.

Also generates keys, including dev-marked keys that `PHIVAULT_ENV=prod` recognises and refuses.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import secrets
from datetime import UTC, datetime
from enum import StrEnum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_B64URL_BODY_RE = re.compile(r"[A-Za-z0-9_-]*")
_DEV_MARKER_KEY = b"phivault dev key marker v1"
_DEV_RANDOM_BYTES = 24
_DEV_TAG_BYTES = KEY_BYTES - _DEV_RANDOM_BYTES
_DEV_ID_PREFIX = "dev-"


class KeyFormatError(ValueError):
    """A key, key line or key ring is malformed; the message never contains key material."""


class KeyKind(StrEnum):
    """The kinds of key that phivault's configuration holds."""

    MASTER = "master"
    INDEX = "index"
    AUDIT = "audit"
    JWT = "jwt"
    AUDIT_SIGNING = "audit-signing"  # Ed25519 seed that signs audit checkpoints


_ID_PREFIX = {
    KeyKind.MASTER: "mk",
    KeyKind.INDEX: "ik",
    KeyKind.AUDIT: "ak",
    KeyKind.JWT: "jk",
    KeyKind.AUDIT_SIGNING: "ck",
}
# The kinds written `id:base64url`; the others are bare base64url.
KEYED_KINDS = frozenset({KeyKind.MASTER, KeyKind.JWT, KeyKind.AUDIT_SIGNING})


def b64url_encode(raw: bytes) -> str:
    """Encode bytes as base64url without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_key(text: str) -> bytes:
    """Decode one base64url key of exactly 32 bytes.

    Surrounding whitespace is ignored and correct `=` padding is accepted. The standard alphabet
    (`+`, `/`), inner whitespace, wrong padding and non-canonical encodings are refused.

    Raises:
        KeyFormatError: "not base64url" or "must decode to 32 bytes, got N".
    """
    body = text.strip()
    unpadded = body.rstrip("=")
    padding = len(body) - len(unpadded)
    if (
        not _B64URL_BODY_RE.fullmatch(unpadded)
        or len(unpadded) % 4 == 1
        or (padding and (padding > 2 or (len(unpadded) + padding) % 4))
    ):
        raise KeyFormatError("not base64url")
    try:
        raw = base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except (binascii.Error, ValueError):
        raise KeyFormatError("not base64url") from None
    # Unused trailing bits must be zero, so that each key has exactly one spelling.
    if b64url_encode(raw) != unpadded:
        raise KeyFormatError("not base64url")
    if len(raw) != KEY_BYTES:
        raise KeyFormatError(f"must decode to {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def parse_keyed_line(text: str) -> tuple[str, bytes]:
    """Parse one `id:base64url` key line into `(key_id, raw_key)`.

    Raises:
        KeyFormatError: when the colon is missing, the id does not match `KEY_ID_RE`, or the key
            is not 32 bytes of base64url.
    """
    key_id, colon, encoded = text.strip().partition(":")
    if not colon:
        raise KeyFormatError("expected id:base64url")
    # The id is not echoed: a mangled line might carry key material in that position.
    if not KEY_ID_RE.fullmatch(key_id):
        raise KeyFormatError("key id must be 1 to 64 characters of A-Z a-z 0-9 _ . -")
    try:
        raw = decode_key(encoded)
    except KeyFormatError as exc:
        raise KeyFormatError(f"key {key_id!r}: {exc}") from None
    return key_id, raw


def parse_key_ring(text: str) -> list[tuple[str, bytes]]:
    """Parse comma-separated `id:base64url` lines, keeping their order (the first is active).

    Raises:
        KeyFormatError: on an empty list, a blank item, a duplicate id or a malformed item; the
            message names the item's position (1-based).
    """
    items = text.split(",")
    ring: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    for position, item in enumerate(items, start=1):
        if not item.strip():
            if len(items) == 1:
                raise KeyFormatError("no key given")
            raise KeyFormatError(f"item {position} is empty")
        try:
            key_id, raw = parse_keyed_line(item)
        except KeyFormatError as exc:
            raise KeyFormatError(f"item {position}: {exc}") from None
        if key_id in seen:
            raise KeyFormatError(f"item {position}: duplicate key id {key_id!r}")
        seen.add(key_id)
        ring.append((key_id, raw))
    return ring


def _dev_tag(random_part: bytes) -> bytes:
    mac = crypto_hmac.HMAC(_DEV_MARKER_KEY, hashes.SHA256())
    mac.update(random_part)
    return mac.finalize()[:_DEV_TAG_BYTES]


def generate_key(*, dev: bool = False) -> bytes:
    """Return a new random 32-byte key; with `dev=True`, a dev-marked one.

    A dev-marked key is 24 random bytes followed by an 8-byte tag,
    HMAC-SHA256(b"phivault dev key marker v1", those 24 bytes)[:8]. The mark is a guard against
    copying a development instance's keys into production (`PHIVAULT_ENV=prod` refuses them); it
    is not a security boundary. A dev key keeps 192 random bits, and a normal random key carries
    the mark by accident with probability 2^-64.
    """
    if not dev:
        return os.urandom(KEY_BYTES)
    random_part = os.urandom(_DEV_RANDOM_BYTES)
    return random_part + _dev_tag(random_part)


def is_dev_key(raw: bytes) -> bool:
    """Tell whether a 32-byte key carries the dev mark of `generate_key(dev=True)`."""
    if len(raw) != KEY_BYTES:
        return False
    return hmac.compare_digest(raw[_DEV_RANDOM_BYTES:], _dev_tag(raw[:_DEV_RANDOM_BYTES]))


def is_dev_key_id(key_id: str) -> bool:
    """Tell whether a key id was made by `new_key_id(..., dev=True)`."""
    return key_id.startswith(_DEV_ID_PREFIX)


def new_key_id(kind: KeyKind, *, dev: bool = False) -> str:
    """Return a fresh key id such as `mk-20261123-9f3a1c` (`dev-mk-...` for a dev key).

    The prefix names the kind (mk master, jk jwt, ik index, ak audit, ck audit-signing, for
    checkpoints), then the UTC date and 6 random hex digits.
    """
    key_id = f"{_ID_PREFIX[kind]}-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"
    return _DEV_ID_PREFIX + key_id if dev else key_id


def generate_key_line(kind: KeyKind, *, dev: bool = False) -> str:
    """Return a new key as configuration text.

    Master, JWT and audit-signing keys are `id:base64url` (JWT and audit-signing keys are raw
    32-byte Ed25519 private seeds); index and audit keys are bare base64url.
    """
    encoded = b64url_encode(generate_key(dev=dev))
    if kind in KEYED_KINDS:
        return f"{new_key_id(kind, dev=dev)}:{encoded}"
    return encoded


def derive_key(root: bytes, purpose: str) -> bytes:
    """A 32-byte key for one `purpose`, derived from `root` with HKDF-SHA256 (info
    `phivault/derived/v1/<purpose>`), so one configured secret serves several uses without
    any two of them sharing a key."""
    info = b"phivault/derived/v1/" + purpose.encode("ascii")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(root)
