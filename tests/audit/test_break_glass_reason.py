"""The BREAK_GLASS event binds its grant's sealed reason (`reason_mac`): a reason nulled,
swapped or rebound, or its grant deleted, around the ORM is a 500 `integrity_failure` when an
auditor reads it, audited as INTEGRITY_FAILURE, never a silent null."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import delete, select, update

from phivault.access.break_glass import ReasonMac
from phivault.audit import service as audit_service
from phivault.clinical.models import BreakGlassGrant
from phivault.crypto import IntegrityError
from phivault.runtime import Runtime
from tests.clinical.world import API, BREAK_GLASS_REASON, break_glass, events_of, expect
from tests.conftest import client_for
from tests.factories import TestUser, signed_in

_GRANTS = BreakGlassGrant.__table__


async def _grant(rt: Runtime, doctor: TestUser, patient: TestUser) -> tuple[uuid.UUID, str]:
    """A break-glass through the API: the grant's id and its event's `reason_mac`."""
    async with client_for(rt) as client:
        response = await break_glass(client, doctor, patient.id)
    expect(response, 201)
    request_id = response.headers["x-request-id"]
    (event,) = [e for e in (await events_of(rt, [request_id]))[request_id]
                if e.action == "BREAK_GLASS"]
    return uuid.UUID(str(event.resource_id)), event.event_metadata["reason_mac"]


async def _tamper(rt: Runtime, statement: Any) -> None:
    """Change the grant the way someone with the runtime's database role could: around the
    ORM (break_glass_grants has no triggers)."""
    async with rt.engine.begin() as connection:
        await connection.execute(statement)


def test_the_digest_binds_every_part() -> None:
    mac = ReasonMac.from_audit_key(bytes(32))
    grant, patient, doctor = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    digest = mac.digest(grant, patient, doctor, "Collapsed at home")
    assert len(bytes.fromhex(digest)) == 32
    mac.verify(digest, grant, patient, doctor, "Collapsed at home")
    for changed in ((uuid.uuid4(), patient, doctor, "Collapsed at home"),
                    (grant, uuid.uuid4(), doctor, "Collapsed at home"),
                    (grant, patient, uuid.uuid4(), "Collapsed at home"),
                    (grant, patient, doctor, "Collapsed at home!"),
                    (grant, doctor, patient, "Collapsed at home")):
        with pytest.raises(IntegrityError):
            mac.verify(digest, *changed)
    # Under another audit key, or for another purpose of the same key, the digest differs.
    assert ReasonMac.from_audit_key(bytes([1]) * 32).digest(
        grant, patient, doctor, "Collapsed at home") != digest
    assert ReasonMac(bytes(32)).digest(grant, patient, doctor, "Collapsed at home") != digest


async def test_a_grants_reason_is_answered_and_verified(runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    auditor = await signed_in(runtime, "auditor")
    grant_id, reason_mac = await _grant(runtime, doctor, patient)
    assert reason_mac == ReasonMac.from_audit_key(runtime.audit_key).digest(
        grant_id, patient.id, doctor.id, BREAK_GLASS_REASON)
    async with client_for(runtime) as client:
        found = expect(await client.get(f"{API}/audit", headers=auditor.headers,
                                        params={"patient_id": str(patient.id),
                                                "action": "BREAK_GLASS"}), 200)
    assert [(e["resource_id"], e["break_glass_reason"], e["metadata"]["reason_mac"])
            for e in found] == [(str(grant_id), BREAK_GLASS_REASON, reason_mac)]


def _reason_nulled(target: uuid.UUID, _: uuid.UUID, __: dict[str, TestUser]) -> Any:
    return update(_GRANTS).where(_GRANTS.c.id == target).values(reason=None)


def _grant_deleted(target: uuid.UUID, _: uuid.UUID, __: dict[str, TestUser]) -> Any:
    return delete(_GRANTS).where(_GRANTS.c.id == target)


def _patient_changed(target: uuid.UUID, _: uuid.UUID, people: dict[str, TestUser]) -> Any:
    return update(_GRANTS).where(_GRANTS.c.id == target).values(
        patient_id=people["other_patient"].id)


def _doctor_changed(target: uuid.UUID, _: uuid.UUID, people: dict[str, TestUser]) -> Any:
    return update(_GRANTS).where(_GRANTS.c.id == target).values(
        doctor_id=people["other_doctor"].id)


def _reason_swapped(target: uuid.UUID, donor: uuid.UUID, _: dict[str, TestUser]) -> Any:
    donor_row = select(_GRANTS.c.reason, _GRANTS.c.data_key_id).where(_GRANTS.c.id == donor)
    return update(_GRANTS).where(_GRANTS.c.id == target).values(
        reason=donor_row.with_only_columns(_GRANTS.c.reason).scalar_subquery(),
        data_key_id=donor_row.with_only_columns(_GRANTS.c.data_key_id).scalar_subquery())


@pytest.mark.parametrize("tamper", [_reason_nulled, _grant_deleted, _reason_swapped,
                                    _patient_changed, _doctor_changed])
async def test_a_tampered_grant_is_an_integrity_failure(
        fresh_runtime: Callable[..., Any], tamper: Callable[..., Any]) -> None:
    rt: Runtime = await fresh_runtime()
    people = {role: await signed_in(rt, kind) for role, kind in (
        ("patient", "patient"), ("other_patient", "patient"), ("doctor", "doctor"),
        ("other_doctor", "doctor"), ("auditor", "auditor"))}
    target, _ = await _grant(rt, people["doctor"], people["patient"])
    # The donor: another doctor's grant for the same patient, its reason sealed the same way.
    donor, _ = await _grant(rt, people["other_doctor"], people["patient"])
    await _tamper(rt, tamper(target, donor, people))

    async with client_for(rt) as client:
        response = await client.get(f"{API}/audit", headers=people["auditor"].headers,
                                    params={"action": "BREAK_GLASS"})
    expect(response, 500, "integrity_failure")
    assert BREAK_GLASS_REASON not in response.text
    request_id = response.json()["request_id"]
    events = (await events_of(rt, [request_id]))[request_id]
    assert [(e.action, e.outcome, e.actor_id) for e in events] == [
        ("INTEGRITY_FAILURE", "error", people["auditor"].id)]
    # The chain itself still holds: only the grant, outside it, was changed.
    result = await audit_service.verify_snapshot(rt.sessions, rt.audit_key, rt.sequencer,
                                                 rt.queue_key)
    assert result.ok
