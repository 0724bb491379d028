"""The authorization matrix of every clinical route (SPEC §7, §10): for each route and each kind
of caller, the exact status and error code; every denial is audited as ACCESS_DENIED.

A route under /api/v1 that is neither in MATRIX nor in the short list of non-clinical routes
fails `test_every_api_route_is_in_the_matrix`: no route can be added without deciding here who
may call it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from phivault.access.guards import app_routes
from phivault.runtime import Runtime
from phivault.web.app import create_app
from tests.clinical.world import (
    API,
    BREAK_GLASS_REASON,
    CALLERS,
    LATER,
    WHEN,
    Caller,
    World,
    build_world,
    events_of,
    file_of,
    multipart,
)

Expected = tuple[int, str | None]
UNAUTHENTICATED: Expected = (401, "unauthenticated")
FORBIDDEN: Expected = (403, "forbidden")
NOT_FOUND: Expected = (404, "not_found")
NO_CARE: Expected = (403, "no_care_relationship")
NO_CONSENT: Expected = (403, "no_consent")

PATIENTS = ("self", "other_patient")
DOCTORS = tuple(c for c in CALLERS if c.startswith(("doctor_", "break_glass")))
STAFF = ("admin", "auditor")
assert set(CALLERS) == {"anonymous", *PATIENTS, *DOCTORS, *STAFF}


def ok(status: int = 200) -> Expected:
    return (status, None)


def by_role(*, patient: Expected = FORBIDDEN, other_patient: Expected | None = None,
            doctor: Expected = FORBIDDEN, staff: Expected = FORBIDDEN,
            **exceptions: Expected) -> dict[str, Expected]:
    table = {"anonymous": UNAUTHENTICATED, "self": patient,
             "other_patient": other_patient or patient}
    table.update({c: doctor for c in DOCTORS})
    table.update({c: staff for c in STAFF})
    table.update(exceptions)
    return table


def chart_read() -> dict[str, Expected]:
    """Reading a chart: the patient themself; a doctor with a care relationship and consent, or
    with an active break-glass grant (whatever the relationship or consent)."""
    return by_role(patient=ok(), other_patient=NOT_FOUND, doctor=NO_CARE,
                   doctor_care=ok(), doctor_completed=ok(), doctor_no_consent=NO_CONSENT,
                   break_glass=ok(), break_glass_no_consent=ok())


def chart_write(status: int, *, patient_may: bool = False) -> dict[str, Expected]:
    """Writing to a chart: a doctor with a care relationship and consent (break-glass never
    writes); the patient themself only where the route allows patients (attachments)."""
    return by_role(patient=ok(status) if patient_may else FORBIDDEN,
                   other_patient=NOT_FOUND if patient_may else FORBIDDEN,
                   doctor=NO_CARE, doctor_care=ok(status), doctor_completed=ok(status),
                   doctor_no_consent=NO_CONSENT)


Request = Callable[[Caller], dict[str, Any]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    family: str
    expected: dict[str, Expected]
    request: Request | None = None  # extra httpx arguments (a body)


def json_body(body: dict[str, Any]) -> Request:
    return lambda _caller: {"json": body}


def consultation_body(caller: Caller) -> dict[str, Any]:
    user = caller.user
    if user is not None and user.role == "doctor":
        return {"json": {"patient_id": str(caller.chart.patient.id), "scheduled_at": WHEN,
                         "reason": "Routine check"}}
    # A patient (or anyone else who tries) books the chart's doctor.
    return {"json": {"doctor_id": str(caller.chart.doctor.id), "scheduled_at": WHEN,
                     "reason": "Routine check"}}


def attachment_body(_caller: Caller) -> dict[str, Any]:
    kind, body = multipart(file_of("image/png", 200), filename="matrix.png")
    return {"content": body, "headers": {"Content-Type": kind}}


# Routes are checked in this order within a family: state-changing calls come last, and none
# of them changes who may see what (PUT consents keeps data_sharing on; break-glass is last).
MATRIX: tuple[Route, ...] = (
    # Records, prescriptions, attachments: the chart.
    Route("GET", "/patients/{patient_id}/records", "chart", chart_read()),
    Route("GET", "/records/{record_id}", "chart", chart_read()),
    Route("GET", "/records/{record_id}/versions", "chart", chart_read()),
    Route("GET", "/patients/{patient_id}/prescriptions", "chart", chart_read()),
    Route("GET", "/patients/{patient_id}/attachments", "chart", chart_read()),
    Route("GET", "/attachments/{attachment_id}", "chart", chart_read()),
    Route("POST", "/patients/{patient_id}/records", "chart", chart_write(201),
          json_body({"diagnosis": "Seasonal rhinitis", "prescriptions": ["Cetirizine"],
                     "notes": "Matrix"})),
    Route("PATCH", "/records/{record_id}", "chart", chart_write(200),
          json_body({"notes": "Amended by the matrix"})),
    Route("POST", "/patients/{patient_id}/prescriptions", "chart", chart_write(201),
          json_body({"medication": "Ibuprofen", "dosage": "200 mg",
                     "instructions": "With food"})),
    Route("POST", "/patients/{patient_id}/attachments", "chart",
          chart_write(201, patient_may=True), attachment_body),

    # Consultations, payments, notifications, the doctor's patient list.
    Route("GET", "/consultations", "consultations", by_role(patient=ok(), doctor=ok())),
    Route("GET", "/me/notifications", "consultations",
          by_role(patient=ok(), doctor=ok(), staff=ok())),
    # A notification is its owner's alone: to anyone else it does not exist.
    Route("POST", "/notifications/{notification_id}/read", "consultations",
          by_role(patient=ok(), other_patient=NOT_FOUND, doctor=NOT_FOUND, staff=NOT_FOUND)),
    Route("GET", "/me/payments", "consultations", by_role(patient=ok())),
    Route("GET", "/patients", "consultations", by_role(doctor=ok())),
    # Only the two parties of a consultation may change it; to anyone else it does not exist.
    Route("PATCH", "/consultations/{consultation_id}", "consultations",
          by_role(patient=ok(), other_patient=NOT_FOUND, doctor=NOT_FOUND,
                  doctor_care=ok(), doctor_no_consent=ok()),
          json_body({"scheduled_at": LATER})),
    Route("POST", "/consultations/{consultation_id}/payments", "consultations",
          by_role(patient=ok(201), other_patient=NOT_FOUND),
          json_body({"amount": 4500, "currency": "EUR", "provider_reference": "pi_3MtwBw"})),
    Route("POST", "/consultations", "consultations", by_role(patient=ok(201), doctor=ok(201)),
          consultation_body),

    # The patient's own consents.
    Route("GET", "/me/consents", "consents", by_role(patient=ok())),
    Route("GET", "/me/consents/history", "consents", by_role(patient=ok())),
    Route("GET", "/me/export", "consents", by_role(patient=ok())),
    Route("PUT", "/me/consents", "consents", by_role(patient=ok()),
          json_body({"marketing": False, "data_sharing": True, "analytics": False})),

    # Break-glass: any doctor, whatever the relationship; nobody else.
    Route("POST", "/patients/{patient_id}/break-glass", "break_glass", by_role(doctor=ok(201)),
          json_body({"reason": BREAK_GLASS_REASON})),

    # The patient's care team: each patient their own; another patient's doctor is unknown to
    # them. The end (DELETE) changes who may see what, so it is its family's last call.
    Route("GET", "/me/care-team", "care_team", by_role(patient=ok())),
    Route("DELETE", "/me/care-team/{doctor_id}", "care_team",
          by_role(patient=ok(204), other_patient=NOT_FOUND)),

    # The audit trail: auditors search it; each patient reads their own access log.
    Route("GET", "/audit", "audit", by_role(auditor=ok())),
    Route("GET", "/me/access-log", "audit", by_role(patient=ok())),
)

FAMILIES = ("chart", "consultations", "consents", "break_glass", "care_team", "audit")

# Routes under /api/v1 that touch no patient's clinical data.
NON_CLINICAL = {"/api/v1/me", "/api/v1/me/sessions", "/api/v1/me/sessions/{session_id}",
                "/api/v1/doctors", "/api/v1/audit/verify"}


def is_non_clinical(path: str) -> bool:
    return (path in NON_CLINICAL or path.startswith("/api/v1/auth/")
            or path == "/api/v1/users" or path.startswith("/api/v1/users/"))


def test_matrix_covers_every_route_and_caller() -> None:
    assert {r.family for r in MATRIX} == set(FAMILIES)
    keys = [(r.method, r.path) for r in MATRIX]
    assert len(keys) == len(set(keys))
    for route in MATRIX:
        assert set(route.expected) == set(CALLERS), (route.method, route.path)


def test_every_api_route_is_in_the_matrix(runtime: Runtime) -> None:
    routes = {(method, entry.path) for entry in app_routes(create_app(runtime=runtime))
              if entry.path.startswith(API + "/") for method in entry.methods}
    in_matrix = {(r.method, API + r.path) for r in MATRIX}
    missing = sorted(r for r in routes - in_matrix if not is_non_clinical(r[1]))
    assert missing == [], f"routes in neither the matrix nor the non-clinical list: {missing}"
    stale = sorted(in_matrix - routes)
    assert stale == [], f"matrix routes the app no longer has: {stale}"


def url_for(route: Route, caller: Caller) -> str:
    chart = caller.chart
    return API + route.path.format(
        patient_id=chart.patient.id, record_id=chart.record_id,
        attachment_id=chart.attachment_id, consultation_id=chart.consultation_id,
        doctor_id=chart.doctor.id, notification_id=chart.notification_id)


def leaked_rows(body: Any, caller: Caller) -> bool:
    """A chart answer that holds data of another patient than the one asked for."""
    rows = body if isinstance(body, list) else [body]
    target = str(caller.chart.patient.id)
    return any(isinstance(r, dict) and "patient_id" in r and r["patient_id"] != target
               for r in rows)


@pytest.mark.parametrize("family", FAMILIES)
async def test_authorization_matrix(family: str, client: httpx.AsyncClient,
                                    runtime: Runtime) -> None:
    world: World = await build_world(runtime, client)
    wrong: list[str] = []
    denials: dict[str, tuple[str, str, Caller]] = {}  # request id -> (route, caller, ...)
    for route in (r for r in MATRIX if r.family == family):
        for name in CALLERS:
            caller = world.callers[name]
            kwargs = route.request(caller) if route.request else {}
            headers = {**kwargs.pop("headers", {}), **(caller.user.headers if caller.user
                                                       else {})}
            response = await client.request(route.method, url_for(route, caller),
                                            headers=headers, **kwargs)
            status, code = route.expected[name]
            is_json = response.headers.get("content-type", "").startswith("application/json")
            got_code = response.json().get("error") if is_json and response.status_code >= 400 \
                else None
            label = f"{route.method} {route.path} as {name}"
            if (response.status_code, got_code) != (status, code):
                wrong.append(f"{label}: expected {status} {code}, got {response.status_code} "
                             f"{got_code}")
            elif status < 300 and is_json and route.family == "chart" \
                    and leaked_rows(response.json(), caller):
                wrong.append(f"{label}: answered with another patient's data")
            if response.status_code in (403, 404):
                denials[response.headers["x-request-id"]] = (label, name, caller)
    assert wrong == [], "\n".join(wrong)

    # SPEC §7: every denial writes an ACCESS_DENIED audit event, by the caller.
    events = await events_of(runtime, denials)
    unaudited = []
    for request_id, (label, _name, caller) in denials.items():
        assert caller.user is not None
        found = [(e.action, e.outcome, e.actor_id) for e in events[request_id]]
        if ("ACCESS_DENIED", "denied", caller.user.id) not in found:
            unaudited.append(f"{label}: events {found}")
    assert unaudited == [], "denials without an ACCESS_DENIED event:\n" + "\n".join(unaudited)
