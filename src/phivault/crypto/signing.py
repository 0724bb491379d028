"""Ed25519 keys that sign access tokens, parsed from `PHIVAULT_JWT_KEYS`, and their public JWKs."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from phivault.crypto.keys import (
    KeyFormatError,
    b64url_encode,
    is_dev_key,
    is_dev_key_id,
    parse_key_ring,
)

_PEM_BLOCK_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


@dataclass(frozen=True)
class SigningKey:
    """One token-signing key: its `kid` (JWS header) and Ed25519 private key (never in a repr)."""

    kid: str
    private_key: Ed25519PrivateKey = field(repr=False, compare=False)
    is_dev: bool = False

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public half, which verifies this key's signatures."""
        return self.private_key.public_key()

    def public_jwk(self) -> dict[str, str]:
        """The public key as a JWK (RFC 8037) for `/.well-known/jwks.json`."""
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _public_x(self.public_key),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        }


def _public_x(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b64url_encode(raw)


def jwk_thumbprint(public_key: Ed25519PublicKey) -> str:
    """The RFC 7638 thumbprint of an Ed25519 public key: base64url(SHA-256(canonical JWK))."""
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _public_x(public_key)},
        separators=(",", ":"),
        sort_keys=True,
    )
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


def _seed(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _parse_pem_keys(text: str) -> list[SigningKey]:
    keys: list[SigningKey] = []
    for position, match in enumerate(_PEM_BLOCK_RE.finditer(text), start=1):
        if match.group(1) != "PRIVATE KEY":
            raise KeyFormatError(
                f"PEM block {position} is {match.group(1)!r}; expected an unencrypted PKCS#8 "
                "'PRIVATE KEY'"
            )
        try:
            private_key = serialization.load_pem_private_key(
                match.group(0).encode("ascii"), password=None
            )
        except (ValueError, TypeError, UnsupportedAlgorithm, UnicodeEncodeError):
            raise KeyFormatError(f"PEM block {position} is not a readable private key") from None
        if not isinstance(private_key, Ed25519PrivateKey):
            raise KeyFormatError(f"PEM block {position} is not an Ed25519 key")
        kid = jwk_thumbprint(private_key.public_key())
        keys.append(SigningKey(kid, private_key, is_dev_key(_seed(private_key))))
    leftover = _PEM_BLOCK_RE.sub("", text)
    if leftover.replace(",", "").strip():
        raise KeyFormatError("text outside the PEM blocks; give only PEM keys or only id:base64url")
    return keys


def parse_jwt_keys(text: str) -> list[SigningKey]:
    """Parse `PHIVAULT_JWT_KEYS`; the first key signs, all of them verify.

    Accepts either comma-separated `kid:base64url(raw 32-byte Ed25519 seed)` lines, or one or more
    concatenated unencrypted PKCS#8 PEM `PRIVATE KEY` blocks (commas between them tolerated), whose
    kid is the RFC 7638 JWK thumbprint. A key is dev if its seed is dev-marked or its kid starts
    with `dev-`.

    Raises:
        KeyFormatError: on malformed text, a non-Ed25519 or encrypted PEM key, a duplicate kid, or
            no key at all; the message never contains key material.
    """
    if "-----BEGIN" in text:
        keys = _parse_pem_keys(text)
    else:
        keys = [
            SigningKey(
                kid,
                Ed25519PrivateKey.from_private_bytes(seed),
                is_dev_key(seed) or is_dev_key_id(kid),
            )
            for kid, seed in parse_key_ring(text)
        ]
    if not keys:
        raise KeyFormatError("no key given")
    kids = [key.kid for key in keys]
    for kid in kids:
        if kids.count(kid) > 1:
            raise KeyFormatError(f"duplicate key id {kid!r}")
    return keys
