"""Ed25519 signatures over audit checkpoints, with the keys of `PHIVAULT_AUDIT_SIGNING_KEY`.

The variable holds `kid:base64url(32-byte Ed25519 seed)`; several, comma-separated, during a
rotation: the first signs, every one verifies, and all are published as a JWK Set at
`/.well-known/audit-key.json`. The recipe signs `CONTEXT || message`, so that a signature made
for a checkpoint can never pass for one over anything else under the same key.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature

from phivault.crypto.keys import KeyFormatError, b64url_encode
from phivault.crypto.signing import SigningKey, parse_jwt_keys

CONTEXT = b"phivault audit checkpoint v1\x00"
SIGNATURE_BYTES = 64


class CheckpointSignatureError(Exception):
    """A checkpoint's signature is not one of ours: its key id is unknown, or it does not
    verify. `str()` says which, in one line."""


def parse_audit_signing_keys(text: str) -> list[SigningKey]:
    """Parse `PHIVAULT_AUDIT_SIGNING_KEY`: comma-separated `kid:base64url(32-byte seed)`.

    A key is dev when its seed is dev-marked or its kid starts with `dev-`.

    Raises:
        KeyFormatError: on malformed text, a duplicate kid, or no key; the message never
            contains key material.
    """
    if "-----BEGIN" in text:
        raise KeyFormatError("expected kid:base64url(32-byte Ed25519 seed), not PEM")
    return parse_jwt_keys(text)


@dataclass(frozen=True)
class CheckpointSigner:
    """Signs with the first key, verifies with any."""

    keys: tuple[SigningKey, ...] = field(repr=False)

    @property
    def key_id(self) -> str:
        return self.keys[0].kid

    def sign(self, message: bytes) -> bytes:
        return self.keys[0].private_key.sign(CONTEXT + message)

    def verify(self, key_id: str, message: bytes, signature: bytes) -> None:
        """Raise `CheckpointSignatureError` unless `signature` is `key_id`'s over `message`."""
        key = next((k for k in self.keys if k.kid == key_id), None)
        if key is None:
            raise CheckpointSignatureError(
                f"key id {key_id!r} is not in PHIVAULT_AUDIT_SIGNING_KEY")
        try:
            key.public_key.verify(signature, CONTEXT + message)
        except InvalidSignature:
            raise CheckpointSignatureError("the signature does not verify") from None

    def jwks(self) -> dict[str, Any]:
        """The public keys as a JWK Set (RFC 7517, RFC 8037)."""
        return {"keys": [key.public_jwk() for key in self.keys]}


def encode_signature(signature: bytes) -> str:
    return b64url_encode(signature)


def decode_signature(text: str) -> bytes:
    """A base64url signature (padding optional) of exactly 64 bytes, else `ValueError`."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("signature: not base64url") from None
    if len(raw) != SIGNATURE_BYTES or b64url_encode(raw) != text.rstrip("="):
        raise ValueError(f"signature: must be {SIGNATURE_BYTES} bytes of base64url")
    return raw
