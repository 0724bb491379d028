"""schemathesis over the app's own OpenAPI document, against a live `phivault serve` over TLS.

The server runs on a demo clinic (`phivault.cli.demo.build`: an admin, doctors, an auditor,
patients with charts), so generated requests carry real tokens of every role and, on half of
the well-formed cases, ids that exist: they reach the services, not only the guards. Each case
goes as a role the route admits, every fourth as one it refuses. Every operation gets valid
cases (positive) and cases that break its schema (negative). Each answer must be documented:
status, content type, headers and body schema; no 5xx and no traceback, and the server's own
log holds no unhandled error.

What it leaves to other tests: broken and missing tokens (tests/auth; the generator's own
Authorization header is off), and whether a request the schema forbids is refused, which
schemathesis checks as `negative_data_rejection`: phivault ignores query parameters it does not
know, as HTTP APIs commonly do, and bodies are `extra="forbid"` (tests/security). Before each
operation the patient shares their chart again, since a fuzzed `PUT /me/consents` may withdraw
it and leave every chart route at 403.

Bounded for `make test` by PHIVAULT_TEST_FUZZ_EXAMPLES (cases per operation and mode, default
8, derandomized so a failure is the same on every run); `make fuzz` runs 200, with a new seed
(PHIVAULT_TEST_FUZZ_RANDOM=1).
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from phivault.access.guards import app_routes, declared_rules
from phivault.cli.demo import Person, build
from phivault.crypto.tls import write_self_signed_certificate
from phivault.runtime import Runtime
from phivault.web.app import create_app
from tests.helpers import (
    cli_env,
    client_context,
    free_port,
    phivault_command,
    stop_server,
    wait_listening,
)

EXAMPLES = int(os.environ.get("PHIVAULT_TEST_FUZZ_EXAMPLES", "8"))
RANDOM = os.environ.get("PHIVAULT_TEST_FUZZ_RANDOM") == "1"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
ROLES = ("patient", "doctor", "admin", "auditor")


@dataclass
class Clinic:
    base_url: str
    cert: Path
    people: dict[str, Person]
    ids: dict[str, str]
    log: Path
    runtime: Runtime
    http: requests.Session = field(default_factory=requests.Session)

    def reset(self) -> None:
        """Before each operation: the patient shares their chart again (a fuzzed
        `PUT /me/consents` may have withdrawn it), so chart routes are reached."""
        self.http.put(f"{self.base_url}/api/v1/me/consents", headers=self.people[
            "patient"].headers, json={"marketing": False, "data_sharing": True,
                                      "analytics": False}, verify=str(self.cert), timeout=30)

    def relogin(self, person: Person) -> None:
        """A fuzzed route may end the actor's session (a wrong TOTP never, a logout of its
        own refresh token never: the fuzzer holds none); then sign in again."""
        answer = self.http.post(f"{self.base_url}/api/v1/auth/login",
                                json={"email": person.email, "password": person.password},
                                verify=str(self.cert), timeout=30)
        if answer.status_code == 200:
            person.token = answer.json()["access_token"]


@pytest.fixture
async def clinic(fresh_runtime: Callable[..., Any], tmp_path: Path) -> Iterator[Clinic]:
    # Auth routes are fuzzed too: a per-address limit of 20/minute would answer 429 to all
    # but the first few, and the fuzzer's own actors, whose passwords it sends wrong to
    # password-checking routes, would be locked out.
    limits = {"auth_rate_limit": "100000/minute", "lockout": "100000/minute"}
    rt: Runtime = await fresh_runtime(**limits)
    people, _ = await build(rt)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed_certificate(cert, key)
    port, log = free_port(), tmp_path / "server.log"
    env = cli_env(rt, PHIVAULT_TLS_CERT_FILE=str(cert), PHIVAULT_TLS_KEY_FILE=str(key),
                  PHIVAULT_AUTH_RATE_LIMIT=limits["auth_rate_limit"],
                  PHIVAULT_LOCKOUT=limits["lockout"])
    with log.open("w") as sink:
        process = subprocess.Popen(
            phivault_command("serve", "--host", "127.0.0.1", "--port", str(port)),
            env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        wait_listening(port, process)
        by_role = {p.role: p for p in reversed(people)}  # the first of each role
        base = f"https://127.0.0.1:{port}"
        clinic = Clinic(base, cert, by_role, _known_ids(base, cert, by_role), log, rt)
        clinic.http.verify = str(cert)
        yield clinic
    finally:
        if "clinic" in locals():
            clinic.http.close()  # no kept-alive connection for the server to wait on
        stop_server(process)


def _known_ids(base: str, cert: Path, people: dict[str, Person]) -> dict[str, str]:
    """Ids that exist, by path parameter name: the first patient's chart, which the first
    doctor cares for. Accounts a case may disable or sign out are made for that, never the
    fuzzer's own actors."""
    patient, doctor, admin = people["patient"], people["doctor"], people["admin"]
    with httpx.Client(base_url=base + "/api/v1", verify=client_context(cert)) as api:
        def get(path: str, who: Person) -> Any:
            answer = api.get(path, headers=who.headers)
            answer.raise_for_status()
            return answer.json()

        victim = api.post("/users", headers=admin.headers, json={
            "email": "victim.doctor@demo.example", "full_name": "Victor Victim",
            "role": "doctor", "specialty": "Fuzzing"})
        victim.raise_for_status()
        # A second session of the patient's, for the routes that end one by id.
        second = api.post("/auth/login", json={"email": patient.email,
                                                "password": patient.password})
        second.raise_for_status()
        return {
            "patient_id": patient.id,
            "record_id": get(f"/patients/{patient.id}/records", doctor)[0]["id"],
            "consultation_id": get("/consultations", patient)[0]["id"],
            "attachment_id": get(f"/patients/{patient.id}/attachments", patient)[0]["id"],
            "user_id": victim.json()["id"],
            "doctor_id": victim.json()["id"],
            "session_id": next(s["id"] for s in get("/me/sessions", patient)
                               if not s["current"]),
        }


@dataclass
class Tally:
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    succeeded: set[tuple[str, str]] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)


def test_every_operation_answers_as_documented(clinic: Clinic) -> None:
    app = create_app(runtime=clinic.runtime)
    roles = _roles_of_operations(app)
    # The fuzzer's actors bring their own tokens: no generated Authorization header, valid or
    # broken (missing and broken tokens have tests of their own, tests/auth).
    config = SchemathesisConfig.from_dict({"generation": {"with-security-parameters": False}})
    schema = schemathesis.openapi.from_dict(app.openapi(), config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    tally = Tally()
    for operation in operations:
        clinic.reset()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(clinic, operation, mode, roles[(operation.method.upper(), operation.path)],
                  tally)
    labels = {(op.method.upper(), op.path) for op in operations}
    print(f"\nfuzzing: {tally.cases} generated cases over {len(operations)} operations; "
          f"statuses {dict(sorted(tally.statuses.items()))}; never a success: "
          f"{sorted(labels - tally.succeeded)}")
    server_log = clinic.log.read_text()
    assert "Traceback" not in server_log and "unhandled_error" not in server_log
    assert tally.failures == [], "\n\n".join(tally.failures)
    # The cases went past the guards: most operations answered a success at least once.
    assert len(tally.succeeded) >= 0.7 * len(labels), sorted(labels - tally.succeeded)
    assert tally.cases >= len(labels) * 4


def _fuzz(clinic: Clinic, operation: Any, mode: GenerationMode, allowed: frozenset[str] | None,
          tally: Tally) -> None:
    label = f"{operation.method.upper()} {operation.path}"
    turn = itertools.count()

    @settings(max_examples=EXAMPLES, derandomize=not RANDOM, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        n = next(turn)
        actor = _actor(clinic, allowed, n)
        if mode is GenerationMode.POSITIVE and n % 2 == 0:
            for name in case.path_parameters or {}:
                if name in clinic.ids:
                    case.path_parameters[name] = clinic.ids[name]
            if isinstance(case.body, dict):
                for name in set(case.body) & {"doctor_id", "patient_id"}:
                    case.body[name] = clinic.people[name.removesuffix("_id")].id
        headers = dict(actor.headers) if actor else {}
        response = case.call(base_url=clinic.base_url, session=clinic.http, headers=headers,
                             timeout=30, verify=str(clinic.cert))
        if actor and response.status_code == 401 and "invalid_token" in response.text:
            clinic.relogin(actor)
        tally.cases += 1
        tally.statuses[response.status_code] += 1
        if response.status_code < 300:
            tally.succeeded.add((operation.method.upper(), operation.path))
        assert b"Traceback" not in response.content
        case.validate_response(response, checks=CHECKS, headers=headers)

    try:
        run()
    except Unsatisfiable:
        # Nothing of the operation can be made invalid (no parameters, no body).
        assert mode is GenerationMode.NEGATIVE and not operation.body and not any(
            operation.iter_parameters()), label
    except Exception as exc:  # one report per operation and mode, then the next operation
        tally.failures.append(f"{label} [{mode.value}]: {str(exc)[:1500]}")


def _actor(clinic: Clinic, allowed: frozenset[str] | None, n: int) -> Person | None:
    """Mostly a role the route admits (in turn), every fourth case one it does not."""
    if allowed is None:
        return None
    admitted = [r for r in ROLES if r in allowed]
    refused = [r for r in ROLES if r not in allowed]
    if n % 4 == 3 and refused:
        return clinic.people[refused[n // 4 % len(refused)]]
    return clinic.people[admitted[n % len(admitted)]] if admitted else None


def _roles_of_operations(app: FastAPI) -> dict[tuple[str, str], frozenset[str] | None]:
    """Each operation's admitted roles (None: public), from its declared access rule."""
    found: dict[tuple[str, str], frozenset[str] | None] = {}
    for route in app_routes(app):
        if route.dependant is None:
            continue
        (rule,) = declared_rules(route.dependant)
        for method in route.methods:
            found[(method, route.path)] = None if rule.public else frozenset(rule.roles)
    return found
