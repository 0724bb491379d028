"""The FHIR R4 form of a patient's data export (SPEC §9, `GET /me/export?format=fhir`): the
mapping only. Each function takes one item of the JSON export (the allowlisted, decrypted
fields of `privacy/export.py`) and returns one Bundle entry, validated with `fhir.resources`
as it is built; `export.py` streams the entries into a Bundle of type `collection`.

The mapping:

- `Patient` (the profile; an erased account has no name or contacts, `active` false, and only
  the birth year), `Practitioner` (each doctor the data names), and `Device` (phivault, the
  observer of every AuditEvent).
- `Encounter` per consultation (`proposed`/`scheduled` → `planned`, `completed` →
  `finished`, `cancelled`); the reason as `reasonCode.text`, the doctor's notes in the
  extension `urn:phivault:fhir:consultation-notes` (R4's Encounter has no note).
- `Condition` per version of a medical record: the diagnosis as `code.text`, the record id as
  `identifier`, the version as `meta.versionId` (the highest is the current one), the notes as
  `note`, the record's prescriptions (free text) in the extension
  `urn:phivault:fhir:record-prescription`. Nothing phivault stores is a measurement, so no
  `Observation` is made.
- `MedicationRequest` per prescription (`intent` order, `status` unknown: phivault keeps none);
  dosage and instructions in `dosageInstruction`.
- `DocumentReference` per attachment: metadata only (title, type, size, date), no content.
- `Communication` per notification; `Consent` per version of the consents (the newest
  `active`, earlier ones `inactive`), each choice a nested provision (`permit`/`deny`) whose
  purpose is `urn:phivault:consent-purpose` marketing, data_sharing or analytics.
- `AuditEvent` per entry of the access log, coded as `audit/fhir.py` codes the trail.
- Payments have no stand-alone R4 resource (PaymentNotice needs a PaymentReconciliation and an
  Organization phivault does not have): they are in the JSON export only.

Every reference is a `urn:uuid:` fullUrl of an entry of the same Bundle: ids of phivault's rows
where they are UUIDs, name-based UUIDs (`uuid5`) for the rest (record versions, consent
versions, log entries, the Device). R4B's resources are R4's for all of these (the package's
root models are R5), so the R4B models validate.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.consent import Consent
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.practitioner import Practitioner
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from phivault import __version__
from phivault.audit.fhir import (
    ACTION_SYSTEM,
    DICOM,
    OUTCOME_CODES,
    ROLE_SYSTEM,
    FhirMappingError,
    action_code,
    event_type,
    validate_resource,
)

USER_SYSTEM = "urn:phivault:user"
RECORD_SYSTEM = "urn:phivault:medical-record"
CONSENT_PURPOSE_SYSTEM = "urn:phivault:consent-purpose"
NOTES_EXTENSION = "urn:phivault:fhir:consultation-notes"
RECORD_PRESCRIPTION_EXTENSION = "urn:phivault:fhir:record-prescription"
# The namespace of the name-based ids of entries that have no UUID of their own.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:phivault:export")
DEVICE_ID = uuid.uuid5(NAMESPACE, "device:phivault")
GENDERS = frozenset({"female", "male", "other", "unknown"})
ENCOUNTER_STATUS = {"proposed": "planned", "scheduled": "planned", "completed": "finished",
                    "cancelled": "cancelled"}
CONSENT_PURPOSES = ("marketing", "data_sharing", "analytics")

_MODELS: dict[str, type[Resource]] = {model.__name__: model for model in (
    Patient, Practitioner, Device, Encounter, Condition, MedicationRequest, DocumentReference,
    Communication, Consent)}

Item = Mapping[str, Any]


class FhirExportError(ValueError):
    """An item did not map to a valid FHIR R4 resource. The message names the resource type
    only: a validation message quotes the offending values, which are PHI here."""


def ref(entry_id: uuid.UUID) -> dict[str, str]:
    return {"reference": f"urn:uuid:{entry_id}"}


def _time(value: datetime) -> str:
    return value.isoformat()


def _person(patient_id: uuid.UUID, person: Item) -> dict[str, str]:
    """A reference to the Patient when `person` is the patient, else to their Practitioner."""
    return ref(patient_id if str(person["id"]) == str(patient_id) else person["id"])


def _identifier(system: str, value: object) -> list[dict[str, str]]:
    return [{"system": system, "value": str(value)}]


def entry(resource: dict[str, Any], entry_id: uuid.UUID) -> bytes:
    """One Bundle entry, as JSON: `resource` validated with `fhir.resources` (R4), under the
    fullUrl `urn:uuid:<entry_id>`. `FhirExportError` when it is not valid."""
    kind = str(resource.get("resourceType"))
    try:
        if kind == "AuditEvent":
            validate_resource(resource)
        else:
            _MODELS[kind].model_validate(resource)
    except (ValidationError, FhirMappingError, KeyError):
        raise FhirExportError(f"a {kind} of the export is not valid FHIR R4") from None
    return orjson.dumps({"fullUrl": f"urn:uuid:{entry_id}", "resource": resource},
                        default=str)


def patient(profile: Item) -> bytes:
    resource: dict[str, Any] = {
        "resourceType": "Patient", "id": str(profile["id"]),
        "identifier": _identifier(USER_SYSTEM, profile["id"]),
        "active": profile["status"] == "active"}
    if profile["full_name"]:
        resource["name"] = [{"text": profile["full_name"]}]
    telecom = [{"system": system, "value": profile[key]}
               for system, key in (("email", "email"), ("phone", "phone")) if profile[key]]
    if telecom:
        resource["telecom"] = telecom
    if profile["sex"] in GENDERS:
        resource["gender"] = profile["sex"]
    if profile["birth_date"]:
        resource["birthDate"] = profile["birth_date"]  # a year only, once erased
    if profile["address"]:
        resource["address"] = [{"text": profile["address"]}]
    return entry(resource, profile["id"])


def practitioner(person: Item) -> bytes:
    resource: dict[str, Any] = {"resourceType": "Practitioner", "id": str(person["id"]),
                                "identifier": _identifier(USER_SYSTEM, person["id"])}
    if person["name"]:
        resource["name"] = [{"text": person["name"]}]
    if person["specialty"]:
        resource["qualification"] = [{"code": {"text": person["specialty"]}}]
    return entry(resource, person["id"])


def device() -> bytes:
    """phivault itself: the observer of the access log's AuditEvents."""
    return entry({"resourceType": "Device", "id": str(DEVICE_ID),
                  "deviceName": [{"name": "phivault", "type": "user-friendly-name"}],
                  "version": [{"value": __version__}]}, DEVICE_ID)


def encounter(patient_id: uuid.UUID, item: Item) -> bytes:
    resource: dict[str, Any] = {
        "resourceType": "Encounter", "id": str(item["id"]),
        "status": ENCOUNTER_STATUS.get(item["status"], "unknown"),
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                  "code": "AMB", "display": "ambulatory"},
        "subject": ref(patient_id),
        "participant": [{"individual": _person(patient_id, item["doctor"])}],
        "period": {"start": _time(item["scheduled_at"])},
        "reasonCode": [{"text": item["reason"]}]}
    if item["notes"]:
        resource["extension"] = [{"url": NOTES_EXTENSION, "valueString": item["notes"]}]
    return entry(resource, item["id"])


def record_version_id(record_id: uuid.UUID, version: int) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"medical-record:{record_id}:{version}")


def condition(patient_id: uuid.UUID, item: Item) -> bytes:
    entry_id = record_version_id(item["record_id"], item["version"])
    resource: dict[str, Any] = {
        "resourceType": "Condition", "id": str(entry_id),
        "meta": {"versionId": str(item["version"])},
        "identifier": _identifier(RECORD_SYSTEM, item["record_id"]),
        "code": {"text": item["diagnosis"]}, "subject": ref(patient_id),
        "recordedDate": _time(item["created_at"]),
        "recorder": _person(patient_id, item["author"])}
    if item["notes"]:
        resource["note"] = [{"text": item["notes"]}]
    if item["prescriptions"]:
        resource["extension"] = [{"url": RECORD_PRESCRIPTION_EXTENSION, "valueString": text}
                                 for text in item["prescriptions"]]
    return entry(resource, entry_id)


def medication_request(patient_id: uuid.UUID, item: Item) -> bytes:
    return entry({
        "resourceType": "MedicationRequest", "id": str(item["id"]), "status": "unknown",
        "intent": "order", "medicationCodeableConcept": {"text": item["medication"]},
        "subject": ref(patient_id), "authoredOn": _time(item["created_at"]),
        "requester": _person(patient_id, item["doctor"]),
        "dosageInstruction": [{"text": item["dosage"],
                               "patientInstruction": item["instructions"]}]}, item["id"])


def document_reference(patient_id: uuid.UUID, item: Item) -> bytes:
    return entry({
        "resourceType": "DocumentReference", "id": str(item["id"]), "status": "current",
        "subject": ref(patient_id), "date": _time(item["created_at"]),
        "author": [_person(patient_id, item["uploader"])],
        "content": [{"attachment": {"contentType": item["content_type"],
                                    "title": item["filename"], "size": item["size"],
                                    "creation": _time(item["created_at"])}}]}, item["id"])


def communication(patient_id: uuid.UUID, item: Item) -> bytes:
    return entry({
        "resourceType": "Communication", "id": str(item["id"]), "status": "completed",
        "category": [{"text": item["kind"]}], "subject": ref(patient_id),
        "recipient": [ref(patient_id)], "sent": _time(item["created_at"]),
        "payload": [{"contentString": item["text"]}]}, item["id"])


def consent(patient_id: uuid.UUID, item: Item, *, current: bool) -> bytes:
    entry_id = uuid.uuid5(NAMESPACE, f"consent:{patient_id}:{item['version']}")
    return entry({
        "resourceType": "Consent", "id": str(entry_id),
        "status": "active" if current else "inactive",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy", "display": "Privacy Consent"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0",
                                  "display": "Patient Consent"}]}],
        "patient": ref(patient_id), "dateTime": _time(item["consent_date"]),
        "identifier": [{"system": f"urn:phivault:consent-version:{patient_id}",
                        "value": str(item["version"])}],
        "policyRule": {"text": "phivault consents: marketing, sharing one's chart with one's "
                               "doctors (data_sharing), analytics"},
        "provision": {"provision": [
            {"type": "permit" if item[purpose] else "deny",
             "purpose": [{"system": CONSENT_PURPOSE_SYSTEM, "code": purpose}]}
            for purpose in CONSENT_PURPOSES]}}, entry_id)


def audit_event(patient_id: uuid.UUID, seq: int, item: Item) -> bytes:
    """An entry of the access log: who (role, a staff member's name), what, when, outcome."""
    entry_id = uuid.uuid5(NAMESPACE, f"access-log:{seq}")
    code, display = event_type(item["action"])
    agent: dict[str, Any] = {"requestor": True}
    if item["actor_name"]:
        agent["who"] = {"display": item["actor_name"]}
    elif item["actor_role"] == "system":
        agent["who"] = ref(DEVICE_ID)
    if item["actor_role"]:
        agent["role"] = [{"coding": [{"system": ROLE_SYSTEM, "code": item["actor_role"]}],
                          "text": item["actor_role"]}]
    if item["break_glass"]:
        agent["purposeOfUse"] = [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "ETREAT",
            "display": "Emergency Treatment"}]}]
    return entry({
        "resourceType": "AuditEvent", "id": str(entry_id),
        "type": {"system": DICOM, "code": code, "display": display},
        "subtype": [{"system": ACTION_SYSTEM, "code": item["action"]}],
        "action": action_code(item["action"]), "recorded": _time(item["at"]),
        "outcome": OUTCOME_CODES.get(item["outcome"], "8"),
        "agent": [agent],
        "source": {"observer": ref(DEVICE_ID), "type": [{
            "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
            "code": "4", "display": "Application Server"}]},
        "entity": [{"what": ref(patient_id),
                    "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Patient"},
                    "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role",
                             "code": "1", "display": "Patient"}}]}, entry_id)


__all__ = ["DEVICE_ID", "FhirExportError", "audit_event", "communication", "condition",
           "consent", "device", "document_reference", "encounter", "entry",
           "medication_request", "patient", "practitioner", "record_version_id", "ref"]
