"""Event coverage (SPEC §8): every event comes from the one `Action` StrEnum, no code spells one
as a string, and every route of the app is classified here, so that each route that touches PHI
(or an account) is called in one scenario and must leave its event. A new route fails
`test_every_route_is_classified` until it is added to `ROUTES` on purpose."""

from __future__ import annotations

import ast
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyotp
from fastapi import FastAPI

import phivault
from phivault.access.guards import app_routes
from phivault.audit.actions import Action
from phivault.auth.schemas import CreateStaff
from phivault.runtime import Runtime
from phivault.web.app import create_app
from tests.auth.test_mfa import enrol as enrol_totp
from tests.clinical.world import (
    API,
    BREAK_GLASS_REASON,
    WHEN,
    expect,
    file_of,
    upload,
)
from tests.clinical.world import events_of as events_by_request
from tests.conftest import client_for
from tests.factories import PASSWORD, TestUser, new_email, sign_in, signed_in
from tests.portal.browser import portal_of, submit
from tests.portal.browser import sign_in as portal_sign_in

# Every event SPEC §8 names, and the resources whose reads and writes it names by pattern.
SPEC_EVENTS = {
    "LOGIN_SUCCESS", "LOGIN_FAILURE", "LOGOUT", "TOKEN_REFRESH", "REFRESH_TOKEN_REUSE",
    "MFA_ENABLED", "PASSWORD_CHANGED", "ACCESS_DENIED", "BREAK_GLASS", "CONSENT_CHANGED",
    "DATA_EXPORT", "ACCOUNT_ERASED", "INTEGRITY_FAILURE",
    # User administration and key operations.
    "CREATE_USER", "UPDATE_USER", "VIEW_USERS", "SESSION_REVOKED", "KEY_REWRAP",
    # VIEW_/CREATE_/UPDATE_<RESOURCE> of each kind of PHI.
    "VIEW_PROFILE", "UPDATE_PROFILE", "VIEW_MEDICAL_RECORD", "CREATE_MEDICAL_RECORD",
    "UPDATE_MEDICAL_RECORD", "VIEW_PRESCRIPTION", "CREATE_PRESCRIPTION", "VIEW_ATTACHMENT",
    "CREATE_ATTACHMENT", "VIEW_CONSULTATION", "CREATE_CONSULTATION", "UPDATE_CONSULTATION",
    "VIEW_PAYMENT", "CREATE_PAYMENT", "VIEW_NOTIFICATION", "VIEW_CONSENT", "VIEW_ACCESS_LOG",
}
# PHI events that are not VIEW_/CREATE_/UPDATE_/DELETE_: the ones SPEC §8 names outright.
NAMED_PHI_EVENTS = {Action.CONSENT_CHANGED, Action.BREAK_GLASS, Action.DATA_EXPORT,
                    Action.ACCOUNT_ERASED}


# The classification of every route.

@dataclass(frozen=True)
class Audited:
    """A successful call writes `action`; with `phi`, its `patient_id` names whose data."""

    action: Action
    phi: bool


@dataclass(frozen=True)
class Unaudited:
    """No event, on purpose: `why` says why no PHI or account data is touched."""

    why: str


def phi(action: Action) -> Audited:
    return Audited(action, phi=True)


def account(action: Action) -> Audited:
    return Audited(action, phi=False)


ROUTES: dict[tuple[str, str], Audited | Unaudited] = {
    # Authentication and the caller's own account.
    ("POST", "/api/v1/auth/register"): phi(Action.CREATE_USER),  # writes the sealed profile
    ("POST", "/api/v1/auth/login"): account(Action.LOGIN_SUCCESS),
    ("POST", "/api/v1/auth/refresh"): account(Action.TOKEN_REFRESH),
    ("POST", "/api/v1/auth/logout"): account(Action.LOGOUT),
    ("POST", "/api/v1/auth/setup"): account(Action.ACCOUNT_SETUP),
    ("POST", "/api/v1/auth/mfa/setup"): account(Action.MFA_SETUP_STARTED),
    ("POST", "/api/v1/auth/mfa/enable"): account(Action.MFA_ENABLED),
    ("POST", "/api/v1/auth/password"): account(Action.PASSWORD_CHANGED),
    ("GET", "/api/v1/me"): phi(Action.VIEW_PROFILE),
    ("GET", "/api/v1/me/sessions"): Unaudited("the caller's own sessions: no PHI"),
    ("DELETE", "/api/v1/me/sessions/{session_id}"): account(Action.SESSION_REVOKED),
    # Consents.
    ("GET", "/api/v1/me/consents"): phi(Action.VIEW_CONSENT),
    ("PUT", "/api/v1/me/consents"): phi(Action.CONSENT_CHANGED),
    ("GET", "/api/v1/me/consents/history"): phi(Action.VIEW_CONSENT),
    ("GET", "/api/v1/me/export"): phi(Action.DATA_EXPORT),
    # Rectification and erasure.
    ("PATCH", "/api/v1/me"): phi(Action.UPDATE_PROFILE),
    ("DELETE", "/api/v1/me"): phi(Action.ACCOUNT_ERASED),
    # User administration.
    ("POST", "/api/v1/users"): account(Action.CREATE_USER),
    ("GET", "/api/v1/users"): account(Action.VIEW_USERS),
    ("PATCH", "/api/v1/users/{user_id}"): account(Action.UPDATE_USER),
    ("DELETE", "/api/v1/users/{user_id}/sessions"): account(Action.SESSION_REVOKED),
    ("POST", "/api/v1/users/{user_id}/approve"): account(Action.APPROVE_USER),
    ("POST", "/api/v1/users/{user_id}/invitation"): account(Action.RENEW_SETUP_TOKEN),
    ("GET", "/api/v1/doctors"): Unaudited("the public directory of doctors: no PHI"),
    # Clinical data.
    ("POST", "/api/v1/consultations"): phi(Action.CREATE_CONSULTATION),
    ("GET", "/api/v1/consultations"): phi(Action.VIEW_CONSULTATION),
    ("PATCH", "/api/v1/consultations/{consultation_id}"): phi(Action.UPDATE_CONSULTATION),
    ("POST", "/api/v1/consultations/{consultation_id}/payments"): phi(Action.CREATE_PAYMENT),
    ("GET", "/api/v1/me/payments"): phi(Action.VIEW_PAYMENT),
    ("GET", "/api/v1/me/notifications"): phi(Action.VIEW_NOTIFICATION),
    ("POST", "/api/v1/notifications/{notification_id}/read"): phi(Action.UPDATE_NOTIFICATION),
    ("GET", "/api/v1/patients"): phi(Action.VIEW_PATIENT_LIST),
    ("POST", "/api/v1/patients/{patient_id}/records"): phi(Action.CREATE_MEDICAL_RECORD),
    ("GET", "/api/v1/patients/{patient_id}/records"): phi(Action.VIEW_MEDICAL_RECORD),
    ("GET", "/api/v1/records/{record_id}"): phi(Action.VIEW_MEDICAL_RECORD),
    ("PATCH", "/api/v1/records/{record_id}"): phi(Action.UPDATE_MEDICAL_RECORD),
    ("GET", "/api/v1/records/{record_id}/versions"): phi(Action.VIEW_MEDICAL_RECORD),
    ("POST", "/api/v1/patients/{patient_id}/prescriptions"): phi(Action.CREATE_PRESCRIPTION),
    ("GET", "/api/v1/patients/{patient_id}/prescriptions"): phi(Action.VIEW_PRESCRIPTION),
    ("POST", "/api/v1/patients/{patient_id}/attachments"): phi(Action.CREATE_ATTACHMENT),
    ("GET", "/api/v1/patients/{patient_id}/attachments"): phi(Action.VIEW_ATTACHMENT),
    ("GET", "/api/v1/attachments/{attachment_id}"): phi(Action.VIEW_ATTACHMENT),
    ("POST", "/api/v1/patients/{patient_id}/break-glass"): phi(Action.BREAK_GLASS),
    ("GET", "/api/v1/me/care-team"): phi(Action.VIEW_CARE_TEAM),
    ("DELETE", "/api/v1/me/care-team/{doctor_id}"): phi(Action.DELETE_CARE_RELATIONSHIP),
    # The audit trail.
    ("GET", "/api/v1/me/access-log"): phi(Action.VIEW_ACCESS_LOG),
    ("GET", "/api/v1/audit"): account(Action.VIEW_AUDIT_TRAIL),
    ("GET", "/api/v1/audit/verify"): account(Action.VERIFY_AUDIT_CHAIN),
    # Outside the API.
    ("GET", "/healthz"): Unaudited("liveness"),
    ("GET", "/readyz"): Unaudited("readiness"),
    ("GET", "/metrics"): Unaudited("operators' metrics: counts by route template, no PHI, no ids"),
    ("GET", "/.well-known/jwks.json"): Unaudited("public keys of access tokens"),
    ("GET", "/.well-known/audit-key.json"): Unaudited("public key of audit checkpoints"),
    ("GET", "/docs"): Unaudited("the interactive docs page"),
    ("GET", "/docs/init.js"): Unaudited("the interactive docs' script"),
    ("GET", "/docs/swagger-ui-5.17.14/swagger-ui-bundle.js"): Unaudited("Swagger UI's script"),
    ("GET", "/docs/swagger-ui-5.17.14/swagger-ui.css"): Unaudited("Swagger UI's style sheet"),
    ("GET", "/openapi.json"): Unaudited("the OpenAPI document"),
    # The privacy portal (SPEC §15): its pages call the API's services, so they write the
    # same events as the API routes they mirror.
    ("GET", "/portal/static/portal.css"): Unaudited("the portal's style sheet"),
    ("GET", "/portal/sign-in"): Unaudited("the sign-in form"),
    ("POST", "/portal/sign-in"): account(Action.LOGIN_SUCCESS),
    ("GET", "/portal/sign-in/code"): Unaudited("the code form of a half-done sign-in"),
    ("POST", "/portal/sign-in/code"): account(Action.LOGIN_SUCCESS),
    ("POST", "/portal/sign-out"): account(Action.LOGOUT),
    ("GET", "/portal"): Unaudited("the start page: links, no PHI"),
    ("GET", "/portal/profile"): phi(Action.VIEW_PROFILE),
    ("POST", "/portal/profile"): phi(Action.UPDATE_PROFILE),
    ("GET", "/portal/records"): phi(Action.VIEW_MEDICAL_RECORD),
    ("GET", "/portal/access-log"): phi(Action.VIEW_ACCESS_LOG),
    ("GET", "/portal/care-team"): phi(Action.VIEW_CARE_TEAM),
    ("POST", "/portal/care-team/{doctor_id}/end"): phi(Action.DELETE_CARE_RELATIONSHIP),
    ("GET", "/portal/consents"): phi(Action.VIEW_CONSENT),
    ("POST", "/portal/consents"): phi(Action.CONSENT_CHANGED),
    ("GET", "/portal/export"): Unaudited("the export page: two buttons, no data"),
    ("POST", "/portal/export"): phi(Action.DATA_EXPORT),
    ("GET", "/portal/erase"): Unaudited("the erasure form"),
    ("POST", "/portal/erase"): phi(Action.ACCOUNT_ERASED),
    ("GET", "/portal/audit"): account(Action.VIEW_AUDIT_TRAIL),
    ("GET", "/portal/audit/verify"): account(Action.VERIFY_AUDIT_CHAIN),
    ("GET", "/portal/audit/checkpoint"): Unaudited(
        "the signed head: no PHI; with a signing key it writes AUDIT_CHECKPOINT, as the CLI "
        "does (tests/portal/test_portal_auditor.py); the shared test runtime has none"),
}
# Routes other changes are adding at the same time: classified already, tolerated while absent.
MAY_BE_ABSENT = {("GET", "/api/v1/me/access-log"), ("GET", "/api/v1/audit"),
                 ("GET", "/.well-known/audit-key.json")}


def route_keys(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route of `app`; HEAD goes with GET."""
    return {(method, route.path) for route in app_routes(app)
            for method in route.methods - {"HEAD"}}


def classification_problems(keys: set[tuple[str, str]]) -> list[str]:
    unclassified = [f"unclassified route {m} {p}: add it to ROUTES"
                    for m, p in sorted(keys - set(ROUTES))]
    stale = [f"classified route {m} {p} does not exist"
             for m, p in sorted(set(ROUTES) - keys - MAY_BE_ABSENT)]
    return unclassified + stale


# The enum and its use.

def test_every_event_the_spec_names_is_an_action() -> None:
    assert SPEC_EVENTS - {a.value for a in Action} == set()
    for action in Action:
        assert action.value == action.name
    phi_actions = {c.action for c in ROUTES.values() if isinstance(c, Audited) and c.phi}
    for action in phi_actions - NAMED_PHI_EVENTS - {Action.CREATE_USER}:
        assert re.fullmatch(r"(VIEW|CREATE|UPDATE|DELETE)_[A-Z_]+", action), action


def _string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_no_code_spells_an_action_as_a_string() -> None:
    """Routes and services name actions as `Action.X`; a literal "LOGIN_SUCCESS" would drift
    from the enum unnoticed. `actions.py` is the one place the strings are written."""
    names = {a.value for a in Action}
    package = Path(phivault.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "audit" / "actions.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [f"{path.relative_to(package)}:{line}: {value!r}"
                  for line, value in _string_literals(tree) if value in names]
    assert found == []


# Routes.

def test_every_route_is_classified(runtime: Runtime) -> None:
    assert classification_problems(route_keys(create_app(runtime=runtime))) == []


def test_a_new_phi_route_that_is_not_classified_fails(runtime: Runtime) -> None:
    app = create_app(runtime=runtime)

    @app.get("/api/v1/patients/{patient_id}/genome")
    async def genome(patient_id: uuid.UUID) -> dict[str, str]:  # pragma: no cover
        return {}

    assert classification_problems(route_keys(app)) == [
        "unclassified route GET /api/v1/patients/{patient_id}/genome: add it to ROUTES"]


def test_unaudited_api_routes_are_few_and_named() -> None:
    """Anything under /api/v1 that is unaudited and not one of these would be a hole in the
    trail: an unaudited route is a decision, made here."""
    unaudited_api = {key for key, c in ROUTES.items()
                     if isinstance(c, Unaudited) and key[1].startswith("/api/")}
    assert unaudited_api == {("GET", "/api/v1/me/sessions"), ("GET", "/api/v1/doctors")}


# The scenario: each audited route, called once, successfully.

@dataclass
class Call:
    response: httpx.Response
    actor: uuid.UUID
    patient: uuid.UUID | None = None


@dataclass
class Scene:
    rt: Runtime
    client: httpx.AsyncClient
    patient: TestUser
    doctor: TestUser
    rescuer: TestUser
    admin: TestUser
    auditor: TestUser
    newcomer: TestUser | None = None  # registered through the API
    staff: dict[str, str] | None = None  # created by the admin through the API
    consultation: str = ""
    record: str = ""

    @property
    def pid(self) -> uuid.UUID:
        return self.patient.id


Step = Callable[[Scene], Awaitable[Call]]
STEPS: list[tuple[tuple[str, str], Step]] = []


def step(method: str, path: str) -> Callable[[Step], Step]:
    def register(run: Step) -> Step:
        STEPS.append(((method, path), run))
        return run
    return register


@step("POST", "/api/v1/auth/register")
async def _register(s: Scene) -> Call:
    email = new_email("newcomer")
    response = await s.client.post(f"{API}/auth/register", json={
        "email": email, "password": PASSWORD, "full_name": "Nadia Newcomer"})
    created = uuid.UUID(expect(response, 201)["id"])
    s.newcomer = TestUser(created, email, PASSWORD, "patient")
    return Call(response, created, created)


@step("POST", "/api/v1/auth/login")
async def _login(s: Scene) -> Call:
    assert s.newcomer is not None
    response = await s.client.post(f"{API}/auth/login", json={
        "email": s.newcomer.email, "password": s.newcomer.password})
    pair = expect(response, 200)
    s.newcomer.access_token, s.newcomer.refresh_token = pair["access_token"], pair[
        "refresh_token"]
    return Call(response, s.newcomer.id)


@step("POST", "/api/v1/auth/refresh")
async def _refresh(s: Scene) -> Call:
    assert s.newcomer is not None
    response = await s.client.post(f"{API}/auth/refresh",
                                   json={"refresh_token": s.newcomer.refresh_token})
    pair = expect(response, 200)
    s.newcomer.access_token, s.newcomer.refresh_token = pair["access_token"], pair[
        "refresh_token"]
    return Call(response, s.newcomer.id)


@step("DELETE", "/api/v1/me/sessions/{session_id}")
async def _end_session(s: Scene) -> Call:
    assert s.newcomer is not None
    other = await sign_in(s.rt, TestUser(s.newcomer.id, s.newcomer.email, PASSWORD, "patient"))
    listed = expect(await s.client.get(f"{API}/me/sessions", headers=other.headers), 200)
    ending = next(row["id"] for row in listed if not row["current"])
    response = await s.client.delete(f"{API}/me/sessions/{ending}", headers=other.headers)
    expect(response, 204)
    return Call(response, s.newcomer.id)


@step("POST", "/api/v1/auth/logout")
async def _logout(s: Scene) -> Call:
    assert s.newcomer is not None
    await sign_in(s.rt, s.newcomer)
    response = await s.client.post(f"{API}/auth/logout",
                                   json={"refresh_token": s.newcomer.refresh_token})
    expect(response, 204)
    return Call(response, s.newcomer.id)


@step("POST", "/api/v1/auth/password")
async def _password(s: Scene) -> Call:
    assert s.newcomer is not None
    await sign_in(s.rt, s.newcomer)
    response = await s.client.post(f"{API}/auth/password", headers=s.newcomer.headers, json={
        "current_password": PASSWORD, "new_password": PASSWORD + " and more"})
    expect(response, 204)
    s.newcomer.password = PASSWORD + " and more"
    await sign_in(s.rt, s.newcomer)
    return Call(response, s.newcomer.id)


@step("POST", "/api/v1/auth/mfa/setup")
async def _mfa_setup(s: Scene) -> Call:
    assert s.newcomer is not None
    response = await s.client.post(f"{API}/auth/mfa/setup", headers=s.newcomer.headers,
                                   json={"password": s.newcomer.password})
    s.newcomer.extra["totp"] = expect(response, 200)["secret"]
    return Call(response, s.newcomer.id)


@step("POST", "/api/v1/auth/mfa/enable")
async def _mfa_enable(s: Scene) -> Call:
    assert s.newcomer is not None
    response = await s.client.post(f"{API}/auth/mfa/enable", headers=s.newcomer.headers,
                                   json={"code": pyotp.TOTP(s.newcomer.extra["totp"]).now()})
    expect(response, 204)
    return Call(response, s.newcomer.id)


@step("POST", "/api/v1/users")
async def _create_staff(s: Scene) -> Call:
    response = await s.client.post(f"{API}/users", headers=s.admin.headers, json={
        "email": new_email("staff"), "full_name": "Dr Steph Staff", "role": "doctor"})
    s.staff = expect(response, 201)
    return Call(response, s.admin.id)


@step("POST", "/api/v1/auth/setup")
async def _setup(s: Scene) -> Call:
    assert s.staff is not None
    response = await s.client.post(f"{API}/auth/setup", json={
        "setup_token": s.staff["setup_token"], "password": PASSWORD})
    expect(response, 204)
    return Call(response, uuid.UUID(s.staff["id"]))


@step("GET", "/api/v1/users")
async def _list_users(s: Scene) -> Call:
    response = await s.client.get(f"{API}/users", headers=s.admin.headers)
    expect(response, 200)
    return Call(response, s.admin.id)


@step("PATCH", "/api/v1/users/{user_id}")
async def _update_user(s: Scene) -> Call:
    assert s.staff is not None
    response = await s.client.patch(f"{API}/users/{s.staff['id']}", headers=s.admin.headers,
                                     json={"status": "disabled"})
    expect(response, 200)
    return Call(response, s.admin.id)


@step("DELETE", "/api/v1/users/{user_id}/sessions")
async def _end_user_sessions(s: Scene) -> Call:
    assert s.staff is not None
    response = await s.client.delete(f"{API}/users/{s.staff['id']}/sessions",
                                      headers=s.admin.headers)
    expect(response, 204)
    return Call(response, s.admin.id)


@step("POST", "/api/v1/users/{user_id}/approve")
async def _approve_staff(s: Scene) -> Call:
    """A pending account (made as with staff approval on), approved by another admin than its
    creator; no mail is configured, so the token comes back (200)."""
    async with s.rt.unit_of_work() as session:
        pending = await s.rt.accounts.create_staff(session, CreateStaff(
            email=new_email("pending"), full_name="Dr Penny Pending", role="doctor"),
            creator=s.admin.id, approval=True)
    second = await signed_in(s.rt, "admin")
    response = await s.client.post(f"{API}/users/{pending.user.id}/approve",
                                   headers=second.headers)
    expect(response, 200)
    return Call(response, second.id)


@step("POST", "/api/v1/users/{user_id}/invitation")
async def _renew_invitation(s: Scene) -> Call:
    """A staff account whose owner has not set a password yet gets a new setup token."""
    async with s.rt.unit_of_work() as session:
        invited = await s.rt.accounts.create_staff(session, CreateStaff(
            email=new_email("invited"), full_name="Ivo Invited", role="auditor"),
            creator=s.admin.id)
    response = await s.client.post(f"{API}/users/{invited.user.id}/invitation",
                                   headers=s.admin.headers)
    expect(response, 200)
    return Call(response, s.admin.id)


@step("PUT", "/api/v1/me/consents")
async def _change_consents(s: Scene) -> Call:
    response = await s.client.put(f"{API}/me/consents", headers=s.patient.headers, json={
        "marketing": False, "data_sharing": True, "analytics": False})
    expect(response, 200)
    return Call(response, s.pid, s.pid)


@step("GET", "/api/v1/me/consents")
async def _read_consents(s: Scene) -> Call:
    response = await s.client.get(f"{API}/me/consents", headers=s.patient.headers)
    expect(response, 200)
    return Call(response, s.pid, s.pid)


@step("GET", "/api/v1/me/consents/history")
async def _consent_history(s: Scene) -> Call:
    response = await s.client.get(f"{API}/me/consents/history", headers=s.patient.headers)
    expect(response, 200)
    return Call(response, s.pid, s.pid)


@step("GET", "/api/v1/me/export")
async def _export(s: Scene) -> Call:
    response = await s.client.get(f"{API}/me/export", headers=s.patient.headers)
    expect(response, 200)
    return Call(response, s.pid, s.pid)


@step("GET", "/api/v1/me")
async def _me(s: Scene) -> Call:
    response = await s.client.get(f"{API}/me", headers=s.patient.headers)
    expect(response, 200)
    return Call(response, s.pid, s.pid)


@step("PATCH", "/api/v1/me")
async def _rectify(s: Scene) -> Call:
    response = await s.client.patch(f"{API}/me", headers=s.patient.headers,
                                    json={"phone": "+44 20 7946 0000"})
    expect(response, 200)
    return Call(response, s.pid, s.pid)


@step("POST", "/api/v1/consultations")
async def _book(s: Scene) -> Call:
    response = await s.client.post(f"{API}/consultations", headers=s.patient.headers, json={
        "doctor_id": str(s.doctor.id), "scheduled_at": WHEN, "reason": "Persistent cough"})
    s.consultation = expect(response, 201)["id"]
    return Call(response, s.pid, s.pid)


@step("PATCH", "/api/v1/consultations/{consultation_id}")
async def _consultation_notes(s: Scene) -> Call:
    response = await s.client.patch(f"{API}/consultations/{s.consultation}",
                                    headers=s.doctor.headers, json={"notes": "Listen again"})
    expect(response, 200)
    return Call(response, s.doctor.id, s.pid)


@step("GET", "/api/v1/consultations")
async def _consultations(s: Scene) -> Call:
    response = await s.client.get(f"{API}/consultations", headers=s.doctor.headers)
    expect(response, 200)
    return Call(response, s.doctor.id, s.pid)


@step("POST", "/api/v1/consultations/{consultation_id}/payments")
async def _pay(s: Scene) -> Call:
    response = await s.client.post(f"{API}/consultations/{s.consultation}/payments",
                                   headers=s.patient.headers, json={
                                       "amount": 4500, "currency": "EUR",
                                       "provider_reference": "ch_cover"})
    expect(response, 201)
    return Call(response, s.pid, s.pid)


@step("GET", "/api/v1/me/payments")
async def _payments(s: Scene) -> Call:
    response = await s.client.get(f"{API}/me/payments", headers=s.patient.headers)
    expect(response, 200)
    return Call(response, s.pid, s.pid)


@step("GET", "/api/v1/patients")
async def _patients(s: Scene) -> Call:
    response = await s.client.get(f"{API}/patients", headers=s.doctor.headers)
    assert [p["id"] for p in expect(response, 200)] == [str(s.pid)]
    return Call(response, s.doctor.id, s.pid)


@step("POST", "/api/v1/patients/{patient_id}/records")
async def _write_record(s: Scene) -> Call:
    response = await s.client.post(f"{API}/patients/{s.pid}/records", headers=s.doctor.headers,
                                   json={"diagnosis": "Acute bronchitis",
                                         "prescriptions": ["Rest"], "notes": "Review"})
    s.record = expect(response, 201)["id"]
    return Call(response, s.doctor.id, s.pid)


@step("GET", "/api/v1/patients/{patient_id}/records")
async def _records(s: Scene) -> Call:
    response = await s.client.get(f"{API}/patients/{s.pid}/records", headers=s.doctor.headers)
    expect(response, 200)
    return Call(response, s.doctor.id, s.pid)


@step("GET", "/api/v1/records/{record_id}")
async def _record(s: Scene) -> Call:
    response = await s.client.get(f"{API}/records/{s.record}", headers=s.patient.headers)
    expect(response, 200)
    return Call(response, s.pid, s.pid)


@step("PATCH", "/api/v1/records/{record_id}")
async def _amend(s: Scene) -> Call:
    response = await s.client.patch(f"{API}/records/{s.record}", headers=s.doctor.headers,
                                    json={"notes": "Better"})
    expect(response, 200)
    return Call(response, s.doctor.id, s.pid)


@step("GET", "/api/v1/records/{record_id}/versions")
async def _versions(s: Scene) -> Call:
    response = await s.client.get(f"{API}/records/{s.record}/versions",
                                  headers=s.doctor.headers)
    expect(response, 200)
    return Call(response, s.doctor.id, s.pid)


@step("POST", "/api/v1/patients/{patient_id}/prescriptions")
async def _prescribe(s: Scene) -> Call:
    response = await s.client.post(
        f"{API}/patients/{s.pid}/prescriptions", headers=s.doctor.headers,
        json={"medication": "Amoxicillin", "dosage": "500 mg", "instructions": "Three a day"})
    expect(response, 201)
    return Call(response, s.doctor.id, s.pid)


@step("GET", "/api/v1/patients/{patient_id}/prescriptions")
async def _prescriptions(s: Scene) -> Call:
    response = await s.client.get(f"{API}/patients/{s.pid}/prescriptions",
                                  headers=s.patient.headers)
    expect(response, 200)
    return Call(response, s.pid, s.pid)


@step("POST", "/api/v1/patients/{patient_id}/attachments")
async def _upload(s: Scene) -> Call:
    response = await upload(s.client, s.patient, s.pid, file_of("image/png", 300))
    s.patient.extra["attachment"] = expect(response, 201)["id"]
    return Call(response, s.pid, s.pid)


@step("GET", "/api/v1/patients/{patient_id}/attachments")
async def _attachments(s: Scene) -> Call:
    response = await s.client.get(f"{API}/patients/{s.pid}/attachments",
                                  headers=s.doctor.headers)
    expect(response, 200)
    return Call(response, s.doctor.id, s.pid)


@step("GET", "/api/v1/attachments/{attachment_id}")
async def _download(s: Scene) -> Call:
    response = await s.client.get(f"{API}/attachments/{s.patient.extra['attachment']}",
                                  headers=s.doctor.headers)
    assert response.status_code == 200
    return Call(response, s.doctor.id, s.pid)


@step("POST", "/api/v1/patients/{patient_id}/break-glass")
async def _break_glass(s: Scene) -> Call:
    response = await s.client.post(f"{API}/patients/{s.pid}/break-glass",
                                   headers=s.rescuer.headers,
                                   json={"reason": BREAK_GLASS_REASON})
    expect(response, 201)
    return Call(response, s.rescuer.id, s.pid)


@step("GET", "/api/v1/me/notifications")
async def _notifications(s: Scene) -> Call:
    response = await s.client.get(f"{API}/me/notifications", headers=s.patient.headers)
    assert expect(response, 200) != []
    return Call(response, s.pid, s.pid)


@step("POST", "/api/v1/notifications/{notification_id}/read")
async def _notification_read(s: Scene) -> Call:
    listed = await s.client.get(f"{API}/me/notifications", headers=s.patient.headers)
    first = expect(listed, 200)[0]["id"]
    response = await s.client.post(f"{API}/notifications/{first}/read",
                                   headers=s.patient.headers)
    assert expect(response, 200)["read_at"] is not None
    return Call(response, s.pid, s.pid)


@step("GET", "/api/v1/me/access-log")
async def _access_log(s: Scene) -> Call:
    response = await s.client.get(f"{API}/me/access-log", headers=s.patient.headers)
    expect(response, 200)
    return Call(response, s.pid, s.pid)


@step("GET", "/api/v1/audit")
async def _search_trail(s: Scene) -> Call:
    response = await s.client.get(f"{API}/audit", headers=s.auditor.headers,
                                  params={"patient_id": str(s.pid), "limit": 5})
    expect(response, 200)
    return Call(response, s.auditor.id)


@step("GET", "/api/v1/audit/verify")
async def _verify(s: Scene) -> Call:
    response = await s.client.get(f"{API}/audit/verify", headers=s.auditor.headers)
    expect(response, 200)
    return Call(response, s.auditor.id)


@step("GET", "/api/v1/me/care-team")
async def _care_team(s: Scene) -> Call:
    response = await s.client.get(f"{API}/me/care-team", headers=s.patient.headers)
    assert [m["id"] for m in expect(response, 200)] == [str(s.doctor.id)]
    return Call(response, s.pid, s.pid)


@step("DELETE", "/api/v1/me/care-team/{doctor_id}")
async def _end_care(s: Scene) -> Call:
    """Near the end: the doctor's access is over."""
    response = await s.client.delete(f"{API}/me/care-team/{s.doctor.id}",
                                     headers=s.patient.headers)
    expect(response, 204)
    return Call(response, s.pid, s.pid)


# The portal: each step signs its user in with a browser of its own (cookies), through the
# forms, as tests/portal does.

async def _cared_for(s: Scene) -> tuple[TestUser, TestUser]:
    """A new patient, consenting, who booked a new doctor: a care relationship to end."""
    patient, doctor = await signed_in(s.rt, "patient"), await signed_in(s.rt, "doctor")
    expect(await s.client.put(f"{API}/me/consents", headers=patient.headers, json={
        "marketing": False, "data_sharing": True, "analytics": False}), 200)
    expect(await s.client.post(f"{API}/consultations", headers=patient.headers, json={
        "doctor_id": str(doctor.id), "scheduled_at": WHEN, "reason": "Check-up"}), 201)
    return patient, doctor


@step("POST", "/portal/sign-in")
async def _portal_sign_in(s: Scene) -> Call:
    async with client_for(s.rt) as browser:
        return Call(await portal_sign_in(browser, s.patient), s.pid)


@step("POST", "/portal/sign-in/code")
async def _portal_code(s: Scene) -> Call:
    user = await signed_in(s.rt, "patient")
    secret = await enrol_totp(s.client, user)
    async with client_for(s.rt) as browser:
        answer = await portal_sign_in(browser, user, secret=secret)
    assert answer.status_code == 303, answer.text
    return Call(answer, user.id)


@step("POST", "/portal/sign-out")
async def _portal_sign_out(s: Scene) -> Call:
    async with portal_of(s.rt, s.patient) as browser:
        answer = await submit(browser, "/portal", "/portal/sign-out", {})
    assert answer.status_code == 303
    return Call(answer, s.pid)


def _portal_page(path: str, who: str, phi_of_patient: bool = True) -> Step:
    async def run(s: Scene) -> Call:
        user = s.patient if who == "patient" else s.auditor
        async with portal_of(s.rt, user) as browser:
            answer = await browser.get(path)
        assert answer.status_code == 200, answer.text
        return Call(answer, user.id, s.pid if phi_of_patient else None)
    return run


for _path in ("/portal/profile", "/portal/records", "/portal/access-log", "/portal/care-team",
              "/portal/consents"):
    step("GET", _path)(_portal_page(_path, "patient"))
step("GET", "/portal/audit")(_portal_page("/portal/audit", "auditor", False))
step("GET", "/portal/audit/verify")(_portal_page("/portal/audit/verify", "auditor", False))


@step("POST", "/portal/profile")
async def _portal_rectify(s: Scene) -> Call:
    async with portal_of(s.rt, s.patient) as browser:
        answer = await submit(browser, "/portal/profile", "/portal/profile",
                                   {"full_name": "Pat Portal", "phone": "", "address": "",
                                    "birth_date": ""})
    assert answer.status_code in (200, 303), answer.text
    return Call(answer, s.pid, s.pid)


@step("POST", "/portal/care-team/{doctor_id}/end")
async def _portal_end_care(s: Scene) -> Call:
    patient, doctor = await _cared_for(s)
    async with portal_of(s.rt, patient) as browser:
        answer = await submit(browser, "/portal/care-team",
                                   f"/portal/care-team/{doctor.id}/end", {})
    assert answer.status_code in (200, 303), answer.text
    return Call(answer, patient.id, patient.id)


@step("POST", "/portal/consents")
async def _portal_consents(s: Scene) -> Call:
    patient = await signed_in(s.rt, "patient")
    async with portal_of(s.rt, patient) as browser:
        answer = await submit(browser, "/portal/consents", "/portal/consents",
                                   {"data_sharing": "on"})
    assert answer.status_code in (200, 303), answer.text
    return Call(answer, patient.id, patient.id)


@step("POST", "/portal/export")
async def _portal_export(s: Scene) -> Call:
    async with portal_of(s.rt, s.patient) as browser:
        answer = await submit(browser, "/portal/export", "/portal/export",
                                   {"format": "json"})
    assert answer.status_code == 200, answer.text
    return Call(answer, s.pid, s.pid)


@step("POST", "/portal/erase")
async def _portal_erase(s: Scene) -> Call:
    patient = await signed_in(s.rt, "patient")
    async with portal_of(s.rt, patient) as browser:
        answer = await submit(browser, "/portal/erase", "/portal/erase",
                                   {"password": patient.password})
    assert answer.status_code == 200, answer.text
    return Call(answer, patient.id, patient.id)


def test_every_audited_route_has_a_step_and_every_step_a_route() -> None:
    stepped = [key for key, _ in STEPS]
    assert len(stepped) == len(set(stepped))
    audited = {key for key, c in ROUTES.items() if isinstance(c, Audited)}
    assert set(stepped) == audited



@step("DELETE", "/api/v1/me")
async def _erase(s: Scene) -> Call:
    """Last: the patient leaves."""
    response = await s.client.request("DELETE", f"{API}/me", headers=s.patient.headers,
                                      json={"password": s.patient.password})
    expect(response, 204)
    return Call(response, s.pid, s.pid)

async def test_every_audited_route_writes_its_event(client: httpx.AsyncClient,
                                                    runtime: Runtime) -> None:
    scene = Scene(runtime, client, patient=await signed_in(runtime, "patient"),
                  doctor=await signed_in(runtime, "doctor"),
                  rescuer=await signed_in(runtime, "doctor"),
                  admin=await signed_in(runtime, "admin"),
                  auditor=await signed_in(runtime, "auditor"))
    present = route_keys(create_app(runtime=runtime))
    calls: dict[tuple[str, str], Call] = {}
    for key, run in STEPS:
        if key not in present:
            assert key in MAY_BE_ABSENT, key
            continue
        calls[key] = await run(scene)

    found = await events_by_request(runtime, [c.response.headers["x-request-id"]
                                              for c in calls.values()])
    problems = []
    for key, call in calls.items():
        expected = ROUTES[key]
        assert isinstance(expected, Audited)
        events = found[call.response.headers["x-request-id"]]
        wanted = [e for e in events if e.action == expected.action and e.outcome == "success"
                  and e.actor_id == call.actor
                  and (not expected.phi or e.patient_id == call.patient)]
        if not wanted:
            problems.append(f"{key[0]} {key[1]}: no {expected.action} by {call.actor}"
                            + (f" on patient {call.patient}" if expected.phi else "")
                            + f"; got {[(e.action, e.actor_id, e.patient_id) for e in events]}")
    assert problems == [], "\n".join(problems)
