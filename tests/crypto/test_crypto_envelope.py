"""Envelope encryption: round trips, tampering, AAD binding, key rotation, stored format."""

from __future__ import annotations

import struct
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from phivault.crypto import IntegrityError, KeyFormatError
from phivault.crypto.envelope import DataKey, Envelope, MasterKeyRing
from phivault.crypto.keys import b64url_encode, generate_key

TABLE, COLUMN = "patients", "full_name"

# Known-answer vector: fixed keys, ids and nonces. The expected bytes were computed once with
# AESGCM directly (see `_expected_wrapped` / `_expected_field`) and are pinned here so that any
# change of the stored format breaks this test.
KAT_KEK = bytes(range(32))
KAT_KEK_ID = "mk-20261123-9f3a1c"
KAT_DEK = bytes(range(32, 64))
KAT_DEK_ID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
KAT_ROW_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")
KAT_WRAP_NONCE = bytes(12)
KAT_FIELD_NONCE = bytes(range(100, 112))
KAT_PLAINTEXT = b"Ada Lovelace"
KAT_WRAPPED = bytes.fromhex(
    "01126d6b2d32303236313132332d3966336131630000000000000000000000002e9d97fd9109a59a2081831e"
    "3401bfb6e27264601cb45618b8a789b8f9c2636919b4ec41f2b28650eb8ed1508a9af423"
)
KAT_FIELD = bytes.fromhex(
    "016465666768696a6b6c6d6e6ff409eff393de82a8b035bcbdb502315fce17bd944ce0d9bfc330d944"
)


def _length_prefixed(text: str) -> bytes:
    encoded = text.encode()
    return struct.pack(">H", len(encoded)) + encoded


def _expected_wrapped() -> bytes:
    header = b"\x01" + bytes([len(KAT_KEK_ID)]) + KAT_KEK_ID.encode()
    aad = header + b"phivault/dek/v1" + KAT_DEK_ID.bytes
    return header + KAT_WRAP_NONCE + AESGCM(KAT_KEK).encrypt(KAT_WRAP_NONCE, KAT_DEK, aad)


def _expected_field() -> bytes:
    aad = (
        b"\x01phivault/field/v1"
        + _length_prefixed(TABLE)
        + _length_prefixed(COLUMN)
        + _length_prefixed(str(KAT_ROW_ID))
        + KAT_DEK_ID.bytes
    )
    return b"\x01" + KAT_FIELD_NONCE + AESGCM(KAT_DEK).encrypt(KAT_FIELD_NONCE, KAT_PLAINTEXT, aad)


def _kat_envelope() -> Envelope:
    return Envelope(MasterKeyRing([(KAT_KEK_ID, KAT_KEK)]))


def test_known_answer_vectors_match_an_independent_construction() -> None:
    assert _expected_wrapped() == KAT_WRAPPED
    assert _expected_field() == KAT_FIELD


def test_known_answer_vectors_open() -> None:
    env = _kat_envelope()
    dek = env.unwrap(KAT_DEK_ID, KAT_WRAPPED)
    assert dek._key == KAT_DEK
    assert dek.kek_id == KAT_KEK_ID
    assert env.open(dek, TABLE, COLUMN, KAT_ROW_ID, KAT_FIELD) == KAT_PLAINTEXT
    assert env.open_text(dek, TABLE, COLUMN, str(KAT_ROW_ID), KAT_FIELD) == "Ada Lovelace"


def test_fresh_output_has_the_documented_layout() -> None:
    env = _kat_envelope()
    dek = env.new_data_key(KAT_DEK_ID)
    header = b"\x01\x12" + KAT_KEK_ID.encode()
    assert dek.wrapped.startswith(header)
    assert len(dek.wrapped) == len(header) + 12 + 32 + 16
    nonce = dek.wrapped[len(header) : len(header) + 12]
    aad = header + b"phivault/dek/v1" + KAT_DEK_ID.bytes
    raw = AESGCM(KAT_KEK).decrypt(nonce, dek.wrapped[len(header) + 12 :], aad)
    assert raw == dek._key and len(raw) == 32

    sealed = env.seal(dek, TABLE, COLUMN, KAT_ROW_ID, KAT_PLAINTEXT)
    assert sealed[0] == 1 and len(sealed) == 1 + 12 + len(KAT_PLAINTEXT) + 16
    aad = (
        b"\x01phivault/field/v1"
        + _length_prefixed(TABLE)
        + _length_prefixed(COLUMN)
        + _length_prefixed(str(KAT_ROW_ID))
        + KAT_DEK_ID.bytes
    )
    assert AESGCM(raw).decrypt(sealed[1:13], sealed[13:], aad) == KAT_PLAINTEXT


@settings(max_examples=100, deadline=None)
@given(plaintext=st.binary(max_size=2048), text=st.text(max_size=200))
def test_round_trip(envelope: Envelope, plaintext: bytes, text: str) -> None:
    row_id = uuid.uuid4()
    dek = envelope.new_data_key(uuid.uuid4())
    sealed = envelope.seal(dek, TABLE, COLUMN, row_id, plaintext)
    assert envelope.open(dek, TABLE, COLUMN, row_id, sealed) == plaintext
    reopened = envelope.unwrap(dek.id, dek.wrapped)
    assert envelope.open(reopened, TABLE, COLUMN, row_id, sealed) == plaintext
    sealed_text = envelope.seal_text(dek, TABLE, COLUMN, row_id, text)
    assert envelope.open_text(reopened, TABLE, COLUMN, row_id, sealed_text) == text


def test_uuid_and_its_string_are_the_same_row(envelope: Envelope) -> None:
    row_id = uuid.uuid4()
    dek = envelope.new_data_key(row_id)
    sealed = envelope.seal(dek, TABLE, COLUMN, row_id, b"x")
    assert envelope.open(dek, TABLE, COLUMN, str(row_id), sealed) == b"x"
    sealed = envelope.seal(dek, TABLE, COLUMN, str(row_id), b"y")
    assert envelope.open(dek, TABLE, COLUMN, uuid.UUID(str(row_id)), sealed) == b"y"


def test_data_key_built_directly_matches_the_envelope(envelope: Envelope) -> None:
    dek = envelope.new_data_key(uuid.uuid4())
    copy = DataKey(dek.id, dek.kek_id, dek.wrapped, dek._key)
    sealed = envelope.seal(copy, TABLE, COLUMN, "row-1", b"v")
    assert envelope.open(dek, TABLE, COLUMN, "row-1", sealed) == b"v"


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_flipping_any_bit_of_a_wrapped_dek_fails(envelope: Envelope, data: st.DataObject) -> None:
    dek_id = uuid.uuid4()
    wrapped = bytearray(envelope.new_data_key(dek_id).wrapped)
    index = data.draw(st.integers(0, len(wrapped) - 1), label="byte")
    wrapped[index] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    with pytest.raises(IntegrityError):
        envelope.unwrap(dek_id, bytes(wrapped))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), plaintext=st.binary(max_size=64))
def test_flipping_any_bit_of_a_field_fails(
    envelope: Envelope, data: st.DataObject, plaintext: bytes
) -> None:
    row_id = uuid.uuid4()
    dek = envelope.new_data_key(row_id)
    sealed = bytearray(envelope.seal(dek, TABLE, COLUMN, row_id, plaintext))
    index = data.draw(st.integers(0, len(sealed) - 1), label="byte")
    sealed[index] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    with pytest.raises(IntegrityError):
        envelope.open(dek, TABLE, COLUMN, row_id, bytes(sealed))


def test_truncated_or_extended_values_fail(envelope: Envelope) -> None:
    row_id = uuid.uuid4()
    dek = envelope.new_data_key(row_id)
    sealed = envelope.seal(dek, TABLE, COLUMN, row_id, b"0123456789")
    for cut in range(len(sealed)):
        with pytest.raises(IntegrityError):
            envelope.open(dek, TABLE, COLUMN, row_id, sealed[:cut])
    for cut in range(len(dek.wrapped)):
        with pytest.raises(IntegrityError):
            envelope.unwrap(dek.id, dek.wrapped[:cut])
    for extra in (b"\x00", b"\x00" * 16):
        with pytest.raises(IntegrityError):
            envelope.open(dek, TABLE, COLUMN, row_id, sealed + extra)
        with pytest.raises(IntegrityError):
            envelope.unwrap(dek.id, dek.wrapped + extra)


def test_value_moved_elsewhere_fails(envelope: Envelope) -> None:
    row_id = uuid.uuid4()
    dek = envelope.new_data_key(row_id)
    sealed = envelope.seal(dek, TABLE, COLUMN, row_id, b"diabetes")
    other_dek = envelope.new_data_key(uuid.uuid4())
    elsewhere: list[tuple[DataKey, str, str, uuid.UUID | str]] = [
        (dek, TABLE, COLUMN, uuid.uuid4()),  # another row
        (dek, TABLE, COLUMN, str(row_id).upper()),  # the row id's text differs
        (dek, TABLE, "phone", row_id),  # another column
        (dek, "medical_records", COLUMN, row_id),  # another table
        (dek, TABLE + "f", "ull_name", row_id),  # the same characters, split elsewhere
        (other_dek, TABLE, COLUMN, row_id),  # another row's DEK
    ]
    for key, table, column, row in elsewhere:
        with pytest.raises(IntegrityError):
            envelope.open(key, table, column, row, sealed)
    assert envelope.open(dek, TABLE, COLUMN, row_id, sealed) == b"diabetes"


def test_dek_moved_to_another_id_fails(envelope: Envelope) -> None:
    dek = envelope.new_data_key(uuid.uuid4())
    with pytest.raises(IntegrityError):
        envelope.unwrap(uuid.uuid4(), dek.wrapped)


def test_open_text_of_non_utf8_plaintext_is_an_integrity_error(envelope: Envelope) -> None:
    dek = envelope.new_data_key(uuid.uuid4())
    sealed = envelope.seal(dek, TABLE, COLUMN, "r", b"\xff\xfe")
    with pytest.raises(IntegrityError) as caught:
        envelope.open_text(dek, TABLE, COLUMN, "r", sealed)
    assert str(caught.value) == "ciphertext failed authentication"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_integrity_error_is_opaque(envelope: Envelope) -> None:
    dek = envelope.new_data_key(uuid.uuid4())
    sealed = envelope.seal(dek, TABLE, COLUMN, "r", b"value")
    failures: list[pytest.ExceptionInfo[IntegrityError]] = []
    for bad_field in (b"", b"\x02" + sealed[1:], sealed[:-1], sealed[:13] + bytes(21)):
        with pytest.raises(IntegrityError) as caught:
            envelope.open(dek, TABLE, COLUMN, "r", bad_field)
        failures.append(caught)
    unknown = b"\x01\x07unknown" + dek.wrapped[-60:]
    for bad_wrapped in (b"", b"\x02" + dek.wrapped[1:], unknown, dek.wrapped[:-1]):
        with pytest.raises(IntegrityError) as caught:
            envelope.unwrap(dek.id, bad_wrapped)
        failures.append(caught)
    assert {str(failure.value) for failure in failures} == {"ciphertext failed authentication"}
    assert all(failure.value.__cause__ is None for failure in failures)


def test_older_key_decrypts_and_new_writes_use_the_active_key(
    old_envelope: Envelope, envelope: Envelope
) -> None:
    row_id = uuid.uuid4()
    old_dek = old_envelope.new_data_key(row_id)
    sealed = old_envelope.seal(old_dek, TABLE, COLUMN, row_id, b"before rotation")
    old_id, new_id = old_envelope.ring.active_id, envelope.ring.active_id
    assert envelope.ring.ids == (new_id, old_id)
    assert Envelope.kek_id_of(old_dek.wrapped) == old_id

    dek = envelope.unwrap(row_id, old_dek.wrapped)
    assert dek.kek_id == old_id
    assert envelope.open(dek, TABLE, COLUMN, row_id, sealed) == b"before rotation"

    fresh = envelope.new_data_key(uuid.uuid4())
    assert fresh.kek_id == new_id
    assert Envelope.kek_id_of(fresh.wrapped) == new_id
    with pytest.raises(IntegrityError):
        old_envelope.unwrap(fresh.id, fresh.wrapped)  # unknown KEK id


def test_header_swapped_to_another_ring_key_fails(
    old_envelope: Envelope, envelope: Envelope
) -> None:
    old = old_envelope.new_data_key(uuid.uuid4())
    old_id, new_id = old_envelope.ring.active_id.encode(), envelope.ring.active_id.encode()
    assert len(old_id) == len(new_id)
    relabelled = old.wrapped.replace(old_id, new_id, 1)
    assert Envelope.kek_id_of(relabelled) == envelope.ring.active_id
    with pytest.raises(IntegrityError):
        envelope.unwrap(old.id, relabelled)


def test_rewrap_moves_to_the_active_key(old_envelope: Envelope, envelope: Envelope) -> None:
    row_id = uuid.uuid4()
    old_dek = old_envelope.new_data_key(row_id)
    sealed = old_envelope.seal(old_dek, TABLE, COLUMN, row_id, b"unchanged")

    rewrapped = envelope.rewrap(row_id, old_dek.wrapped)
    assert rewrapped is not None
    assert Envelope.kek_id_of(rewrapped) == envelope.ring.active_id
    assert old_dek._key not in rewrapped
    dek = envelope.unwrap(row_id, rewrapped)
    assert dek._key == old_dek._key
    # The field ciphertext is untouched and still opens under the re-wrapped DEK.
    assert envelope.open(dek, TABLE, COLUMN, row_id, sealed) == b"unchanged"
    assert envelope.rewrap(row_id, rewrapped) is None


def test_rewrap_refuses_bad_input(envelope: Envelope) -> None:
    dek = envelope.new_data_key(uuid.uuid4())
    with pytest.raises(IntegrityError):
        envelope.rewrap(uuid.uuid4(), b"\x01\x03abc" + bytes(60))
    with pytest.raises(IntegrityError):
        envelope.rewrap(dek.id, b"")


@pytest.mark.parametrize(
    "wrapped",
    [b"", b"\x01", b"\x02\x01a" + bytes(60), b"\x01\x05ab", b"\x01\x02\xff\xfe" + bytes(60)],
)
def test_kek_id_of_refuses_malformed_values(wrapped: bytes) -> None:
    with pytest.raises(IntegrityError):
        Envelope.kek_id_of(wrapped)


def test_nonces_never_repeat(envelope: Envelope) -> None:
    dek = envelope.new_data_key(uuid.uuid4())
    nonces = {envelope.seal(dek, TABLE, COLUMN, "r", b"")[1:13] for _ in range(20_000)}
    assert len(nonces) == 20_000
    wrap_nonces = {envelope.new_data_key(dek.id).wrapped[-60:-48] for _ in range(2_000)}
    assert len(wrap_nonces) == 2_000


def test_secrets_stay_out_of_reprs(envelope: Envelope, new_kek: bytes, old_kek: bytes) -> None:
    dek = envelope.new_data_key(uuid.uuid4())
    shown = " ".join([repr(envelope), str(envelope), repr(envelope.ring), repr(dek), str(dek)])
    assert "<masked>" in repr(dek) and "<masked>" in repr(envelope.ring)
    for secret in (new_kek, old_kek, dek._key):
        assert secret.hex() not in shown
        assert b64url_encode(secret) not in shown
        assert repr(secret) not in shown


def test_data_key_is_immutable(envelope: Envelope) -> None:
    dek = envelope.new_data_key(uuid.uuid4())
    with pytest.raises(AttributeError):
        dek.kek_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([], "empty"),
        ([("a", bytes(32)), ("a", bytes(32))], "duplicate master key id 'a'"),
        ([("a", bytes(31))], "must be 32 bytes, got 31"),
        ([("bad id", bytes(32))], "master key id must be"),
        ([("é", bytes(32))], "master key id must be"),
    ],
)
def test_master_key_ring_refuses(keys: list[tuple[str, bytes]], message: str) -> None:
    with pytest.raises(KeyFormatError, match=message):
        MasterKeyRing(keys)


def test_master_key_ring_ids() -> None:
    ring = MasterKeyRing([("b", generate_key()), ("a", generate_key())])
    assert ring.active_id == "b"
    assert ring.ids == ("b", "a")


def test_oversized_names_are_refused(envelope: Envelope) -> None:
    dek = envelope.new_data_key(uuid.uuid4())
    with pytest.raises(ValueError, match="65535"):
        envelope.seal(dek, "t" * 70_000, COLUMN, "r", b"")
    with pytest.raises(ValueError, match="65535"):
        envelope.seal(dek, TABLE, COLUMN, "r" * 70_000, b"")
