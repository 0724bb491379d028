"""The audit chain: append in the action's transaction, verify, and catch every kind of tamper."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select, text

from phivault.audit import service
from phivault.audit.actions import Action, Outcome
from phivault.audit.models import AuditEvent, AuditHead
from phivault.request_context import Actor
from phivault.runtime import Runtime


async def _append(rt: Runtime, n: int, **fields: Any) -> None:
    async with rt.unit_of_work() as session:
        for i in range(n):
            service.record(session, Action.VIEW_MEDICAL_RECORD, resource_type="medical_record",
                           resource_id=uuid.uuid4(), metadata={"count": i}, **fields)


async def _events(rt: Runtime) -> list[AuditEvent]:
    async with rt.sessions() as session:
        return list((await session.execute(select(AuditEvent).order_by(AuditEvent.seq)))
                    .scalars())


async def _raw(rt: Runtime, sql: str, **params: Any) -> None:
    """Tamper the way someone with database access would: around the ORM and the triggers."""
    async with rt.engine.begin() as connection:
        if rt.engine.dialect.name == "postgresql":
            await connection.execute(text("SET LOCAL session_replication_role = replica"))
        else:
            await connection.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
            await connection.execute(text("DROP TRIGGER IF EXISTS audit_events_no_delete"))
            await connection.execute(text("DROP TRIGGER IF EXISTS audit_head_follows_chain"))
        await connection.execute(text(sql), params)


async def test_events_chain_and_verify(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    actor = Actor(uuid.uuid4(), "doctor")
    await _append(rt, 3, actor=actor, patient_id=uuid.uuid4())
    await _append(rt, 2)
    events = await _events(rt)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == bytes(32)
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:], strict=False))
    assert events[0].actor_id == actor.id and events[0].actor_role == "doctor"
    assert events[3].actor_role == "system"
    result = await service.verify_snapshot(rt.sessions, rt.audit_key)
    assert result.as_dict() == {"ok": True, "events": 5, "first_bad_seq": None}


async def test_empty_chain_verifies(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    assert (await service.verify_snapshot(rt.sessions, rt.audit_key)).as_dict() == {
        "ok": True, "events": 0, "first_bad_seq": None}


async def test_rolled_back_work_leaves_no_success_event_but_keeps_denials(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    with pytest.raises(RuntimeError):
        async with rt.unit_of_work() as session:
            service.record(session, Action.CREATE_PRESCRIPTION)
            service.record(session, Action.ACCESS_DENIED, outcome=Outcome.DENIED)
            raise RuntimeError("the action failed")
    events = await _events(rt)
    assert [(e.seq, e.action, e.outcome) for e in events] == [(1, "ACCESS_DENIED", "denied")]
    assert (await service.verify_snapshot(rt.sessions, rt.audit_key)).ok


async def test_event_write_failure_fails_the_action(fresh_runtime: Callable[..., Any]) -> None:
    """If the event cannot be written, the action it records does not commit either."""
    rt = await fresh_runtime()
    from phivault.keys.models import DataKeyRow
    from phivault.keys.service import new_row_cipher

    row_id = uuid.uuid4()
    with pytest.raises(Exception):  # noqa: B017 - any database error will do
        async with rt.unit_of_work() as session:
            new_row_cipher(session, rt.envelope, "t", row_id)
            service.record(session, Action.CREATE_MEDICAL_RECORD)
            # Break the head row so appending the event fails inside the same transaction.
            await session.execute(text("DELETE FROM audit_head"))
    async with rt.sessions() as session:
        assert (await session.execute(select(DataKeyRow))).first() is None
        assert (await session.execute(select(AuditHead))).scalar_one().seq == 0


@pytest.mark.parametrize("metadata", [
    {"email": "x"}, {"Bad-Key": 1}, {"count": 1.5}, {"count": {"nested": 1}}, {"notes": "n"},
    {"reason": "y" * 1001}, {"patient_name": "x"}, {"dob": "1970"}, {"diagnosis_text": "x"},
    {"emails": "x"}, {"reason\n": "x"}, {"email\n": "x"},
])
def test_metadata_that_could_carry_phi_is_refused(metadata: dict[str, Any]) -> None:
    class FakeSession:
        info: dict[str, Any] = {}

    with pytest.raises(service.AuditMetadataError):
        service.record(FakeSession(), Action.VIEW_PROFILE, metadata=metadata)  # type: ignore[arg-type]


@pytest.mark.tampers
@pytest.mark.parametrize("tamper, first_bad", [
    ("UPDATE audit_events SET action = 'LOGIN_SUCCESS' WHERE seq = 3", 3),
    ("UPDATE audit_events SET metadata = '{\"count\": 99}' WHERE seq = 4", 4),
    ("UPDATE audit_events SET outcome = 'denied' WHERE seq = 1", 1),
    ("DELETE FROM audit_events WHERE seq = 2", 2),
    ("DELETE FROM audit_events WHERE seq = 5", 5),
    ("DELETE FROM audit_events WHERE seq >= 4", 4),
])
async def test_verify_names_the_first_bad_seq(fresh_runtime: Callable[..., Any], tamper: str,
                                              first_bad: int) -> None:
    rt = await fresh_runtime()
    await _append(rt, 5)
    await _raw(rt, tamper)
    result = await service.verify_snapshot(rt.sessions, rt.audit_key)
    assert (result.ok, result.first_bad_seq) == (False, first_bad)


@pytest.mark.tampers
async def test_reordered_events_are_caught(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    await _append(rt, 5)
    # Swap events 2 and 3 (their seq kept, the rest of each row exchanged).
    await _raw(rt, "UPDATE audit_events SET seq = 1000 WHERE seq = 2")
    await _raw(rt, "UPDATE audit_events SET seq = 2 WHERE seq = 3")
    await _raw(rt, "UPDATE audit_events SET seq = 3 WHERE seq = 1000")
    result = await service.verify_snapshot(rt.sessions, rt.audit_key)
    assert (result.ok, result.first_bad_seq) == (False, 2)


@pytest.mark.tampers
async def test_inserted_event_is_caught(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    await _append(rt, 4)
    events = await _events(rt)
    # Make room after seq 2 and insert a copy of event 2 there (a forged, plausible row).
    for seq in (4, 3):
        await _raw(rt, f"UPDATE audit_events SET seq = {seq + 1} WHERE seq = {seq}")  # noqa: S608
    forged = events[1]
    await _raw(rt, "INSERT INTO audit_events (seq, at, actor_id, actor_role, action, "
               "resource_type, resource_id, patient_id, outcome, ip, user_agent, request_id, "
               "metadata, prev_hash, hash) SELECT 3, at, actor_id, actor_role, action, "
               "resource_type, resource_id, patient_id, outcome, ip, user_agent, request_id, "
               "metadata, prev_hash, hash FROM audit_events WHERE seq = 2")
    assert forged.seq == 2
    result = await service.verify_snapshot(rt.sessions, rt.audit_key)
    assert (result.ok, result.first_bad_seq) == (False, 3)


@pytest.mark.tampers
async def test_event_appended_around_the_head_is_caught(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    await _append(rt, 3)
    await _raw(rt, "INSERT INTO audit_events (seq, at, action, outcome, metadata, prev_hash, "
               "hash) SELECT 4, at, action, outcome, metadata, hash, hash FROM audit_events "
               "WHERE seq = 3")
    result = await service.verify_snapshot(rt.sessions, rt.audit_key)
    assert (result.ok, result.first_bad_seq) == (False, 4)


@pytest.mark.tampers
async def test_head_rewound_with_a_wrong_hash_is_caught(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    await _append(rt, 5)
    # Cut the last event and move the head's seq back, but keep the head's (old) hash.
    await _raw(rt, "DELETE FROM audit_events WHERE seq = 5")
    await _raw(rt, "UPDATE audit_head SET seq = 4")
    result = await service.verify_snapshot(rt.sessions, rt.audit_key)
    assert (result.ok, result.first_bad_seq) == (False, 4)


@pytest.mark.tampers
async def test_head_hash_edited_alone_is_caught(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    await _append(rt, 3)
    await _raw(rt, "UPDATE audit_head SET hash = :forged", forged=bytes(32))
    result = await service.verify_snapshot(rt.sessions, rt.audit_key)
    assert (result.ok, result.first_bad_seq) == (False, 3)


async def test_another_key_does_not_verify(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    await _append(rt, 2)
    result = await service.verify_snapshot(rt.sessions, bytes(32))
    assert (result.ok, result.first_bad_seq) == (False, 1)


async def test_audit_table_refuses_update_and_delete(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    await _append(rt, 1)
    for statement in ("UPDATE audit_events SET action = 'X'", "DELETE FROM audit_events"):
        with pytest.raises(Exception, match="append-only"):
            async with rt.engine.begin() as connection:
                await connection.execute(text(statement))
    if rt.engine.dialect.name == "postgresql":
        with pytest.raises(Exception, match="append-only"):
            async with rt.engine.begin() as connection:
                await connection.execute(text("TRUNCATE audit_events"))
    assert (await service.verify_snapshot(rt.sessions, rt.audit_key)).ok


async def test_concurrent_appends_make_one_gap_free_chain(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()

    async def one(i: int) -> None:
        async with rt.unit_of_work() as session:
            service.record(session, Action.VIEW_PRESCRIPTION, metadata={"count": i})

    await asyncio.gather(*(one(i) for i in range(200)))
    events = await _events(rt)
    assert [e.seq for e in events] == list(range(1, 201))
    assert sorted(e.event_metadata["count"] for e in events) == list(range(200))
    result = await service.verify_snapshot(rt.sessions, rt.audit_key)
    assert result.as_dict() == {"ok": True, "events": 200, "first_bad_seq": None}


async def test_seq_below_one_is_refused_and_would_be_caught(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    await _append(rt, 2)
    with pytest.raises(Exception, match="(?i)check"):
        async with rt.engine.begin() as connection:
            await connection.execute(text(
                "INSERT INTO audit_events (seq, at, action, outcome, metadata, prev_hash, hash) "
                "SELECT 0, at, action, outcome, metadata, prev_hash, hash FROM audit_events "
                "WHERE seq = 1"))
    # Had it got in (constraint dropped), verification reads from the lowest seq and fails.
    from phivault.audit.chain import ChainedEvent, ChainVerifier

    events = await _events(rt)
    stray = ChainedEvent(0, events[0].at, None, None, "X", None, None, None, "success", None,
                         None, None, {}, bytes(32), bytes(32))
    verifier = ChainVerifier(rt.audit_key)
    verifier.feed([stray, *[_chained(e) for e in events]])
    result = verifier.finish(2, events[-1].hash)
    assert (result.ok, result.first_bad_seq) == (False, 0)


def _chained(row: AuditEvent) -> Any:
    from phivault.audit.chain import ChainedEvent

    return ChainedEvent(row.seq, row.at, row.actor_id, row.actor_role, row.action,
                        row.resource_type, row.resource_id, row.patient_id, row.outcome, row.ip,
                        row.user_agent, row.request_id, row.event_metadata, row.prev_hash,
                        row.hash)


async def test_durable_events_survive_a_failed_commit(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    from phivault.db.base import utcnow
    from phivault.keys.models import DataKeyRow

    key_id = uuid.uuid4()
    async with rt.unit_of_work() as session:
        session.add(DataKeyRow(id=key_id, kek_id="k", wrapped=b"x", created_at=utcnow()))
    with pytest.raises(Exception):  # noqa: B017 - the duplicate key fails the commit
        async with rt.unit_of_work() as session:
            service.record(session, Action.LOGIN_FAILURE, outcome=Outcome.DENIED)
            session.add(DataKeyRow(id=key_id, kek_id="k", wrapped=b"y", created_at=utcnow()))
    events = await _events(rt)
    assert [(e.action, e.outcome) for e in events] == [("LOGIN_FAILURE", "denied")]
