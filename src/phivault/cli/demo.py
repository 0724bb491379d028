"""`phivault demo`: fill a development instance with a small clinic, through the real API.

A newcomer who ran `make run` should see real data in `/docs` within a minute. The clinic is made
the way an integrating app would make it: through the HTTP API (the app in this process, with
the instance's own keys and database), so every step is authorised, encrypted and audited like
any other request: an admin (the first one comes from the command line, as `users create`
makes it), who creates two doctors and an auditor, who set their own passwords from their
one-time setup tokens; three patients who register, consent, book, upload a scan and change
their minds; records (one amended), prescriptions, a doctor's proposal, and a break-glass read by
a doctor with no care relationship, which notifies the patient. Everyone's password is random,
made now, and printed once; nothing is stored anywhere else.

It refuses in production (`PHIVAULT_ENV=prod`), on an instance that holds any account (it is
for an empty development instance, never one with real people in it), and on one that has its
demo clinic already: start from an empty database to make another.
"""

from __future__ import annotations

import secrets
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import typer
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.audit.actions import Action
from phivault.auth.models import User
from phivault.auth.service import email_lookups
from phivault.cli.common import fail, run_with_runtime, settings_or_exit
from phivault.errors import EmailTaken
from phivault.runtime import Runtime

API = "/api/v1"
DOMAIN = "demo.example"  # RFC 2606: mail to it goes nowhere
ADMIN_EMAIL = f"ada.admin@{DOMAIN}"
REASON = ("Found unconscious at home, brought in by ambulance; no relative reachable and the "
          "allergy history is needed before anaesthesia.")


@dataclass
class Person:
    role: str
    name: str
    email: str
    password: str = ""
    id: str = ""
    token: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class DemoFailed(Exception):
    """A step of the demo was refused; `str()` names the step and the answer's error code."""


def new_password() -> str:
    return "demo-" + secrets.token_urlsafe(15)


def tiny_png() -> bytes:
    """A real 8x8 grey PNG (an "X-ray"), made here: the type is read from the file's bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + bytes(16 * ((x + y) % 8) for x in range(8)) for y in range(8))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


async def _has_demo_admin(session: AsyncSession, runtime: Runtime, email: str) -> bool:
    return (await session.execute(select(User.id).where(
        User.email_index.in_(email_lookups(runtime.blind_index, email))))).first() is not None


class Clinic:
    """The API calls that build the clinic, each checked."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.requests = 0

    async def call(self, step: str, method: str, path: str, who: Person | None = None,
                   expected: int = 200, **kwargs: Any) -> Any:
        headers = {**kwargs.pop("headers", {}), **(who.headers if who else {})}
        answer = await self.client.request(method, API + path, headers=headers, **kwargs)
        self.requests += 1
        if answer.status_code != expected:
            code = answer.json().get("error", "?") if answer.content else "?"
            raise DemoFailed(f"{step}: {method} {path} answered {answer.status_code} {code}")
        return answer.json() if answer.content else None

    async def sign_in(self, person: Person) -> None:
        tokens = await self.call(f"sign in {person.email}", "POST", "/auth/login",
                                 json={"email": person.email, "password": person.password})
        person.token = tokens["access_token"]

    async def staff(self, admin: Person, person: Person, specialty: str | None = None) -> None:
        body: dict[str, Any] = {"email": person.email, "full_name": person.name,
                                "role": person.role}
        if specialty:
            body["specialty"] = specialty
        made = await self.call(f"create {person.role}", "POST", "/users", admin, 201,
                               json=body)
        person.id = made["id"]
        await self.call("staff set-up", "POST", "/auth/setup", None, 204, json={
            "setup_token": made["setup_token"], "password": person.password})
        await self.sign_in(person)

    async def patient(self, person: Person, consents: dict[str, bool], **profile: str) -> None:
        made = await self.call("register", "POST", "/auth/register", None, 201, json={
            "email": person.email, "password": person.password, "full_name": person.name,
            "consents": consents, **profile})
        person.id = made["id"]
        await self.sign_in(person)

    async def book(self, patient: Person, doctor: Person, when: datetime, reason: str) -> str:
        made = await self.call("book", "POST", "/consultations", patient, 201, json={
            "doctor_id": doctor.id, "scheduled_at": when.isoformat(), "reason": reason})
        return str(made["id"])

    async def record(self, doctor: Person, patient: Person, diagnosis: str,
                     prescriptions: list[str], notes: str) -> str:
        made = await self.call("write a record", "POST", f"/patients/{patient.id}/records",
                               doctor, 201, json={"diagnosis": diagnosis,
                                                  "prescriptions": prescriptions,
                                                  "notes": notes})
        return str(made["id"])


async def build(runtime: Runtime) -> tuple[list[Person], int]:
    """Make the clinic; returns its people (with their passwords) and how many requests."""
    from phivault.web.app import create_app  # the web app only when the command runs

    admin = Person("admin", "Ada Admin", ADMIN_EMAIL, new_password())
    async with runtime.unit_of_work() as session:
        accounts = int((await session.execute(select(func.count()).select_from(User)))
                       .scalar_one())
        if accounts and not await _has_demo_admin(session, runtime, admin.email):
            raise DemoFailed(f"this instance has {accounts} accounts already; the demo fills "
                             "an empty development instance only")
        try:
            user = await runtime.accounts.create_with_password(
                session, admin.email, "admin", admin.name, None, admin.password)
        except EmailTaken:
            raise DemoFailed("this instance has its demo clinic already (its logins were "
                             "printed when it was made); start from an empty database to "
                             "make another") from None
        admin.id = str(user.id)
    house = Person("doctor", "Dr Gregory House", f"gregory.house@{DOMAIN}", new_password())
    quinn = Person("doctor", "Dr Michaela Quinn", f"michaela.quinn@{DOMAIN}", new_password())
    auditor = Person("auditor", "Avery Auditor", f"avery.auditor@{DOMAIN}", new_password())
    jane = Person("patient", "Jane Roe", f"jane.roe@{DOMAIN}", new_password())
    john = Person("patient", "John Doe", f"john.doe@{DOMAIN}", new_password())
    ida = Person("patient", "Ida Ng", f"ida.ng@{DOMAIN}", new_password())
    now = datetime.now(UTC).replace(second=0, microsecond=0)

    transport = httpx.ASGITransport(app=create_app(runtime=runtime), client=("127.0.0.1", 0))
    async with httpx.AsyncClient(transport=transport, base_url="https://127.0.0.1",
                                 headers={"User-Agent": "phivault-demo/1"}) as client:
        clinic = Clinic(client)
        await clinic.sign_in(admin)
        await clinic.staff(admin, house, "Diagnostic medicine")
        await clinic.staff(admin, quinn, "Family medicine")
        await clinic.staff(admin, auditor)
        await clinic.patient(jane, {"marketing": False, "data_sharing": True,
                                    "analytics": True},
                             birth_date="1984-03-14", sex="female", phone="+44 20 7946 0018")
        await clinic.patient(john, {"marketing": False, "data_sharing": True,
                                    "analytics": False}, birth_date="1931-11-02")
        await clinic.patient(ida, {"marketing": False, "data_sharing": False,
                                   "analytics": False}, birth_date="1999-07-21")

        # Jane sees Dr House; her chart grows, and she adds a scan.
        await clinic.book(jane, house, now + timedelta(days=2, hours=3),
                          "Recurring headaches and blurred vision")
        record = await clinic.record(
            house, jane, "Migraine with aura", ["Sumatriptan 50 mg at onset"],
            "Neurological exam normal. Headache diary for four weeks.")
        await clinic.call("amend a record", "PATCH", f"/records/{record}", house, json={
            "notes": "Neurological exam normal. Diary shows a pattern after night shifts."})
        await clinic.call("prescribe", "POST", f"/patients/{jane.id}/prescriptions", house,
                          201, json={"medication": "Propranolol", "dosage": "40 mg twice daily",
                                     "instructions": "Prevention; review in six weeks."})
        await clinic.call("upload a scan", "POST", f"/patients/{jane.id}/attachments", jane,
                          201, files={"file": ("head-xray.png", tiny_png(), "image/png")})
        # John sees Dr Quinn; his records are shared with his care team.
        await clinic.book(john, quinn, now + timedelta(days=5, hours=1), "Annual check-up")
        await clinic.record(quinn, john, "Essential hypertension",
                            ["Amlodipine 5 mg once daily"],
                            "Home blood pressure log requested.")
        # Ida does not share her records yet; Dr Quinn proposes a visit (a notification),
        # then Ida changes her mind about analytics, and back (a consent history).
        await clinic.call("propose", "POST", "/consultations", quinn, 201, json={
            "patient_id": ida.id, "scheduled_at": (now + timedelta(days=9)).isoformat(),
            "reason": "Follow-up of your blood test"})
        for analytics in (True, False):
            await clinic.call("change consents", "PUT", "/me/consents", ida, json={
                "marketing": False, "data_sharing": False, "analytics": analytics})
        # An emergency: Dr House, with no care relationship, breaks the glass on John's
        # chart and reads it; John is notified, and the auditors see the reason.
        await clinic.call("break the glass", "POST", f"/patients/{john.id}/break-glass",
                          house, 201, json={"reason": REASON})
        await clinic.call("read under break-glass", "GET", f"/patients/{john.id}/records",
                          house)
        await clinic.call("search the trail", "GET", "/audit", auditor,
                          params={"action": Action.BREAK_GLASS.value})
    return [admin, house, quinn, auditor, jane, john, ida], clinic.requests


def demo() -> None:
    """Fill this development instance with a small clinic, and print everyone's login.

    Made through the API, so audited and encrypted like any request: an admin, two doctors,
    an auditor, three patients with consultations, records (one amended), prescriptions, a
    scan, consent changes, a doctor's proposal and a break-glass read (with its
    notification). Passwords are random and shown only here. Refuses with PHIVAULT_ENV=prod,
    and on an instance that has its demo clinic already.
    """
    settings = settings_or_exit()
    if settings.env == "prod":
        fail("`phivault demo` fills a development instance; it refuses with "
             "PHIVAULT_ENV=prod", 2)
    if settings.staff_approval_required or settings.mfa_roles:
        fail("the demo signs its staff in with a password alone: it needs "
             "PHIVAULT_STAFF_APPROVAL and PHIVAULT_MFA_REQUIRED_ROLES off (the development "
             "defaults)", 2)

    async def work(runtime: Runtime) -> tuple[list[Person], int]:
        return await build(runtime)

    try:
        # Its own requests' log lines would bury the logins: warnings and errors only.
        quiet = settings.model_copy(update={"log_level": "warning"})
        people, requests = run_with_runtime("demo", work, quiet)
    except DemoFailed as exc:
        fail(str(exc))
    width = max(len(person.email) for person in people)
    typer.echo(f"The demo clinic is ready ({len(people)} people, {requests} API requests, all "
               "in the audit trail). Their logins, shown only now:\n")
    for person in people:
        typer.echo(f"  {person.role:<8} {person.email:<{width}}  {person.password}")
    typer.echo("\nSign in at /docs with POST /api/v1/auth/login, then Authorize with the "
               "access token. Dr House has just broken the glass on John Doe's chart: see "
               "John's GET /me/access-log and /me/notifications, and the auditor's "
               "GET /audit?action=BREAK_GLASS.")


__all__ = ["DemoFailed", "build", "demo"]
