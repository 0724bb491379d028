"""The scene of the patient pages' tests: a patient with a doctor, a consultation, a record and
a prescription (made through the API, so audited and sealed as in life), a browser signed in to
the portal as someone, and the audit events of one request."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import func, select

from phivault.audit.models import AuditEvent
from phivault.runtime import Runtime
from tests.clinical.world import book, events_of, prescribe, set_consent, write_record
from tests.factories import TestUser, signed_in

PATIENT_NAME = "Alex Example"
DOCTOR_NAME = "Dr Ada Care"
DIAGNOSIS = "Acute bronchitis"
REASON = "Persistent cough"
# Every page of the patient's, and every form they post (with a valid body but its token).
PAGES = ("/portal/profile", "/portal/records", "/portal/access-log", "/portal/care-team",
         "/portal/consents", "/portal/export", "/portal/erase")
# The actions a form of the patient's writes when it does something.
CHANGES = ("UPDATE_PROFILE", "CONSENT_CHANGED", "DELETE_CARE_RELATIONSHIP", "DATA_EXPORT",
           "ACCOUNT_ERASED")


@dataclass
class PatientWorld:
    patient: TestUser  # also signed in to the API (its access token)
    doctor: TestUser  # a scheduled consultation with the patient, who shares their data
    consultation: dict[str, Any]
    record: dict[str, Any]
    prescription: dict[str, Any]


async def patient_world(runtime: Runtime, client: httpx.AsyncClient) -> PatientWorld:
    patient = await signed_in(runtime, "patient", full_name=PATIENT_NAME)
    doctor = await signed_in(runtime, "doctor", full_name=DOCTOR_NAME,
                             specialty="General practice")
    await set_consent(client, patient, True)
    consultation = await book(client, patient, doctor, reason=REASON)
    record = await write_record(client, doctor, patient.id, diagnosis=DIAGNOSIS)
    prescription = await prescribe(client, doctor, patient.id)
    return PatientWorld(patient, doctor, consultation, record, prescription)


def forms(world: PatientWorld) -> dict[str, dict[str, str]]:
    """Each form of the patient's pages: its action and a body that does something."""
    return {
        "/portal/profile": {"full_name": "Mallory Changed", "phone": "+44 20 7946 0999",
                            "address": "", "birth_date": ""},
        "/portal/consents": {"marketing": "true"},
        f"/portal/care-team/{world.doctor.id}/end": {},
        "/portal/export": {"format": "json"},
        "/portal/erase": {"password": world.patient.password},
    }


async def events(runtime: Runtime, response: httpx.Response) -> list[AuditEvent]:
    """The audit events of the request that `response` answers."""
    request_id = response.headers["x-request-id"]
    return (await events_of(runtime, [request_id]))[request_id]


def shape(event: AuditEvent) -> tuple[str, ...]:
    """What an event says, without when, where from and which request."""
    return (str(event.actor_id), str(event.actor_role), event.action, str(event.resource_type),
            str(event.resource_id), str(event.patient_id), event.outcome,
            json.dumps(event.event_metadata, sort_keys=True))


async def count_changes(runtime: Runtime, patient: TestUser) -> int:
    """How many events of the patient's own changes (`CHANGES`) the trail holds."""
    async with runtime.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.actor_id == patient.id, AuditEvent.action.in_(CHANGES)))).scalar_one())
