"""Envelope encryption of PHI values: AES-256-GCM under one data key (DEK) per row, the DEK
wrapped by a master key (KEK) of `PHIVAULT_MASTER_KEYS`, each value bound to its table, column, row.

Design: the KEK id lives in the wrapped DEK's header, i.e. in the ciphertext that the KEK produced,
and that header is part of the associated data. Rotating KEKs (`phivault keys rewrap`) therefore
re-wraps DEKs without touching any PHI ciphertext, and a header cannot be swapped without failing
authentication. A DEK encrypts the values of one row only, so no key comes anywhere near AES-GCM's
limit of 2^32 encryptions with random 96-bit nonces.

Formats (version 1; every length in bytes):

- wrapped DEK: `01 | len(kek_id) (1) | kek_id (ASCII) | nonce (12) | AES-GCM(KEK, DEK) (32 + 16)`,
  associated data `01 | len(kek_id) | kek_id | "phivault/dek/v1" | dek_id (16, UUID bytes)`;
- field value: `01 | nonce (12) | AES-GCM(DEK, plaintext) (n + 16)`, associated data
  `01 | "phivault/field/v1" | u16 len | table | u16 len | column | u16 len | str(row_id) | dek_id`,
  strings UTF-8 and lengths big-endian.

Every failure to authenticate (bad version or header, unknown KEK id, truncation, bad tag, wrong
associated data) raises the same opaque `IntegrityError`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from phivault.crypto.keys import KEY_BYTES, KEY_ID_RE, KeyFormatError

FORMAT_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16

_VERSION_BYTE = bytes((FORMAT_VERSION,))
_DEK_PURPOSE = b"phivault/dek/v1"
_FIELD_AAD_START = _VERSION_BYTE + b"phivault/field/v1"
_WRAPPED_KEY_BYTES = KEY_BYTES + TAG_BYTES
_UUID_TEXT_LENGTH = (36).to_bytes(2, "big")
_FIELD_BODY_START = 1 + NONCE_BYTES
_FIELD_MIN_BYTES = _FIELD_BODY_START + TAG_BYTES
_MAX_NAME_BYTES = 0xFFFF
_AAD_CACHE_LIMIT = 4096
_urandom = os.urandom


class IntegrityError(Exception):
    """A ciphertext failed authentication; deliberately says nothing about why."""

    def __init__(self) -> None:
        super().__init__("ciphertext failed authentication")


class _Kek(NamedTuple):
    key_id: str
    header: bytes
    aad_prefix: bytes
    aead: AESGCM


class MasterKeyRing:
    """The KEKs of `PHIVAULT_MASTER_KEYS`: the first wraps new DEKs, every one unwraps.

    Raises `KeyFormatError` when empty, on a duplicate or malformed id, or on a key that is not
    32 bytes.
    """

    __slots__ = ("_active", "_by_header", "_ids")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise KeyFormatError("master key ring is empty")
        keks: dict[str, _Kek] = {}
        for key_id, raw in keys:
            if not KEY_ID_RE.fullmatch(key_id):
                raise KeyFormatError("master key id must be 1 to 64 characters of A-Za-z0-9_.-")
            if key_id in keks:
                raise KeyFormatError(f"duplicate master key id {key_id!r}")
            if len(raw) != KEY_BYTES:
                raise KeyFormatError(
                    f"master key {key_id!r} must be {KEY_BYTES} bytes, got {len(raw)}"
                )
            encoded_id = key_id.encode("ascii")
            header = _VERSION_BYTE + bytes((len(encoded_id),)) + encoded_id
            keks[key_id] = _Kek(key_id, header, header + _DEK_PURPOSE, AESGCM(raw))
        self._ids = tuple(keks)
        self._active = keks[self._ids[0]]
        self._by_header = {kek.header: kek for kek in keks.values()}

    @property
    def active_id(self) -> str:
        """The id of the KEK that wraps new DEKs."""
        return self._active.key_id

    @property
    def ids(self) -> tuple[str, ...]:
        """Every KEK id, active first."""
        return self._ids

    def __repr__(self) -> str:
        return f"MasterKeyRing(active_id={self.active_id!r}, ids={self._ids!r}, keys=<masked>)"


@dataclass(frozen=True, repr=False, eq=False, slots=True)
class DataKey:
    """A row's data key: its id, the KEK id and wrapped form to store, and (privately) the key.

    Get one from `Envelope.new_data_key` or `Envelope.unwrap`; store `id` and `wrapped`.
    """

    id: uuid.UUID
    kek_id: str
    wrapped: bytes
    _key: bytes = field(repr=False)
    _aead: AESGCM = field(init=False, repr=False)
    _id_bytes: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_aead", AESGCM(self._key))
        object.__setattr__(self, "_id_bytes", self.id.bytes)

    def __repr__(self) -> str:
        return f"DataKey(id={self.id!r}, kek_id={self.kek_id!r}, key=<masked>)"


# The envelope builds DataKeys through the slot descriptors, skipping the frozen dataclass's
# __init__ and __post_init__: that halves the cost of a DataKey, which is a large share of a
# whole envelope round trip on a 1 KiB value (SPEC section 14).
_new_object = object.__new__
_slots = vars(DataKey)
_set_id: Callable[[DataKey, uuid.UUID], None] = _slots["id"].__set__
_set_kek_id: Callable[[DataKey, str], None] = _slots["kek_id"].__set__
_set_wrapped: Callable[[DataKey, bytes], None] = _slots["wrapped"].__set__
_set_key: Callable[[DataKey, bytes], None] = _slots["_key"].__set__
_set_aead: Callable[[DataKey, AESGCM], None] = _slots["_aead"].__set__
_set_id_bytes: Callable[[DataKey, bytes], None] = _slots["_id_bytes"].__set__
del _slots


def _length_prefixed(text: str) -> bytes:
    encoded = text.encode("utf-8")
    if len(encoded) > _MAX_NAME_BYTES:
        raise ValueError("associated data item longer than 65535 bytes")
    return len(encoded).to_bytes(2, "big") + encoded


def _encode_row_id(row_id: uuid.UUID | str) -> bytes:
    """Length-prefixed UTF-8 of str(row_id); a UUID is formatted here, faster than str() does."""
    if type(row_id) is uuid.UUID:
        digits = b"%032x" % row_id.int
        return b"".join(
            (
                _UUID_TEXT_LENGTH,
                digits[:8],
                b"-",
                digits[8:12],
                b"-",
                digits[12:16],
                b"-",
                digits[16:20],
                b"-",
                digits[20:],
            )
        )
    return _length_prefixed(row_id if isinstance(row_id, str) else str(row_id))


class Envelope:
    """Seal and open PHI values for (table, column, row) under per-row DEKs wrapped by the ring."""

    __slots__ = ("_aad_prefixes", "_active", "_by_header", "_last_row", "_ring")

    def __init__(self, ring: MasterKeyRing) -> None:
        self._ring = ring
        self._active = ring._active
        self._by_header = ring._by_header
        self._aad_prefixes: dict[tuple[str, str], bytes] = {}
        # The last row id seen and its encoding: a row's columns are sealed and opened one after
        # another, and formatting a UUID costs about half a 1 KiB AES-GCM encryption. One tuple,
        # replaced whole, so that concurrent callers never see a torn pair.
        self._last_row: tuple[object, bytes] = (None, b"")

    @property
    def ring(self) -> MasterKeyRing:
        """The master key ring this envelope uses."""
        return self._ring

    def __repr__(self) -> str:
        return f"Envelope(ring={self._ring!r})"

    # Data keys. The hot paths below are written flat, without helper calls, to meet the
    # SPEC section 14 target (>= 80 % of the same AES-GCM calls written inline).

    def new_data_key(self, dek_id: uuid.UUID) -> DataKey:
        """Generate a random DEK for `dek_id` and wrap it under the active KEK."""
        kek = self._active
        # One read from the OS random source gives both the key and the wrapping nonce.
        random = _urandom(KEY_BYTES + NONCE_BYTES)
        key = random[:KEY_BYTES]
        nonce = random[KEY_BYTES:]
        id_bytes = dek_id.bytes
        dek: DataKey = _new_object(DataKey)
        _set_id(dek, dek_id)
        _set_kek_id(dek, kek.key_id)
        _set_wrapped(
            dek, kek.header + nonce + kek.aead.encrypt(nonce, key, kek.aad_prefix + id_bytes)
        )
        _set_key(dek, key)
        _set_aead(dek, AESGCM(key))
        _set_id_bytes(dek, id_bytes)
        return dek

    def unwrap(self, dek_id: uuid.UUID, wrapped: bytes) -> DataKey:
        """Unwrap a stored DEK with whichever KEK of the ring wrapped it.

        Raises:
            IntegrityError: on an unknown KEK id, a malformed or tampered value, or a DEK stored
                under another `dek_id`.
        """
        try:
            header_end = 2 + wrapped[1]
            kek = self._by_header[wrapped[:header_end]]
        except (IndexError, KeyError):
            raise IntegrityError from None
        body = header_end + NONCE_BYTES
        if len(wrapped) != body + _WRAPPED_KEY_BYTES:
            raise IntegrityError
        id_bytes = dek_id.bytes
        try:
            key = kek.aead.decrypt(
                wrapped[header_end:body], wrapped[body:], kek.aad_prefix + id_bytes
            )
        except InvalidTag:
            raise IntegrityError from None
        dek: DataKey = _new_object(DataKey)
        _set_id(dek, dek_id)
        _set_kek_id(dek, kek.key_id)
        _set_wrapped(dek, wrapped)
        _set_key(dek, key)
        _set_aead(dek, AESGCM(key))
        _set_id_bytes(dek, id_bytes)
        return dek

    def rewrap(self, dek_id: uuid.UUID, wrapped: bytes) -> bytes | None:
        """Return the DEK re-wrapped under the active KEK, or None when it already is.

        The plaintext DEK never leaves this method, and no field ciphertext changes: values sealed
        under the DEK stay valid. A value already under the active KEK is returned as None without
        being decrypted.

        Raises:
            IntegrityError: as `unwrap`.
        """
        active = self._active
        if self.kek_id_of(wrapped) == active.key_id:
            return None
        key = self.unwrap(dek_id, wrapped)._key
        nonce = _urandom(NONCE_BYTES)
        return (
            active.header
            + nonce
            + active.aead.encrypt(nonce, key, active.aad_prefix + dek_id.bytes)
        )

    @staticmethod
    def kek_id_of(wrapped: bytes) -> str:
        """Read the KEK id from a wrapped DEK's header, without decrypting or authenticating it.

        Raises:
            IntegrityError: when the value is not a well-formed version-1 wrapped DEK.
        """
        try:
            id_length = wrapped[1]
        except IndexError:
            raise IntegrityError from None
        end = 2 + id_length
        if wrapped[0] != FORMAT_VERSION or len(wrapped) != end + NONCE_BYTES + _WRAPPED_KEY_BYTES:
            raise IntegrityError
        try:
            key_id = wrapped[2:end].decode("ascii")
        except UnicodeDecodeError:
            raise IntegrityError from None
        if not KEY_ID_RE.fullmatch(key_id):
            raise IntegrityError
        return key_id

    # Field values.

    def _add_prefix(self, table: str, column: str) -> bytes:
        prefix = _FIELD_AAD_START + _length_prefixed(table) + _length_prefixed(column)
        if len(self._aad_prefixes) >= _AAD_CACHE_LIMIT:
            self._aad_prefixes.clear()
        self._aad_prefixes[(table, column)] = prefix
        return prefix

    def seal(
        self,
        dek: DataKey,
        table: str,
        column: str,
        row_id: uuid.UUID | str,
        plaintext: bytes,
    ) -> bytes:
        """Encrypt one value of (table, column, row_id) under the row's DEK."""
        prefix = self._aad_prefixes.get((table, column)) or self._add_prefix(table, column)
        last_row, row = self._last_row
        # Identity, not equality: UUIDs and strs are immutable, so the same object has one value.
        if last_row is not row_id:
            row = _encode_row_id(row_id)
            self._last_row = (row_id, row)
        nonce = _urandom(NONCE_BYTES)
        return (
            _VERSION_BYTE
            + nonce
            + dek._aead.encrypt(nonce, plaintext, prefix + row + dek._id_bytes)
        )

    def open(
        self,
        dek: DataKey,
        table: str,
        column: str,
        row_id: uuid.UUID | str,
        ciphertext: bytes,
    ) -> bytes:
        """Decrypt one value sealed for exactly this (table, column, row_id) and DEK.

        Raises:
            IntegrityError: on any tampering, truncation, or a value from another place or DEK.
        """
        if len(ciphertext) < _FIELD_MIN_BYTES or ciphertext[0] != FORMAT_VERSION:
            raise IntegrityError
        prefix = self._aad_prefixes.get((table, column)) or self._add_prefix(table, column)
        last_row, row = self._last_row
        if last_row is not row_id:
            row = _encode_row_id(row_id)
            self._last_row = (row_id, row)
        try:
            return dek._aead.decrypt(
                ciphertext[1:_FIELD_BODY_START],
                ciphertext[_FIELD_BODY_START:],
                prefix + row + dek._id_bytes,
            )
        except InvalidTag:
            raise IntegrityError from None

    def seal_text(
        self, dek: DataKey, table: str, column: str, row_id: uuid.UUID | str, plaintext: str
    ) -> bytes:
        """Encrypt a text value (UTF-8) like `seal`."""
        return self.seal(dek, table, column, row_id, plaintext.encode("utf-8"))

    def open_text(
        self, dek: DataKey, table: str, column: str, row_id: uuid.UUID | str, ciphertext: bytes
    ) -> str:
        """Decrypt a value sealed by `seal_text`.

        Raises:
            IntegrityError: as `open`, and also when the authentic plaintext is not UTF-8 (the
                decode error would quote plaintext bytes, so it is not passed on).
        """
        plaintext = self.open(dek, table, column, row_id, ciphertext)
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise IntegrityError from None
