"""The FHIR R4 `AuditEvent` form of an audit event (SPEC §8, `phivault audit export --format
fhir`): the mapping only, each resource validated with `fhir.resources` as it is built.

The mapping (who, what, when, outcome; never PHI):

- `id`: the event's `event_id`, or `seq-<n>` for events chained before events had one.
- `type`: a DICOM event type (`110114` User Authentication, `110110` Patient Record, `110113`
  Security Alert, ...; `110100` Application Activity otherwise); `subtype`: the phivault action
  (`urn:phivault:audit-action`); `action`: C, R, U, D or E from the action's name.
- `recorded`: `at` (UTC, microseconds); `outcome`: `0` success, `4` denied, `8` error.
- `agent`: the actor, `requestor` true: `Patient/<id>` for a patient, `Practitioner/<id>` for
  staff, `Device/phivault` for the system, no `who` for an anonymous caller; `role` is the
  phivault role (`urn:phivault:role`); `network.address` the IP; `purposeOfUse` ETREAT for a
  break-glass access.
- `source.observer`: `Device/phivault` (an application server).
- `entity`: the resource acted on (`type` in `urn:phivault:resource-type`, `what` a logical
  reference `urn:phivault:id:<resource_type>` / id) with the event's allowlisted metadata and
  request id as `detail`; and the patient whose data it is, `Patient/<id>`, role Patient.

The user agent is left out (free text a client chose); the JSON-lines export keeps every field.
FHIR R4B's `AuditEvent` is R4's (the package's root models are R5), so the R4B model validates.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from pydantic import ValidationError

from phivault.access.permissions import Role
from phivault.audit.access_log import is_break_glass
from phivault.audit.actions import Action, Outcome
from phivault.audit.chain import format_time

ACTION_SYSTEM = "urn:phivault:audit-action"
ROLE_SYSTEM = "urn:phivault:role"
RESOURCE_TYPE_SYSTEM = "urn:phivault:resource-type"
RESOURCE_ID_SYSTEM = "urn:phivault:id:"  # + the resource type
DICOM = "http://dicom.nema.org/resources/ontology/DCM"
OBSERVER = {"reference": "Device/phivault", "display": "phivault"}

# The required bindings of R4's AuditEvent.action and AuditEvent.outcome. `fhir.resources`
# checks a code's form, not its value set, so the mapping checks these itself.
ACTION_CODES = frozenset({"C", "R", "U", "D", "E"})
OUTCOME_CODES = {Outcome.SUCCESS: "0", Outcome.DENIED: "4", Outcome.ERROR: "8"}

_APPLICATION_ACTIVITY = ("110100", "Application Activity")
_AUDIT_LOG_USED = ("110101", "Audit Log Used")
_EXPORT = ("110106", "Export")
_IMPORT = ("110107", "Import")
_PATIENT_RECORD = ("110110", "Patient Record")
_QUERY = ("110112", "Query")
_SECURITY_ALERT = ("110113", "Security Alert")
_USER_AUTHENTICATION = ("110114", "User Authentication")

# Actions whose type or CRUDE code the VIEW_/CREATE_/UPDATE_/DELETE_ rule below does not give.
_TYPES: dict[str, tuple[str, str]] = {
    **dict.fromkeys((Action.LOGIN_SUCCESS, Action.LOGIN_FAILURE, Action.LOGOUT,
                     Action.TOKEN_REFRESH, Action.SESSION_REVOKED, Action.MFA_SETUP_STARTED,
                     Action.MFA_ENABLED, Action.PASSWORD_CHANGED, Action.ACCOUNT_SETUP),
                    _USER_AUTHENTICATION),
    **dict.fromkeys((Action.ACCESS_DENIED, Action.BREAK_GLASS, Action.REFRESH_TOKEN_REUSE,
                     Action.MISSING_TOKEN, Action.INVALID_TOKEN, Action.RATE_LIMITED,
                     Action.INTEGRITY_FAILURE), _SECURITY_ALERT),
    **dict.fromkeys((Action.VIEW_AUDIT_TRAIL, Action.VERIFY_AUDIT_CHAIN,
                     Action.EXPORT_AUDIT_TRAIL), _AUDIT_LOG_USED),
    **dict.fromkeys((Action.DATA_EXPORT, Action.RESEARCH_EXPORT), _EXPORT),
    Action.IMPORT_USERS: _IMPORT,
    **dict.fromkeys((Action.VIEW_USERS, Action.VIEW_PATIENT_LIST), _QUERY),
    **dict.fromkeys((Action.CREATE_USER, Action.UPDATE_USER, Action.KEY_REWRAP,
                     Action.KEY_REINDEX), _APPLICATION_ACTIVITY),
    **dict.fromkeys((Action.CONSENT_CHANGED, Action.ACCOUNT_ERASED,
                     Action.VIEW_BREAK_GLASS_REASON), _PATIENT_RECORD),
}
_CODES: dict[str, str] = {
    **dict.fromkeys((Action.IMPORT_USERS, Action.ACCOUNT_SETUP), "C"),
    **dict.fromkeys((Action.DATA_EXPORT, Action.RESEARCH_EXPORT, Action.EXPORT_AUDIT_TRAIL,
                     Action.VERIFY_AUDIT_CHAIN), "R"),
    **dict.fromkeys((Action.CONSENT_CHANGED, Action.PASSWORD_CHANGED, Action.MFA_ENABLED,
                     Action.KEY_REWRAP, Action.KEY_REINDEX), "U"),
    **dict.fromkeys((Action.ACCOUNT_ERASED, Action.SESSION_REVOKED), "D"),
}
_PREFIX_CODES = (("VIEW_", "R"), ("CREATE_", "C"), ("UPDATE_", "U"), ("DELETE_", "D"))


class FhirMappingError(ValueError):
    """An audit event did not become a valid FHIR R4 AuditEvent (names its `seq` only)."""


class AuditRecord(Protocol):
    """The fields of a chained event that the mapping reads (a database row will do)."""

    @property
    def seq(self) -> int: ...
    @property
    def event_id(self) -> uuid.UUID | None: ...
    @property
    def at(self) -> datetime: ...
    @property
    def actor_id(self) -> uuid.UUID | None: ...
    @property
    def actor_role(self) -> str | None: ...
    @property
    def action(self) -> str: ...
    @property
    def resource_type(self) -> str | None: ...
    @property
    def resource_id(self) -> str | None: ...
    @property
    def patient_id(self) -> uuid.UUID | None: ...
    @property
    def outcome(self) -> str: ...
    @property
    def ip(self) -> str | None: ...
    @property
    def request_id(self) -> str | None: ...


def event_type(action: str) -> tuple[str, str]:
    """The DICOM event type (code, display) of a phivault action."""
    if action in _TYPES:
        return _TYPES[action]
    if action.startswith(tuple(prefix for prefix, _ in _PREFIX_CODES)):
        return _PATIENT_RECORD  # VIEW_/CREATE_/UPDATE_/DELETE_<RESOURCE>: PHI reads and writes
    return _APPLICATION_ACTIVITY


def action_code(action: str) -> str:
    """AuditEvent.action: C(reate), R(ead), U(pdate), D(elete) or E(xecute) for the rest
    (sign-ins, refusals, break-glass)."""
    if action in _CODES:
        return _CODES[action]
    for prefix, code in _PREFIX_CODES:
        if action.startswith(prefix):
            return code
    return "E"


def _agent(event: AuditRecord, metadata: Mapping[str, Any]) -> dict[str, Any]:
    agent: dict[str, Any] = {"requestor": True}
    if event.actor_id is not None:
        kind = "Patient" if event.actor_role == Role.PATIENT else "Practitioner"
        agent["who"] = {"reference": f"{kind}/{event.actor_id}"}
    elif event.actor_role == "system":
        agent["who"] = dict(OBSERVER)
    if event.actor_role:
        agent["role"] = [{"coding": [{"system": ROLE_SYSTEM, "code": event.actor_role}],
                          "text": event.actor_role}]
    if event.ip:
        agent["network"] = {"address": event.ip, "type": "2"}  # 2: an IP address
    if is_break_glass(event.action, metadata):
        agent["purposeOfUse"] = [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "ETREAT",
            "display": "Emergency Treatment"}]}]
    return agent


def _details(event: AuditRecord, metadata: Mapping[str, Any]) -> list[dict[str, Any]]:
    details = []
    for key in sorted(metadata):
        value = metadata[key]
        if value is None or value == "":
            continue  # a FHIR string is never empty
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        details.append({"type": key, "valueString": text})
    if event.request_id:
        details.append({"type": "request_id", "valueString": event.request_id})
    return details


def _entities(event: AuditRecord, metadata: Mapping[str, Any]) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    subject: dict[str, Any] = {}
    if event.resource_type:
        subject["type"] = {"system": RESOURCE_TYPE_SYSTEM, "code": event.resource_type}
        if event.resource_id:
            subject["what"] = {"identifier": {
                "system": RESOURCE_ID_SYSTEM + event.resource_type, "value": event.resource_id}}
    details = _details(event, metadata)
    if details:
        subject["detail"] = details
    if subject:
        entities.append(subject)
    if event.patient_id is not None:
        entities.append({
            "what": {"reference": f"Patient/{event.patient_id}"},
            "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Patient"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1",
                     "display": "Patient"},
        })
    return entities


def audit_event_resource(event: AuditRecord, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The FHIR R4 AuditEvent of `event`, as JSON, validated (`FhirMappingError` if not valid).

    `metadata` is the event's exportable metadata (allowlisted keys only, never PHI): the
    caller decides what of the stored metadata may leave.
    """
    try:
        outcome = OUTCOME_CODES[Outcome(event.outcome)]
    except ValueError:
        raise FhirMappingError(f"audit event seq {event.seq} has an unknown outcome") from None
    code, display = event_type(event.action)
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(event.event_id) if event.event_id is not None else f"seq-{event.seq}",
        "type": {"system": DICOM, "code": code, "display": display},
        "subtype": [{"system": ACTION_SYSTEM, "code": event.action}],
        "action": action_code(event.action),
        "recorded": format_time(event.at),
        "outcome": outcome,
        "agent": [_agent(event, metadata)],
        "source": {"observer": dict(OBSERVER), "type": [{
            "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
            "code": "4", "display": "Application Server"}]},
    }
    entities = _entities(event, metadata)
    if entities:
        resource["entity"] = entities
    try:
        validate_resource(resource)
    except (ValidationError, FhirMappingError) as exc:
        # Only the seq: a validation message quotes the offending values.
        raise FhirMappingError(
            f"audit event seq {event.seq} does not map to a valid FHIR R4 AuditEvent") from exc
    return resource


def validate_resource(resource: Mapping[str, Any]) -> None:
    """Validate an AuditEvent's JSON with `fhir.resources` (R4) and the required bindings it
    does not check; raises `pydantic.ValidationError` or `FhirMappingError`."""
    FhirAuditEvent.model_validate(resource)
    if resource.get("action") not in ACTION_CODES:
        raise FhirMappingError("AuditEvent.action is not C, R, U, D or E")
    if resource.get("outcome") not in {"0", "4", "8", "12"}:
        raise FhirMappingError("AuditEvent.outcome is not 0, 4, 8 or 12")
