"""Streaming encryption of attachments: round trips, sizes, and every kind of stream tampering."""

from __future__ import annotations

import os
import struct
import uuid

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from phivault.crypto import IntegrityError
from phivault.crypto.envelope import DataKey, Envelope
from phivault.crypto.stream import (
    HEADER_BYTES,
    SEALED_SEGMENT_SIZE,
    SEGMENT_SIZE,
    StreamOpener,
    StreamSealer,
    open_stream,
    plaintext_size,
    seal_stream,
    sealed_size,
)

TABLE, COLUMN = "attachments", "content"
ROW = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100")
SIZES = [
    0,
    1,
    SEGMENT_SIZE - 1,
    SEGMENT_SIZE,
    SEGMENT_SIZE + 1,
    2 * SEGMENT_SIZE,
    3 * SEGMENT_SIZE + 7,
]


@pytest.fixture(scope="module")
def dek(envelope: Envelope) -> DataKey:
    return envelope.new_data_key(ROW)


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _seal(dek: DataKey, data: bytes, chunk: int = SEGMENT_SIZE) -> bytes:
    return b"".join(seal_stream(dek, TABLE, COLUMN, ROW, _chunks(data, chunk)))


def _open(dek: DataKey, sealed: bytes, chunk: int = SEALED_SEGMENT_SIZE) -> bytes:
    return b"".join(open_stream(dek, TABLE, COLUMN, ROW, _chunks(sealed, chunk)))


def _split(sealed: bytes) -> tuple[bytes, list[bytes]]:
    return sealed[:HEADER_BYTES], _chunks(sealed[HEADER_BYTES:], SEALED_SEGMENT_SIZE)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("chunk", [1000, SEGMENT_SIZE, SEALED_SEGMENT_SIZE, 10**7])
def test_round_trip_and_sizes(dek: DataKey, size: int, chunk: int) -> None:
    data = os.urandom(size)
    sealed = _seal(dek, data, chunk)
    assert len(sealed) == sealed_size(size)
    assert plaintext_size(len(sealed)) == size
    assert len(_split(sealed)[1]) == max(1, -(-size // SEGMENT_SIZE))
    assert _open(dek, sealed, chunk) == data


@settings(max_examples=40, deadline=None)
@given(
    size=st.sampled_from(SIZES),
    cuts=st.lists(st.integers(0, 3 * SEALED_SEGMENT_SIZE), max_size=6),
    mutable=st.booleans(),
)
def test_round_trip_with_any_chunking(
    dek: DataKey, size: int, cuts: list[int], mutable: bool
) -> None:
    data = os.urandom(size)
    sealer = StreamSealer(dek, TABLE, COLUMN, ROW)
    bounds = sorted({0, size, *(c for c in cuts if c < size)})
    pieces = [
        sealer.update(bytearray(data[a:b]) if mutable else data[a:b])
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    sealed = b"".join(pieces) + sealer.finalize()
    opener = StreamOpener(dek, TABLE, COLUMN, ROW)
    bounds = sorted({0, len(sealed), *(c for c in cuts if c < len(sealed))})
    out = [opener.update(memoryview(sealed)[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert b"".join(out) + opener.finalize() == data


def test_sealer_does_not_keep_a_reference_to_mutable_input(dek: DataKey) -> None:
    buffer = bytearray(b"a" * 100)
    sealer = StreamSealer(dek, TABLE, COLUMN, ROW)
    sealed = sealer.update(buffer)
    buffer[:] = b"b" * 100
    assert _open(dek, sealed + sealer.finalize()) == b"a" * 100


def test_empty_stream(dek: DataKey) -> None:
    sealed = _seal(dek, b"")
    assert len(sealed) == HEADER_BYTES + 16 == sealed_size(0)
    assert _open(dek, sealed) == b""
    sealer = StreamSealer(dek, TABLE, COLUMN, ROW)
    sealed = sealer.finalize()
    assert _open(dek, sealed) == b""


def test_exact_multiple_ends_with_a_full_last_segment(dek: DataKey) -> None:
    data = os.urandom(2 * SEGMENT_SIZE)
    header, segments = _split(_seal(dek, data))
    assert [len(s) for s in segments] == [SEALED_SEGMENT_SIZE] * 2
    with pytest.raises(IntegrityError):  # the first segment alone is not marked last
        _open(dek, header + segments[0])
    assert _open(dek, header + b"".join(segments)) == data


def test_plaintext_size_refuses_impossible_sizes() -> None:
    for bad in (0, HEADER_BYTES, HEADER_BYTES + 15, HEADER_BYTES + SEALED_SEGMENT_SIZE + 3):
        with pytest.raises(ValueError):
            plaintext_size(bad)
    with pytest.raises(ValueError):
        sealed_size(-1)


def test_stream_format_matches_an_independent_construction(dek: DataKey) -> None:
    data = os.urandom(SEGMENT_SIZE + 10)
    salt, prefix = os.urandom(32), os.urandom(7)
    header = b"\x01" + salt + prefix
    info = (
        b"phivault/stream/v1"
        + struct.pack(">H", len(TABLE))
        + TABLE.encode()
        + struct.pack(">H", len(COLUMN))
        + COLUMN.encode()
        + struct.pack(">H", 36)
        + str(ROW).encode()
        + dek.id.bytes
    )
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(dek._key)
    aead = AESGCM(key)
    segments = []
    for index, (part, last) in enumerate([(data[:SEGMENT_SIZE], 0), (data[SEGMENT_SIZE:], 1)]):
        position = struct.pack(">IB", index, last)
        segments.append(aead.encrypt(prefix + position, part, header + position))
    assert _open(dek, header + b"".join(segments)) == data
    fresh = _seal(dek, data)
    assert fresh[0] == 1 and fresh[1:HEADER_BYTES] != header[1:]


def test_streams_of_equal_plaintext_differ(dek: DataKey) -> None:
    assert _seal(dek, b"same") != _seal(dek, b"same")


def _three_segments(dek: DataKey) -> tuple[bytes, bytes, list[bytes]]:
    data = os.urandom(2 * SEGMENT_SIZE + 100)
    header, segments = _split(_seal(dek, data))
    assert len(segments) == 3
    return data, header, segments


def test_truncation_fails(dek: DataKey) -> None:
    _, header, segments = _three_segments(dek)
    sealed = header + b"".join(segments)
    boundaries = [0, 1, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 15]
    boundaries += [HEADER_BYTES + SEALED_SEGMENT_SIZE * k for k in (1, 2)]
    boundaries += [len(sealed) - 1, len(sealed) - 17]
    for cut in boundaries:
        with pytest.raises(IntegrityError):
            _open(dek, sealed[:cut])


def test_reordered_duplicated_or_extended_streams_fail(dek: DataKey) -> None:
    _, header, (first, second, last) = _three_segments(dek)
    for segments in (
        [second, first, last],
        [first, first, second, last],
        [first, second, second, last],
        [first, second, last, last],
        [first, last],
        [second, last],
    ):
        with pytest.raises(IntegrityError):
            _open(dek, header + b"".join(segments))
    for extra in (b"\x00", os.urandom(16), os.urandom(SEALED_SEGMENT_SIZE + 5)):
        with pytest.raises(IntegrityError):
            _open(dek, header + first + second + last + extra)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_editing_any_byte_fails(dek: DataKey, data: st.DataObject) -> None:
    plaintext = os.urandom(SEGMENT_SIZE + 300)
    sealed = bytearray(_seal(dek, plaintext))
    index = data.draw(
        st.one_of(
            st.integers(0, HEADER_BYTES - 1),
            st.integers(HEADER_BYTES, HEADER_BYTES + 50),
            st.integers(0, len(sealed) - 1),
            st.integers(len(sealed) - 40, len(sealed) - 1),
        ),
        label="byte",
    )
    sealed[index] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    with pytest.raises(IntegrityError):
        _open(dek, bytes(sealed))


def test_another_place_or_key_fails(envelope: Envelope, dek: DataKey) -> None:
    sealed = _seal(dek, b"x-ray")
    other = envelope.new_data_key(ROW)
    for key, table, column, row in (
        (dek, "consultations", COLUMN, ROW),
        (dek, TABLE, "thumbnail", ROW),
        (dek, TABLE, COLUMN, uuid.uuid4()),
        (other, TABLE, COLUMN, ROW),
    ):
        with pytest.raises(IntegrityError):
            b"".join(open_stream(key, table, column, row, [sealed]))
    assert b"".join(open_stream(dek, TABLE, COLUMN, str(ROW), [sealed])) == b"x-ray"


def test_release_points(dek: DataKey) -> None:
    data, header, (first, second, last) = _three_segments(dek)
    opener = StreamOpener(dek, TABLE, COLUMN, ROW)
    assert opener.update(header + first) == b""  # not yet known whether it is the last
    assert opener.update(second[:1]) == data[:SEGMENT_SIZE]
    assert opener.update(second[1:] + last) == data[SEGMENT_SIZE : 2 * SEGMENT_SIZE]
    assert opener.finalize() == data[2 * SEGMENT_SIZE :]


def test_a_segment_not_marked_last_is_never_released_as_last(dek: DataKey) -> None:
    data, header, (first, second, _) = _three_segments(dek)
    opener = StreamOpener(dek, TABLE, COLUMN, ROW)
    assert opener.update(header + first + second) == data[:SEGMENT_SIZE]
    with pytest.raises(IntegrityError):
        opener.finalize()
    with pytest.raises(IntegrityError):  # a failed opener stays failed
        opener.update(b"more")


def test_finalized_objects_refuse_more_input(dek: DataKey) -> None:
    sealer = StreamSealer(dek, TABLE, COLUMN, ROW)
    sealed = sealer.finalize()
    with pytest.raises(ValueError, match="finalized"):
        sealer.update(b"late")
    opener = StreamOpener(dek, TABLE, COLUMN, ROW)
    opener.update(sealed)
    assert opener.finalize() == b""
    with pytest.raises(ValueError, match="finalized"):
        opener.update(b"")


def test_reprs_are_masked(dek: DataKey) -> None:
    sealer, opener = StreamSealer(dek, TABLE, COLUMN, ROW), StreamOpener(dek, TABLE, COLUMN, ROW)
    for shown in (repr(sealer), repr(opener)):
        assert "<masked>" in shown and dek._key.hex() not in shown
