"""A live `phivault serve` over TLS for the browser tests (tests/portal/test_portal_browser.py).

Its SQLite database holds the demo clinic (`phivault.cli.demo.build`: doctors, an auditor,
patients with charts, and a break-glass read of John's chart), plus two patients made through
the live server's API: Tess, who signs in with a TOTP code, and Kim, whose care team is ended
in the browser. The API client checks, as a doctor or the patient, what the portal changed.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyotp

from phivault.cli.demo import Person, build
from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.crypto.tls import write_self_signed_certificate
from phivault.db.migrate import upgrade
from phivault.runtime import Runtime
from tests.conftest import build_settings
from tests.helpers import (
    cli_env,
    client_context,
    free_port,
    phivault_command,
    stop_server,
    wait_listening,
)

# Every browser comes from 127.0.0.1: the per-address sign-in limit must not be what answers.
SERVER_ENV = {"PHIVAULT_AUTH_RATE_LIMIT": "100000/minute", "PHIVAULT_ARGON2_MEMORY_KIB": "8",
              "PHIVAULT_ARGON2_TIME_COST": "1", "PHIVAULT_LOG_LEVEL": "warning"}


@dataclass
class LiveClinic:
    """The running server, its people by first name (`jane`, `house`, ...) and an API client."""

    base_url: str
    log: Path
    api: httpx.AsyncClient
    people: dict[str, Person]
    totp: dict[str, str] = field(default_factory=dict)

    async def token(self, who: str) -> str:
        """A fresh access token of `who` (password only: not for an account with TOTP)."""
        person = self.people[who]
        answer = await self.api.post("/auth/login", json={"email": person.email,
                                                          "password": person.password})
        assert answer.status_code == 200, answer.text
        person.token = answer.json()["access_token"]
        return person.token

    async def as_(self, who: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A request to the API as `who`, signed in afresh."""
        headers = {"Authorization": f"Bearer {await self.token(who)}"}
        return await self.api.request(method, path, headers=headers, **kwargs)


async def _more_people(clinic: LiveClinic, quinn: Person) -> None:
    """Tess (TOTP on) and Kim (sharing her chart, a consultation booked with Dr Quinn)."""
    tess = Person("patient", "Tess Totp", "tess.totp@demo.example", "tess-" + "x" * 16)
    kim = Person("patient", "Kim Lee", "kim.lee@demo.example", "kim-" + "y" * 16)
    for person in (tess, kim):
        made = await clinic.api.post("/auth/register", json={
            "email": person.email, "password": person.password, "full_name": person.name,
            "consents": {"marketing": False, "data_sharing": True, "analytics": False}})
        assert made.status_code == 201, made.text
        person.id = made.json()["id"]
        clinic.people[person.name.split()[0].lower()] = person
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    booked = await clinic.as_("kim", "POST", "/consultations", json={
        "doctor_id": quinn.id, "scheduled_at": when.isoformat(), "reason": "A sore knee"})
    assert booked.status_code == 201, booked.text
    headers = {"Authorization": f"Bearer {await clinic.token('tess')}"}
    setup = await clinic.api.post("/auth/mfa/setup", headers=headers,
                                  json={"password": tess.password})
    assert setup.status_code == 200, setup.text
    secret = setup.json()["secret"]
    enabled = await clinic.api.post("/auth/mfa/enable", headers=headers,
                                    json={"code": pyotp.TOTP(secret).now()})
    assert enabled.status_code == 204, enabled.text
    clinic.totp["tess"] = secret


@asynccontextmanager
async def live_clinic(keys: dict[str, str], folder: Path) -> AsyncIterator[LiveClinic]:
    """The server on a free port of 127.0.0.1, over TLS with a self-signed certificate, until
    the block ends; then its log must hold no unhandled error."""
    runtime = Runtime.from_settings(
        build_settings(keys, f"sqlite+aiosqlite:///{folder}/portal-e2e.db"),
        chain_after_commit=True)
    try:
        await upgrade(runtime.engine)
        people, _ = await build(runtime)
        env = cli_env(runtime)
    finally:
        await runtime.close()  # the server alone uses the database from now on
    cert, key, log = folder / "cert.pem", folder / "key.pem", folder / "server.log"
    write_self_signed_certificate(cert, key)
    port = free_port()
    # A signing key, so the auditor's checkpoint page shows a signed head.
    env.update(SERVER_ENV, PHIVAULT_TLS_CERT_FILE=str(cert), PHIVAULT_TLS_KEY_FILE=str(key),
               PHIVAULT_AUDIT_SIGNING_KEY=generate_key_line(KeyKind.AUDIT_SIGNING))
    with log.open("w") as sink:
        process = subprocess.Popen(
            phivault_command("serve", "--host", "127.0.0.1", "--port", str(port)),
            env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        wait_listening(port, process)
        base = f"https://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base + "/api/v1", verify=client_context(cert),
                                     timeout=30) as api:
            clinic = LiveClinic(base, log, api,
                                {p.name.split()[-1 if p.role == "doctor" else 0].lower(): p
                                 for p in people})
            await _more_people(clinic, clinic.people["quinn"])
            yield clinic
    finally:
        stop_server(process)
    text = log.read_text()
    assert "Traceback" not in text and "unhandled_error" not in text, text[-4000:]
