"""Row ciphers: a row's values open only in that row and column; keys are stored wrapped."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from phivault.crypto import IntegrityError
from phivault.keys import service
from phivault.runtime import Runtime
from tests.storage import raw_storage


async def test_values_round_trip_through_a_stored_data_key(runtime: Runtime) -> None:
    row_id = uuid.uuid4()
    async with runtime.unit_of_work() as session:
        cipher = service.new_row_cipher(session, runtime.envelope, "medical_records", row_id)
        sealed = cipher.seal("diagnosis", "Zyxwvut syndrome")
        assert cipher.seal_optional("notes", None) is None
    async with runtime.sessions() as session:
        again = await service.row_cipher(session, runtime.envelope, "medical_records", row_id,
                                         cipher.data_key_id)
    assert again.open("diagnosis", sealed) == "Zyxwvut syndrome"
    assert again.open_optional("notes", None) is None
    assert "Zyxwvut" not in repr(again)


async def test_plaintext_data_key_never_reaches_storage(fresh_runtime: Callable[..., Any],
                                                        tmp_path: Path) -> None:
    rt = await fresh_runtime()
    async with rt.unit_of_work() as session:
        cipher = service.new_row_cipher(session, rt.envelope, "t", uuid.uuid4())
    storage = await raw_storage(rt, tmp_path)
    secret = cipher._key._key  # noqa: SLF001 - the test looks for the secret on purpose
    assert len(secret) == 32 and secret not in storage
    assert secret.hex().encode() not in storage


async def test_sealed_value_moved_to_another_row_or_column_fails(runtime: Runtime) -> None:
    async with runtime.unit_of_work() as session:
        cipher_a = service.new_row_cipher(session, runtime.envelope, "records", uuid.uuid4())
        cipher_b = service.new_row_cipher(session, runtime.envelope, "records", uuid.uuid4())
        sealed = cipher_a.seal("diagnosis", "x")
        with pytest.raises(IntegrityError):
            cipher_b.open("diagnosis", sealed)
        with pytest.raises(IntegrityError):
            cipher_a.open("notes", sealed)


async def test_missing_data_key_is_an_integrity_error(runtime: Runtime) -> None:
    """An erased row's key is gone: its values can never be opened again."""
    async with runtime.sessions() as session:
        with pytest.raises(IntegrityError):
            await service.row_cipher(session, runtime.envelope, "t", uuid.uuid4(),
                                     uuid.uuid4())


async def test_a_key_made_in_a_unit_of_work_opens_its_rows_there_and_is_forgotten_at_commit(
        runtime: Runtime) -> None:
    row_id = uuid.uuid4()
    async with runtime.unit_of_work() as session:
        cipher = service.new_row_cipher(session, runtime.envelope, "medical_records", row_id)
        sealed = cipher.seal("diagnosis", "Qwertyuiop fever")
        # Not flushed yet: the key comes from the session, not from a round trip.
        again = await service.row_cipher(session, runtime.envelope, "medical_records", row_id,
                                         cipher.data_key_id)
        assert again.open("diagnosis", sealed) == "Qwertyuiop fever"
        with pytest.raises(IntegrityError):  # still bound to its table, column and row
            again.open("notes", sealed)
        held = session
    assert service._NEW_KEYS not in held.info  # noqa: SLF001 - what the session keeps


async def test_a_rolled_back_key_is_gone_from_the_session_and_the_database(
        runtime: Runtime) -> None:
    row_id = uuid.uuid4()
    with pytest.raises(RuntimeError):
        async with runtime.unit_of_work() as session:
            cipher = service.new_row_cipher(session, runtime.envelope, "t", row_id)
            held = session
            raise RuntimeError("the action failed")
    assert service._NEW_KEYS not in held.info  # noqa: SLF001 - what the session keeps
    async with runtime.sessions() as session:
        with pytest.raises(IntegrityError):
            await service.row_cipher(session, runtime.envelope, "t", row_id, cipher.data_key_id)
