"""A live `phivault serve` over TLS, and a small clinic made through the client itself.

The client is tested the way an app uses it: against a real server process on a real socket,
never the ASGI app in this process. One server per test module and backend (starting one costs
about three seconds); each test signs in sessions of its own, so tests do not share tokens.
The server's access tokens last 60 s (`PHIVAULT_ACCESS_TOKEN_TTL`, its minimum). Only the first
admin is made in this process, through the accounts service, as `phivault users create` makes
it; everyone else is created through the API with the client, as `phivault demo` does.
Passwords are random, made now. What the client does with answers no honest server gives is
tested on a fake server in this process instead (`fake_server`, `fakes.py`).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from phivault.client import AsyncPhivaultClient, PhivaultClient
from phivault.client.models import StaffRole
from phivault.crypto.tls import write_self_signed_certificate
from phivault.db.migrate import upgrade
from phivault.runtime import Runtime
from tests.client.fakes import Fake, Handler, Kind
from tests.conftest import Backend, build_settings, create_pg_database, drop_pg_database
from tests.helpers import cli_env, free_port, phivault_command, stop_server, wait_listening

ACCESS_TOKEN_TTL = 60
MiB = 1024 * 1024


@dataclass
class LiveServer:
    base_url: str
    ca_file: Path
    runtime: Runtime  # this process's runtime on the server's database (the first admin)

    def client(self, **options: Any) -> PhivaultClient:
        return PhivaultClient(self.base_url, ca_file=self.ca_file, **options)

    def async_client(self, **options: Any) -> AsyncPhivaultClient:
        return AsyncPhivaultClient(self.base_url, ca_file=self.ca_file, **options)


@dataclass
class Account:
    role: str
    email: str
    password: str
    id: str = ""


@dataclass
class Clinic:
    """`doctor` cares for `patient` (who shares their chart) and for `private_patient` (who
    does not); `stranger` is a doctor with no patients."""

    server: LiveServer
    admin: Account
    doctor: Account
    stranger: Account
    auditor: Account
    patient: Account
    private_patient: Account


def tampered(token: str) -> str:
    """The same JWT with the first character of its signature changed (the last one may only
    hold padding bits, which leave the signature as it was)."""
    head, payload, signature = token.split(".")
    first = "A" if signature[0] != "A" else "Q"
    return f"{head}.{payload}.{first}{signature[1:]}"


def new_password() -> str:
    return secrets.token_urlsafe(18)


def new_account(role: str) -> Account:
    return Account(role, f"{role}.{secrets.token_hex(5)}@clinic.example", new_password())


async def _database(backend: Backend, folder: Path) -> tuple[str, str | None]:
    if backend.name == "sqlite":
        return f"sqlite+aiosqlite:///{folder}/client.db", None
    name = f"phivault_client_{os.getpid()}_{secrets.token_hex(4)}"
    return await create_pg_database(name), name


@pytest.fixture(scope="module")
async def live_server(backend: Backend, keys_env: dict[str, str],
                      tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveServer]:
    folder = tmp_path_factory.mktemp("client")
    url, pg_name = await _database(backend, folder)
    runtime = Runtime.from_settings(build_settings(keys_env, url), chain_after_commit=True)
    await upgrade(runtime.engine)
    cert, key = folder / "cert.pem", folder / "key.pem"
    write_self_signed_certificate(cert, key)
    port = free_port()
    env = cli_env(runtime, PHIVAULT_TLS_CERT_FILE=str(cert), PHIVAULT_TLS_KEY_FILE=str(key),
                  PHIVAULT_ACCESS_TOKEN_TTL=str(ACCESS_TOKEN_TTL),
                  PHIVAULT_ARGON2_MEMORY_KIB="8", PHIVAULT_ARGON2_TIME_COST="1",
                  PHIVAULT_AUTH_RATE_LIMIT="1000000/minute", PHIVAULT_LOG_LEVEL="warning")
    # The server's log goes to a file: a pipe nobody reads would stall it once full.
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        phivault_command("serve", "--host", "127.0.0.1", "--port", str(port)),
        env=env, stdout=log, stderr=log, text=True)
    try:
        try:
            wait_listening(port, process)
        except AssertionError:
            raise AssertionError((folder / "server.log").read_text()[-2000:]) from None
        yield LiveServer(f"https://127.0.0.1:{port}", cert, runtime)
    finally:
        try:
            stop_server(process)
        finally:
            log.close()
        await runtime.close()
        if pg_name:
            await drop_pg_database(pg_name)


@pytest.fixture(scope="module")
async def clinic(live_server: LiveServer) -> Clinic:
    admin = new_account("admin")
    async with live_server.runtime.unit_of_work() as session:
        made = await live_server.runtime.accounts.create_with_password(
            session, admin.email, "admin", "Ada Admin", None, admin.password)
        admin.id = str(made.id)
    with live_server.client() as client:
        client.login(admin.email, admin.password)
        doctor, stranger, auditor = (new_account("doctor"), new_account("doctor"),
                                     new_account("auditor"))
        staff_roles: tuple[tuple[Account, str, StaffRole, str | None], ...] = (
            (doctor, "Dr Quinn", "doctor", "Family medicine"),
            (stranger, "Dr Stranger", "doctor", "Dermatology"),
            (auditor, "Avery Auditor", "auditor", None))
        for person, name, role, specialty in staff_roles:
            staff = client.create_staff(person.email, name, role, specialty=specialty)
            assert staff.setup_token is not None  # staff approval is off in dev
            client.setup_account(staff.setup_token, person.password)
            person.id = str(staff.id)
    patient, private_patient = new_account("patient"), new_account("patient")
    when = datetime.now(UTC) + timedelta(days=2)
    for person, sharing in ((patient, True), (private_patient, False)):
        with live_server.client() as client:
            person.id = str(client.register(person.email, person.password, "Pat Ient", consents={
                "marketing": False, "data_sharing": sharing, "analytics": False}).id)
            client.login(person.email, person.password)
            client.book_consultation(doctor.id, when, "A persistent cough")
    return Clinic(live_server, admin, doctor, stranger, auditor, patient, private_patient)


@pytest.fixture
def new_client(clinic: Clinic) -> Iterator[Callable[..., PhivaultClient]]:
    """Synchronous clients of the live server, not signed in; closed after the test."""
    made: list[PhivaultClient] = []

    def make(**options: Any) -> PhivaultClient:
        made.append(clinic.server.client(**options))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture
def sign_in(new_client: Callable[..., PhivaultClient]) -> Callable[..., PhivaultClient]:
    """A synchronous client signed in as an account; closed after the test."""
    def make(who: Account, **options: Any) -> PhivaultClient:
        client = new_client(**options)
        client.login(who.email, who.password)
        return client

    return make


@pytest.fixture(params=["sync", "async"])
async def fake_server(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Fake]]:
    """Clients of each kind on a fake server (`fakes.py`): `fake_server(handler, **options)`."""
    kind: Kind = request.param
    made: list[Fake] = []

    def make(handler: Handler, **options: Any) -> Fake:
        made.append(Fake(kind, handler, **options))
        return made[-1]

    yield make
    for fake in made:
        await fake.close()
