"""Segmented streaming encryption of attachments under a row's DataKey, in constant memory.

The construction is Tink's AES-GCM-HKDF streaming AEAD (the STREAM scheme of Hoang, Reyhanitabar,
Rogaway and Vizar). A sealed stream is a 40-byte header followed by segments:

- header: `01 (format version) | salt (32 random bytes) | nonce prefix (7 random bytes)`;
- stream key: HKDF-SHA256(DEK, salt, info=`"phivault/stream/v1" | u16 len | table | u16 len |
  column | u16 len | str(row_id) | dek_id (16)`, 32 bytes): a fresh key per stream, bound to
  the attachment's table, column and row, so no DEK-level nonce budget is spent on streams;
- segment i: AES-256-GCM of up to `SEGMENT_SIZE` plaintext bytes with nonce `prefix | u32 i |
  last`, where `last` is 1 for the final segment and 0 otherwise, and associated data
  `header | u32 i | last`. Every segment but the last holds exactly `SEGMENT_SIZE` bytes; the
  last holds 0 to `SEGMENT_SIZE` (an empty stream is one empty, last segment).

Because the index and the last flag are inside each segment's nonce and associated data, any
reordered, duplicated, dropped or edited segment, a changed header, a stream cut at a segment
boundary, and bytes appended after the last segment all raise `IntegrityError`.

What is released when: `StreamOpener.update` returns the plaintext of a segment only once that
segment has authenticated as a non-final segment at its position, which it can only know after at
least one byte of the next segment has arrived. `StreamOpener.finalize` returns the final segment's
plaintext only after it has authenticated as the last segment. Plaintext released by `update` is
authentic, but the stream is complete only when `finalize` returns: until then a consumer must
treat what it has received as possibly truncated (and, e.g., abort a download on IntegrityError).
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from phivault.crypto.envelope import (
    TAG_BYTES,
    DataKey,
    IntegrityError,
    _encode_row_id,
    _length_prefixed,
)
from phivault.crypto.keys import KEY_BYTES

STREAM_FORMAT_VERSION = 1
SEGMENT_SIZE = 65536
SALT_BYTES = 32
NONCE_PREFIX_BYTES = 7
HEADER_BYTES = 1 + SALT_BYTES + NONCE_PREFIX_BYTES
SEALED_SEGMENT_SIZE = SEGMENT_SIZE + TAG_BYTES
MAX_SEGMENTS = 2**32

_INFO_PREFIX = b"phivault/stream/v1"
_POSITION = struct.Struct(">IB")


def sealed_size(plaintext_size: int) -> int:
    """The exact size of a sealed stream of `plaintext_size` bytes, header included."""
    if plaintext_size < 0:
        raise ValueError("plaintext size must not be negative")
    segments = max(1, -(-plaintext_size // SEGMENT_SIZE))
    return HEADER_BYTES + plaintext_size + segments * TAG_BYTES


def plaintext_size(sealed: int) -> int:
    """The plaintext size of a sealed stream of `sealed` bytes (the inverse of `sealed_size`).

    Raises:
        ValueError: when no stream has that size.
    """
    body = sealed - HEADER_BYTES
    segments = max(1, -(-body // SEALED_SEGMENT_SIZE))
    if body - (segments - 1) * SEALED_SEGMENT_SIZE < TAG_BYTES:
        raise ValueError("not the size of a sealed stream")
    return body - segments * TAG_BYTES


def _stream_aead(
    dek: DataKey, table: str, column: str, row_id: uuid.UUID | str, salt: bytes
) -> AESGCM:
    info = b"".join(
        (
            _INFO_PREFIX,
            _length_prefixed(table),
            _length_prefixed(column),
            _encode_row_id(row_id),
            dek._id_bytes,
        )
    )
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info)
    return AESGCM(hkdf.derive(dek._key))


_Buffer = bytes | bytearray | memoryview


class _Segmenter:
    """Cuts a byte stream into segments of `size` bytes, holding back the latest one until a later
    byte (or the end of the stream) says whether it is the last.

    Holds at most one segment. A `bytes` chunk that is held back whole is kept by reference rather
    than copied (bytes are immutable), so segment-aligned input is never copied.
    """

    __slots__ = ("_pending", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._pending: bytes | bytearray = b""

    def feed(self, data: _Buffer, emit: Callable[[_Buffer], bytes], pieces: list[bytes]) -> None:
        """Append to `pieces` the result of `emit` on every segment now known not to be last."""
        size = self._size
        with memoryview(data) as raw, raw.cast("B") as view:
            length = view.nbytes
            if not length:
                return
            offset = 0
            pending = self._pending
            if pending:
                if len(pending) < size:
                    if isinstance(pending, bytes):
                        pending = bytearray(pending)
                    offset = min(size - len(pending), length)
                    pending += view[:offset]
                if offset == length:
                    self._pending = pending
                    return
                pieces.append(emit(pending))
            while length - offset > size:
                pieces.append(emit(view[offset : offset + size]))
                offset += size
            if offset == 0 and type(data) is bytes:
                self._pending = data
            else:
                self._pending = bytearray(view[offset:])

    def take_last(self) -> bytes | bytearray:
        """Return the held-back final segment (possibly empty) and forget it."""
        pending, self._pending = self._pending, b""
        return pending


class StreamSealer:
    """Encrypts one attachment: feed plaintext to `update`, then call `finalize` once.

    The concatenation of everything `update` and `finalize` return is the sealed stream (the header
    comes out with the first result). Memory stays below two segments whatever the stream's size.
    """

    __slots__ = ("_aead", "_finished", "_header", "_header_sent", "_index", "_prefix", "_segments")

    def __init__(self, dek: DataKey, table: str, column: str, row_id: uuid.UUID | str) -> None:
        random = os.urandom(SALT_BYTES + NONCE_PREFIX_BYTES)
        self._prefix = random[SALT_BYTES:]
        self._header = bytes((STREAM_FORMAT_VERSION,)) + random
        self._aead = _stream_aead(dek, table, column, row_id, random[:SALT_BYTES])
        self._segments = _Segmenter(SEGMENT_SIZE)
        self._index = 0
        self._header_sent = False
        self._finished = False

    def __repr__(self) -> str:
        return f"StreamSealer(segments_sealed={self._index}, key=<masked>)"

    def _seal(self, plaintext: _Buffer, last: int) -> bytes:
        if self._index >= MAX_SEGMENTS:
            raise ValueError("stream longer than 2^32 segments")
        position = _POSITION.pack(self._index, last)
        self._index += 1
        return self._aead.encrypt(self._prefix + position, plaintext, self._header + position)

    def _seal_inner(self, plaintext: _Buffer) -> bytes:
        return self._seal(plaintext, 0)

    def _start(self) -> list[bytes]:
        if self._finished:
            raise ValueError("stream already finalized")
        if self._header_sent:
            return []
        self._header_sent = True
        return [self._header]

    def update(self, data: _Buffer) -> bytes:
        """Take more plaintext; return the sealed bytes that are now ready (maybe b"")."""
        pieces = self._start()
        self._segments.feed(data, self._seal_inner, pieces)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def finalize(self) -> bytes:
        """Seal the last segment (possibly empty) and return the rest of the stream."""
        pieces = self._start()
        pieces.append(self._seal(self._segments.take_last(), 1))
        self._finished = True
        return b"".join(pieces)


class StreamOpener:
    """Decrypts one sealed attachment: feed it to `update`, then call `finalize` once.

    See the module docstring for exactly when plaintext is released. After an IntegrityError the
    opener refuses any further input.
    """

    __slots__ = (
        "_aead",
        "_context",
        "_failed",
        "_finished",
        "_header",
        "_index",
        "_prefix",
        "_segments",
    )

    def __init__(self, dek: DataKey, table: str, column: str, row_id: uuid.UUID | str) -> None:
        self._context = (dek, table, column, row_id)
        self._aead: AESGCM | None = None
        self._header: bytes | bytearray = bytearray()
        self._prefix = b""
        self._segments = _Segmenter(SEALED_SEGMENT_SIZE)
        self._index = 0
        self._failed = False
        self._finished = False

    def __repr__(self) -> str:
        return f"StreamOpener(segments_opened={self._index}, key=<masked>)"

    def _fail(self) -> IntegrityError:
        self._failed = True
        self._segments = _Segmenter(SEALED_SEGMENT_SIZE)
        return IntegrityError()

    def _check_usable(self) -> None:
        if self._failed:
            raise IntegrityError
        if self._finished:
            raise ValueError("stream already finalized")

    def _open(self, sealed: _Buffer, last: int) -> bytes:
        aead = self._aead
        if aead is None or self._index >= MAX_SEGMENTS or len(sealed) < TAG_BYTES:
            raise self._fail()
        position = _POSITION.pack(self._index, last)
        try:
            plaintext = aead.decrypt(
                self._prefix + position, sealed, bytes(self._header) + position
            )
        except InvalidTag:
            raise self._fail() from None
        self._index += 1
        return plaintext

    def _open_inner(self, sealed: _Buffer) -> bytes:
        return self._open(sealed, 0)

    def _read_header(self, view: memoryview) -> memoryview:
        taken = min(HEADER_BYTES - len(self._header), view.nbytes)
        self._header += view[:taken]
        if len(self._header) == HEADER_BYTES:
            header = self._header = bytes(self._header)
            if header[0] != STREAM_FORMAT_VERSION:
                raise self._fail()
            dek, table, column, row_id = self._context
            self._prefix = header[1 + SALT_BYTES :]
            self._aead = _stream_aead(dek, table, column, row_id, header[1 : 1 + SALT_BYTES])
        return view[taken:]

    def update(self, data: _Buffer) -> bytes:
        """Take more sealed bytes; return the plaintext of segments proven authentic and not last.

        Raises:
            IntegrityError: as soon as the header or a segment fails authentication.
        """
        self._check_usable()
        pieces: list[bytes] = []
        if self._aead is None:
            with memoryview(data) as raw, raw.cast("B") as view, self._read_header(view) as rest:
                if self._aead is not None:
                    self._segments.feed(rest, self._open_inner, pieces)
        else:
            self._segments.feed(data, self._open_inner, pieces)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def finalize(self) -> bytes:
        """Authenticate the final segment and return its plaintext.

        Raises:
            IntegrityError: when the stream is truncated (including at a segment boundary), has
                bytes after its last segment, or its last segment fails authentication.
        """
        self._check_usable()
        plaintext = self._open(self._segments.take_last(), 1)
        self._finished = True
        return plaintext


def seal_stream(
    dek: DataKey,
    table: str,
    column: str,
    row_id: uuid.UUID | str,
    chunks: Iterable[_Buffer],
) -> Iterator[bytes]:
    """Yield the sealed stream of the plaintext `chunks`, in non-empty pieces."""
    sealer = StreamSealer(dek, table, column, row_id)
    for chunk in chunks:
        piece = sealer.update(chunk)
        if piece:
            yield piece
    yield sealer.finalize()


def open_stream(
    dek: DataKey,
    table: str,
    column: str,
    row_id: uuid.UUID | str,
    chunks: Iterable[_Buffer],
) -> Iterator[bytes]:
    """Yield the plaintext of the sealed `chunks`, in pieces, as `StreamOpener` releases it.

    The generator raises IntegrityError where authentication fails; the plaintext is complete only
    when the generator ends without one.
    """
    opener = StreamOpener(dek, table, column, row_id)
    for chunk in chunks:
        piece = opener.update(chunk)
        if piece:
            yield piece
    piece = opener.finalize()
    if piece:
        yield piece
