"""Keyed pseudonyms: stable stand-ins for ids in de-identified data sets, HMAC-SHA256 under a key
derived for one purpose, so they cannot be reversed or recomputed without the key and two
purposes never share a pseudonym space.

The key is derived from a configured root secret (the research export uses
`PHIVAULT_INDEX_KEY`) with `derive_key(root, "pseudonym/" + purpose)`. The same root and purpose
give the same pseudonyms on every run; rotating the root changes every pseudonym, so data sets
made before and after a rotation no longer link to one another.
"""

from __future__ import annotations

import re
import uuid

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

from phivault.crypto.keys import KEY_BYTES, KeyFormatError, derive_key

PSEUDONYM_BYTES = 16  # 128 bits, written as 32 hex digits
_PURPOSE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$")
_MAX_PURPOSE = 200


class PseudonymSpace:
    """The pseudonyms of one purpose: `of(id)` is the first 128 bits of HMAC-SHA256(key,
    id.bytes) in hex, where key = `derive_key(root, "pseudonym/" + purpose)`."""

    __slots__ = ("_mac", "purpose")

    def __init__(self, root: bytes, purpose: str) -> None:
        if len(root) != KEY_BYTES:
            raise KeyFormatError(f"pseudonym root key must be {KEY_BYTES} bytes, got {len(root)}")
        # Purposes are `/`-separated lower-case names, so that no two spellings share a key.
        if len(purpose) > _MAX_PURPOSE or not _PURPOSE_RE.fullmatch(purpose):
            raise ValueError("a pseudonym purpose is /-separated names of a-z 0-9 . _ -")
        self.purpose = purpose
        self._mac = HMAC(derive_key(root, "pseudonym/" + purpose), hashes.SHA256())

    def __repr__(self) -> str:
        return f"PseudonymSpace(purpose={self.purpose!r}, key=<masked>)"

    def of(self, value: uuid.UUID) -> str:
        """The pseudonym of `value` in this space."""
        mac = self._mac.copy()
        mac.update(value.bytes)
        return mac.finalize()[:PSEUDONYM_BYTES].hex()
