"""The direct path (`db/direct.py`, SPEC §14): on PostgreSQL, a record read and a record's
creation skip the ORM session. It must answer exactly as the unit of work does, write exactly
the events the unit of work writes, and hand everything it does not grant (refusals, erased
patients, missing rows, a ciphertext that fails, a failed statement) to the unit of work
before it has written anything. The authorization matrix (test_authorization_matrix.py) runs
every caller kind through both paths; these tests check the path taken and its seams."""

from __future__ import annotations

import asyncio
import functools
import types
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import event as pool_events
from sqlalchemy import func, select, update

from phivault.access.care import CHART_FACTS
from phivault.auth.tokens import AccessClaims
from phivault.clinical import records
from phivault.clinical.models import MedicalRecord, MedicalRecordVersion
from phivault.db.base import utcnow
from phivault.db.direct import DirectQuery, DirectWork
from phivault.keys.models import DataKeyRow
from phivault.privacy import erasure
from phivault.runtime import Runtime
from tests.clinical.world import (
    API,
    book,
    break_glass,
    events_of,
    expect,
    set_consent,
    write_record,
)
from tests.conftest import Backend, client_for
from tests.factories import TestUser, signed_in

pytestmark = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


def count(route: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("phivault_direct_path_total",
                                     {"route": route, "outcome": outcome}) or 0.0


class Counted:
    """The direct path's counters of one route, before and since."""

    def __init__(self, route: str) -> None:
        self.route = route
        self.before = {o: count(route, o) for o in ("answered", "declined", "failed")}

    def since(self) -> dict[str, float]:
        return {o: count(self.route, o) - n for o, n in self.before.items()
                if count(self.route, o) != n}


async def chart(client: httpx.AsyncClient, rt: Runtime) -> tuple[TestUser, TestUser, str]:
    """A consenting patient, their doctor (a scheduled consultation) and a record."""
    patient, doctor = await signed_in(rt, "patient"), await signed_in(rt, "doctor")
    await set_consent(client, patient, True)
    await book(client, patient, doctor)
    return patient, doctor, str((await write_record(client, doctor, patient.id))["id"])


async def through_unit_of_work(rt: Runtime, claims: AccessClaims, record_id: str) -> Any:
    async with rt.unit_of_work() as session:
        view = await records.read_record(session, rt.envelope, claims, uuid.UUID(record_id),
                                         care_days=rt.settings.care_relationship_days)
    return view.model_dump(mode="json")


def claims_of(user: TestUser) -> AccessClaims:
    now = utcnow()
    return AccessClaims(user.id, user.role, uuid.uuid4(), "test", now, now)


async def test_record_reads_and_writes_go_direct_and_answer_as_the_unit_of_work(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    assert runtime.direct is not None
    writes, reads = Counted("create_record"), Counted("read_record")
    patient, doctor, record_id = await chart(client, runtime)
    assert writes.since() == {"answered": 1}
    for reader in (patient, doctor):
        response = await client.get(f"{API}/records/{record_id}", headers=reader.headers)
        # Byte for byte what the unit of work's path makes of the same row.
        assert expect(response, 200) == await through_unit_of_work(
            runtime, claims_of(reader), record_id)
        [event] = (await events_of(runtime, [response.headers["x-request-id"]])).popitem()[1]
        assert (event.action, event.outcome, event.actor_id, event.patient_id,
                event.resource_id) == ("VIEW_MEDICAL_RECORD", "success", reader.id, patient.id,
                                       record_id)
        assert event.event_metadata == {
            "version": 1, "basis": "self" if reader is patient else "care", "break_glass": False}
    assert reads.since() == {"answered": 2}


async def test_a_direct_write_stores_what_the_unit_of_work_reads(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    """The record, its first version sealed under a data key of its own, and its event: the
    ORM reads back what the one statement wrote."""
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    await set_consent(client, patient, True)
    await book(client, patient, doctor)
    response = await client.post(f"{API}/patients/{patient.id}/records", headers=doctor.headers,
                                 json={"diagnosis": "Otitis media", "prescriptions": ["Drops"]})
    made = expect(response, 201)
    assert (made["version"], made["notes"], made["author_id"]) == (1, None, str(doctor.id))
    assert await through_unit_of_work(runtime, claims_of(doctor), made["id"]) == made
    async with runtime.sessions() as session:
        record = await session.get(MedicalRecord, uuid.UUID(made["id"]))
        assert record is not None and record.latest_version == 1
        version = (await session.execute(select(MedicalRecordVersion).where(
            MedicalRecordVersion.record_id == record.id))).scalar_one()
        assert b"Otitis" not in version.diagnosis and version.notes is None
        assert await session.get(DataKeyRow, version.data_key_id) is not None
    [event] = (await events_of(runtime, [response.headers["x-request-id"]])).popitem()[1]
    assert (event.action, event.resource_id, event.event_metadata) == (
        "CREATE_MEDICAL_RECORD", made["id"], {"version": 1, "basis": "care",
                                              "break_glass": False})


async def test_what_the_direct_path_declines_the_unit_of_work_answers(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    """Each refusal is the unit of work's, with its one `ACCESS_DENIED` and nothing else; a
    break-glass read and an erased patient's author get their answers too."""
    patient, doctor, record_id = await chart(client, runtime)
    stranger, other = await signed_in(runtime, "doctor"), await signed_in(runtime, "patient")
    glass = await signed_in(runtime, "doctor")
    expect(await break_glass(client, glass, patient.id), 201)
    reads, writes = Counted("read_record"), Counted("create_record")
    cases = [
        (other, f"{API}/records/{record_id}", 404, "not_found", "other_patient"),
        (stranger, f"{API}/records/{record_id}", 403, "no_care_relationship",
         "no_care_relationship"),
        (doctor, f"{API}/records/{uuid.uuid4()}", 404, "not_found", "no_such_record"),
    ]
    for caller, path, status, error, reason in cases:
        response = await client.get(path, headers=caller.headers)
        expect(response, status, error)
        [event] = (await events_of(runtime, [response.headers["x-request-id"]])).popitem()[1]
        assert (event.action, event.event_metadata["reason"]) == ("ACCESS_DENIED", reason)
    body = {"diagnosis": "Sprain", "prescriptions": []}
    refused = await client.post(f"{API}/patients/{patient.id}/records", headers=glass.headers,
                                json=body)  # break-glass never writes
    expect(refused, 403, "no_care_relationship")
    assert reads.since() == {"declined": 3} and writes.since() == {"declined": 1}

    looked = await client.get(f"{API}/records/{record_id}", headers=glass.headers)
    assert expect(looked, 200)["id"] == record_id
    [event] = (await events_of(runtime, [looked.headers["x-request-id"]])).popitem()[1]
    assert event.event_metadata == {"version": 1, "basis": "break_glass", "break_glass": True}

    await set_consent(client, patient, False)
    expect(await client.get(f"{API}/records/{record_id}", headers=doctor.headers), 403,
           "no_consent")
    expect(await client.post(f"{API}/patients/{patient.id}/records", headers=doctor.headers,
                             json=body), 403, "no_consent")

    async with runtime.unit_of_work() as session:
        await erasure.erase(session, runtime.envelope, patient.id)
    reads = Counted("read_record")
    kept = await client.get(f"{API}/records/{record_id}", headers=doctor.headers)
    assert expect(kept, 200)["id"] == record_id  # the author keeps their own record
    [event] = (await events_of(runtime, [kept.headers["x-request-id"]])).popitem()[1]
    assert event.event_metadata["basis"] == "author"
    expect(await client.get(f"{API}/records/{record_id}", headers=glass.headers), 403,
           "no_care_relationship")
    assert reads.since() == {"declined": 2}


async def test_a_record_that_fails_to_open_is_one_integrity_failure(
        fresh_runtime: Any, backend: Backend, captured_logs: Any) -> None:
    """A tampered version: the direct path lets go before writing its event; the unit of work
    answers 500 `integrity_failure` and writes the one `INTEGRITY_FAILURE`, no read."""
    rt: Runtime = await fresh_runtime()
    async with client_for(rt) as client:
        patient, doctor, record_id = await chart(client, rt)
        async with rt.unit_of_work() as session:
            version = MedicalRecordVersion.record_id == uuid.UUID(record_id)
            sealed = bytearray((await session.execute(select(MedicalRecordVersion.diagnosis)
                                                      .where(version))).scalar_one())
            sealed[-1] ^= 0x01
            await session.execute(update(MedicalRecordVersion).where(version)
                                  .values(diagnosis=bytes(sealed)))
        reads = Counted("read_record")
        response = await client.get(f"{API}/records/{record_id}", headers=doctor.headers)
    expect(response, 500, "integrity_failure")
    assert reads.since() == {"failed": 1}
    [event] = (await events_of(rt, [response.json()["request_id"]])).popitem()[1]
    assert (event.action, event.outcome) == ("INTEGRITY_FAILURE", "error")
    assert "direct_path_failed" not in captured_logs.getvalue()  # an integrity failure is no bug


@pytest.fixture
def first_id_taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[uuid.UUID]]:
    """`records`' next new id is the one the test puts in the list: a collision."""
    taken: list[uuid.UUID] = []

    def uuid4() -> uuid.UUID:
        return taken.pop() if taken else uuid.uuid4()

    monkeypatch.setattr(records, "uuid", types.SimpleNamespace(uuid4=uuid4, UUID=uuid.UUID))
    yield taken


async def test_a_direct_write_that_fails_leaves_nothing_and_the_unit_of_work_writes_it(
        runtime: Runtime, client: httpx.AsyncClient, first_id_taken: list[uuid.UUID],
        captured_logs: Any) -> None:
    """The data key, record, version and event are one statement: a record id that collides
    fails it whole (no key, no event left behind), and the unit of work writes the record."""
    patient, doctor, record_id = await chart(client, runtime)

    async def counts() -> list[int]:
        async with runtime.sessions() as session:
            return [int((await session.execute(select(func.count()).select_from(table)))
                        .scalar_one()) for table in (DataKeyRow, MedicalRecord)]

    writes, before = Counted("create_record"), await counts()
    pool = runtime.engine.sync_engine.pool
    out, moves = pool.checkedout(), {"checkout": 0, "checkin": 0, "invalidate": 0}
    counters = {name: functools.partial(moved, moves, name) for name in moves}
    for name, counter in counters.items():
        pool_events.listen(pool, name, counter)
    first_id_taken.append(uuid.UUID(record_id))
    try:
        response = await client.post(f"{API}/patients/{patient.id}/records",
                                     headers=doctor.headers,
                                     json={"diagnosis": "Sinusitis", "prescriptions": []})
    finally:
        for name, counter in counters.items():
            pool_events.remove(pool, name, counter)
    made = expect(response, 201)
    # The failed statement's connection was closed, not pooled, and every checkout checked in
    # (`phivault_db_connections{state="checked_out"}` counts them).
    assert moves["invalidate"] == 1 and moves["checkout"] == moves["checkin"], moves
    assert pool.checkedout() == out
    assert made["id"] != record_id and writes.since() == {"failed": 1}
    assert [after - then for after, then in zip(await counts(), before, strict=True)] == [1, 1]
    [event] = (await events_of(runtime, [response.headers["x-request-id"]])).popitem()[1]
    assert event.action == "CREATE_MEDICAL_RECORD"
    failed = [line for line in captured_logs.getvalue().splitlines()
              if "direct_path_failed" in line]
    assert len(failed) == 1 and "UniqueViolation" in failed[0] and "Sinusitis" not in failed[0]


def moved(moves: dict[str, int], name: str, *_: Any) -> None:
    moves[name] += 1


async def test_a_cancelled_direct_read_gives_its_connection_back(
        runtime: Runtime, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request cancelled while its statement runs (a shutdown's deadline, an in-process
    caller's timeout): no fallback, and the connection is not leaked."""
    patient, doctor, record_id = await chart(client, runtime)
    pool, real = runtime.engine.sync_engine.pool, DirectWork.fetchrow
    out, started = pool.checkedout(), asyncio.Event()

    async def slow(self: DirectWork, statement: Any, **params: Any) -> Any:
        started.set()
        await self.connection.execute("SELECT pg_sleep(2)")
        return await real(self, statement, **params)

    monkeypatch.setattr(DirectWork, "fetchrow", slow)
    reads = Counted("read_record")
    task = asyncio.create_task(client.get(f"{API}/records/{record_id}", headers=doctor.headers))
    await started.wait()
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.setattr(DirectWork, "fetchrow", real)
    assert pool.checkedout() == out and reads.since() == {}
    expect(await client.get(f"{API}/records/{record_id}", headers=doctor.headers), 200)


async def test_concurrent_reads_and_writes_each_write_one_event(
        runtime: Runtime, client: httpx.AsyncClient) -> None:
    patient, doctor, record_id = await chart(client, runtime)
    denied = await client.post(f"{API}/patients/{patient.id}/records", headers=patient.headers,
                               json={"diagnosis": "Self-diagnosed", "prescriptions": []})
    expect(denied, 403, "forbidden")  # the role rule's refusal, in its own unit of work
    reads = [client.get(f"{API}/records/{record_id}", headers=(patient, doctor)[i % 2].headers)
             for i in range(24)]
    writes = [client.post(f"{API}/patients/{patient.id}/records", headers=doctor.headers,
                          json={"diagnosis": f"Cough {i}", "prescriptions": []})
              for i in range(8)]
    answers = await asyncio.gather(*reads, *writes)
    assert [a.status_code for a in answers] == [200] * 24 + [201] * 8
    found = await events_of(runtime, [a.headers["x-request-id"] for a in [denied, *answers]])
    assert [[e.action for e in events] for events in found.values()] == [
        ["ACCESS_DENIED"], *[["VIEW_MEDICAL_RECORD"]] * 24, *[["CREATE_MEDICAL_RECORD"]] * 8]


async def test_a_direct_query_binds_as_sqlalchemy_does(runtime: Runtime) -> None:
    """Parameters by position, the statement's literals filled in, each value through its
    type's processor (an aware time to UTC, a naive one refused, JSON serialised)."""
    assert runtime.direct is not None
    query = DirectQuery(CHART_FACTS, runtime.engine.dialect)
    assert "$1" in query.sql and ":doctor" not in query.sql
    now = utcnow()
    patient, doctor = uuid.uuid4(), uuid.uuid4()
    arguments = query.arguments({"patient": patient, "doctor": doctor, "now": now,
                                 "care_from": now})
    assert patient in arguments and doctor in arguments and "patient" in arguments
    with pytest.raises(ValueError, match="naive"):
        query.arguments({"patient": patient, "doctor": doctor, "now": now.replace(tzinfo=None),
                         "care_from": now})
    with pytest.raises(KeyError, match="doctor"):
        query.arguments({"patient": patient, "now": now, "care_from": now})
