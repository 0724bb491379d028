"""Blind indexes: deterministic HMAC-SHA256 digests that let phivault look up an encrypted value
(login by email) without decrypting, under a separate key for every (table, column)."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from phivault.crypto.keys import KEY_BYTES, KeyFormatError

DIGEST_BYTES = 32
_INFO_PREFIX = b"phivault/blind-index/v1/"


def normalise_email(value: str) -> str:
    """Normalise an email for its blind index: surrounding whitespace removed, lower-cased."""
    return value.strip().lower()


class BlindIndex:
    """Computes blind-index digests from `PHIVAULT_INDEX_KEY`.

    Each (table, column) gets its own HMAC key, HKDF-SHA256(index key, salt=None,
    info=b"phivault/blind-index/v1/" + table + b"/" + column), so two indexed columns never share a
    key and equal values in different columns have unrelated digests.
    """

    __slots__ = ("_index_key", "_macs", "previous")

    def __init__(self, index_key: bytes, previous: bytes | None = None) -> None:
        if len(index_key) != KEY_BYTES:
            raise KeyFormatError(f"index key must be {KEY_BYTES} bytes, got {len(index_key)}")
        self._index_key = bytes(index_key)
        self._macs: dict[tuple[str, str], HMAC] = {}
        # During a rotation (`phivault keys reindex`), the key the stored digests were made
        # with until they are all made again: lookups try both, writes use the current one.
        self.previous = BlindIndex(previous) if previous is not None else None

    def __repr__(self) -> str:
        return "BlindIndex(index_key=<masked>)"

    def _column_mac(self, table: str, column: str) -> HMAC:
        mac = self._macs.get((table, column))
        if mac is None:
            # A "/" inside a name would let ("a/b", "c") and ("a", "b/c") share a key.
            if not table or not column or "/" in table or "/" in column:
                raise ValueError("table and column names must be non-empty and contain no '/'")
            info = _INFO_PREFIX + table.encode("utf-8") + b"/" + column.encode("utf-8")
            column_key = HKDF(
                algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info
            ).derive(self._index_key)
            mac = HMAC(column_key, hashes.SHA256())
            self._macs[(table, column)] = mac
        return mac

    def digest(self, table: str, column: str, value: str) -> bytes:
        """Return the 32-byte HMAC-SHA256 of `value` (UTF-8, as given) under the column's key."""
        mac = self._column_mac(table, column).copy()
        mac.update(value.encode("utf-8"))
        return mac.finalize()

    def digests(self, table: str, column: str, value: str) -> tuple[bytes, ...]:
        """The digests a stored value may have: under the current key, and during a rotation
        under the previous one too (a lookup matches either)."""
        current = self.digest(table, column, value)
        if self.previous is None:
            return (current,)
        return current, self.previous.digest(table, column, value)

    def digest_email(self, table: str, column: str, email: str) -> bytes:
        """Return the digest of `normalise_email(email)`."""
        return self.digest(table, column, normalise_email(email))
