"""`phivault demo` (issue 11): a small clinic made through the API on a development instance,
its logins printed once; refused in production and on an instance that has it already."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from phivault.audit import service as audit
from phivault.audit.models import AuditEvent
from phivault.clinical.models import (
    Attachment,
    BreakGlassGrant,
    Consultation,
    MedicalRecord,
    MedicalRecordVersion,
    Notification,
    Prescription,
)
from phivault.privacy.models import Consent
from phivault.runtime import Runtime
from tests.conftest import client_for
from tests.factories import make_user
from tests.helpers import cli_env, run_cli

CHEAP = {"PHIVAULT_ARGON2_MEMORY_KIB": "8", "PHIVAULT_ARGON2_TIME_COST": "1"}
LOGIN = re.compile(r"^  (admin|doctor|auditor|patient)\s+(\S+@demo\.example)\s+(demo-\S+)$")


async def count(rt: Runtime, model: type[Any]) -> int:
    async with rt.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(model)))
                   .scalar_one())


async def test_the_demo_fills_a_clinic_and_prints_working_logins(
        fresh_runtime: Callable[..., Any]) -> None:
    rt: Runtime = await fresh_runtime()
    made = run_cli("demo", env=cli_env(rt, **CHEAP))
    assert made.returncode == 0, made.stderr
    logins = [LOGIN.match(line).groups()  # type: ignore[union-attr]
              for line in made.stdout.splitlines() if LOGIN.match(line)]
    assert [role for role, _, _ in logins] == ["admin", "doctor", "doctor", "auditor",
                                               "patient", "patient", "patient"]
    passwords = [password for _, _, password in logins]
    assert len(set(passwords)) == 7
    # Shown once: in no log line.
    assert not any(password in made.stderr for password in passwords)

    async with client_for(rt) as client:
        for _role, email, password in logins:
            answer = await client.post("/api/v1/auth/login",
                                       json={"email": email, "password": password})
            assert answer.status_code == 200, (email, answer.text)
        john = next(email for _, email, _ in logins if email.startswith("john"))
        token = (await client.post("/api/v1/auth/login", json={
            "email": john, "password": passwords[5]})).json()["access_token"]
        seen = (await client.get("/api/v1/me/access-log",
                                 headers={"Authorization": f"Bearer {token}"})).json()
        assert any(entry["break_glass"] for entry in seen)

    assert await count(rt, MedicalRecord) == 2
    assert await count(rt, MedicalRecordVersion) == 3  # one amended
    assert await count(rt, Prescription) == 1
    assert await count(rt, Attachment) == 1
    assert await count(rt, Consultation) == 3
    assert await count(rt, BreakGlassGrant) == 1
    assert await count(rt, Notification) >= 2  # the proposal, the break-glass
    assert await count(rt, Consent) == 5  # three first consents, two changes
    result = await audit.verify_snapshot(rt.sessions, rt.audit_key, rt.sequencer, rt.queue_key)
    assert result.ok and result.events == await count(rt, AuditEvent) > 30

    again = run_cli("demo", env=cli_env(rt, **CHEAP))
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.startswith("phivault: this instance has its demo clinic already")
    assert await count(rt, MedicalRecord) == 2


async def test_the_demo_refuses_production_and_staff_approval(
        fresh_runtime: Callable[..., Any]) -> None:
    rt: Runtime = await fresh_runtime()
    refused = run_cli("demo", env=cli_env(rt, PHIVAULT_STAFF_APPROVAL="true", **CHEAP))
    assert refused.returncode == 2 and "PHIVAULT_STAFF_APPROVAL" in refused.stderr
    assert await count(rt, AuditEvent) == 0


def test_the_demo_refuses_in_production(tmp_path: Any) -> None:
    from phivault.crypto.keys import KeyKind, generate_key_line
    env = {"PHIVAULT_ENV": "prod", "PHIVAULT_MASTER_KEYS": generate_key_line(KeyKind.MASTER),
           "PHIVAULT_INDEX_KEY": generate_key_line(KeyKind.INDEX),
           "PHIVAULT_AUDIT_KEY": generate_key_line(KeyKind.AUDIT),
           "PHIVAULT_JWT_KEYS": generate_key_line(KeyKind.JWT),
           "PHIVAULT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/prod.db",
           "PHIVAULT_BEHIND_PROXY": "true", "PATH": "/usr/bin:/bin"}
    refused = run_cli("demo", env=env)
    assert refused.returncode == 2, refused.stderr
    assert "refuses with PHIVAULT_ENV=prod" in refused.stderr


async def test_the_demo_refuses_an_instance_with_people_in_it(
        fresh_runtime: Callable[..., Any]) -> None:
    """`PHIVAULT_ENV` is `dev` unless set: the demo must not add fake patients, staff and a
    break-glass to an instance that holds real accounts (an outside review)."""
    rt: Runtime = await fresh_runtime()
    await make_user(rt)
    before = await count(rt, AuditEvent)
    refused = run_cli("demo", env=cli_env(rt, **CHEAP))
    assert refused.returncode == 1, refused.stderr
    assert "has 1 accounts already" in refused.stderr
    assert await count(rt, AuditEvent) == before and await count(rt, MedicalRecord) == 0
