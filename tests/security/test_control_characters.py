"""Review finding (issue 10, LOW): a NUL character in a staff member's `full_name` reached
PostgreSQL, which refuses NUL in text, and came back as a 500. Every text the API takes refuses
NUL, the other C0 and C1 controls, DEL and lone surrogates with a 422 that does not echo the
value; single-line fields also refuse tab, CR, LF and U+2028/U+2029, multi-line free text
keeps tab, CR and LF (phivault.schemas).

The walk below takes every route of the app's OpenAPI document and sends, for each string a
body can hold and for each path and query parameter, the characters that must be refused, as a
caller the route lets past its access rule."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import pytest
from pydantic import TypeAdapter, ValidationError

from phivault.access.guards import app_routes
from phivault.clinical.schemas import DoctorProposal, PatientBooking
from phivault.runtime import Runtime
from phivault.schemas import MULTI_LINE, SINGLE_LINE, RequestModel
from phivault.web.app import create_app
from tests.clinical.world import API, book, expect, set_consent
from tests.factories import TestUser, new_email, signed_in

ROLES = ("patient", "doctor", "admin", "auditor")
# The free-text fields that may span lines (the last key of their place in a body). A new
# multi-line field is a decision: add it here, and type it MULTI_LINE.
MULTI_LINE_FIELDS = {"notes", "diagnosis", "reason", "instructions"}
# Refused in every text.
NEVER = ["\x00", "Eve\x00Mallory", "\x01", "a\x08b", "\x0b", "\x0c", "\x1b[2J", "a\x1fb", "\x7f",
         "\x80", "a\x85b", "\x9b31m", "\x9f"]
LONE_SURROGATES = ["\ud800", "a\udfffb"]  # JSON can carry them ("\ud800"); URLs cannot
# Refused in single-line text only.
BREAKS = ["a\nb", "a\rb", "a\r\nb", "a\tb", "a\u2028b", "a\u2029b", "trailing\n\nstuff"]
MULTI_LINE_TEXT = "First line of the note\nSecond line\r\n\tindented third line"


# The places a request can carry text, from the OpenAPI document.

@dataclass(frozen=True)
class Place:
    method: str
    path: str
    where: str                      # "body", "query" or "path"
    keys: tuple[str | int, ...]     # inside the body; (name,) for a parameter

    @property
    def multi_line(self) -> bool:
        names = [k for k in self.keys if isinstance(k, str)]
        return self.where == "body" and names[-1] in MULTI_LINE_FIELDS

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.where}.{'.'.join(map(str, self.keys))}"


def resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def accepts_text(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if kind == "string" or (isinstance(kind, list) and "string" in kind):
        return True
    if any(isinstance(v, str) for v in schema.get("enum", [])):
        return True
    structural = {"type", "anyOf", "oneOf", "allOf", "properties", "items", "enum", "const"}
    return not structural & schema.keys()  # no type at all: anything, text included


def text_leaves(schema: dict[str, Any], spec: dict[str, Any],
                keys: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Every place inside a body schema that accepts a string."""
    schema = resolve(schema, spec)
    if keys and accepts_text(schema):
        yield keys
    for branch in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(branch, []):
            yield from text_leaves(sub, spec, keys)
    for name, sub in schema.get("properties", {}).items():
        yield from text_leaves(sub, spec, (*keys, name))
    if isinstance(schema.get("items"), dict):
        yield from text_leaves(schema["items"], spec, (*keys, 0))
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        yield from text_leaves(extra, spec, (*keys, "key"))


def places(spec: dict[str, Any]) -> list[Place]:
    found: list[Place] = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] in ("path", "query"):
                    # Every parameter arrives as text, whatever its schema says.
                    found.append(Place(method.upper(), path, parameter["in"],
                                       (parameter["name"],)))
            body = operation.get("requestBody", {}).get("content", {})
            if "application/json" in body:
                leaves = dict.fromkeys(text_leaves(body["application/json"]["schema"], spec))
                found += [Place(method.upper(), path, "body", keys) for keys in leaves]
    return found


# Requests.

def body_with(keys: tuple[str | int, ...], value: str) -> Any:
    if not keys:
        return value
    head, rest = keys[0], keys[1:]
    return [body_with(rest, value)] if isinstance(head, int) else {head: body_with(rest, value)}


async def send(client: httpx.AsyncClient, place: Place, value: str,
               headers: dict[str, str]) -> httpx.Response:
    path_values = {name: str(uuid.uuid4()) for name in re.findall(r"\{(\w+)\}", place.path)}
    params: dict[str, str] = {}
    content = None
    if place.where == "path":
        path_values[str(place.keys[0])] = quote(value, safe="")
    elif place.where == "query":
        params[str(place.keys[0])] = value
    else:
        # Encoded by hand: json.dumps escapes controls and lone surrogates as \uXXXX, as any
        # client may.
        content = json.dumps(body_with(place.keys, value)).encode()
    url = re.sub(r"\{(\w+)\}", lambda m: path_values[m.group(1)], place.path)
    has_body = place.where == "body" or place.method in ("POST", "PUT", "PATCH")
    return await client.request(
        place.method, url, params=params,
        content=content if content is not None else (b"{}" if has_body else None),
        headers={**headers, "Content-Type": "application/json"} if has_body else headers)


def problems_at(response: httpx.Response, place: Place) -> list[str]:
    """The problems the 422 names at `place` (list indices and a union's member name aside)."""
    wanted = [place.where, *(k for k in place.keys if isinstance(k, str))]
    named = []
    for problem in response.json().get("fields", []):
        parts = [p for p in problem["field"].split(".") if not p.isdigit()]
        here = parts == wanted or (len(parts) == len(wanted) + 1 and parts[0] == wanted[0]
                                   and parts[2:] == wanted[1:])
        if here and problem["problem"] not in ("Field required",
                                               "is not a field of this request"):
            named.append(problem["problem"])
    return named


def assert_refused_quietly(response: httpx.Response, place: Place, value: str) -> None:
    assert response.status_code == 422, (str(place), repr(value), response.status_code,
                                         response.text[:300])
    assert response.json()["error"] == "validation_error", (str(place), response.text[:300])
    assert problems_at(response, place), (str(place), repr(value), response.text[:500])
    # Never echoed: not the value, not any control character, not an escape of one.
    assert response.text.isascii() and response.text.isprintable(), str(place)
    assert "\\u" not in response.text and value not in response.text, str(place)


@pytest.fixture
async def callers(runtime: Runtime) -> dict[str, dict[str, str]]:
    return {role: (await signed_in(runtime, role)).headers for role in ROLES}


async def past_access_rule(client: httpx.AsyncClient, place: Place,
                           callers: dict[str, dict[str, str]]) -> list[dict[str, str]]:
    """Headers of the callers whom the route lets past its access rule (to its validation)."""
    past = []
    for headers in callers.values():
        response = await send(client, place, "\x00", headers)
        if response.status_code not in (401, 403):
            past.append(headers)
    assert past, f"no role gets past the access rule of {place}"
    return past


async def whose_field(client: httpx.AsyncClient, place: Place,
                      past: list[dict[str, str]]) -> dict[str, str]:
    """Of those callers, one whose request model holds the field: `POST /consultations`
    checks a patient's body against the patient's model only, where `patient_id` is no field
    (a doctor's is)."""
    for headers in past:
        if problems_at(await send(client, place, "\x00", headers), place):
            return headers
    return past[0]


async def test_every_text_the_api_takes_refuses_control_characters(
        client: httpx.AsyncClient, runtime: Runtime,
        callers: dict[str, dict[str, str]]) -> None:
    spec = create_app(runtime=runtime).openapi()
    found = places(spec)
    # The walk reaches what it must: a sample of the places the review named or implied.
    names = {str(p) for p in found}
    for expected in ("POST /api/v1/users body.full_name", "PATCH /api/v1/me body.full_name",
                     "POST /api/v1/auth/register body.address",
                     "POST /api/v1/patients/{patient_id}/records body.prescriptions.0",
                     "POST /api/v1/consultations body.reason",
                     "GET /api/v1/audit query.resource_type",
                     "GET /api/v1/records/{record_id} path.record_id",
                     "GET /api/v1/me/export query.format"):
        assert expected in names, expected
    assert len(found) >= 60
    who: dict[tuple[str, str], list[dict[str, str]]] = {}
    for place in found:
        route = (place.method, place.path)
        if route not in who:
            who[route] = await past_access_rule(client, place, callers)
        caller = await whose_field(client, place, who[route]) if len(who[route]) > 1 \
            else who[route][0]
        values = NEVER + (LONE_SURROGATES if place.where == "body" else [])
        if not place.multi_line:
            values = values + BREAKS
        for value in values:
            assert_refused_quietly(await send(client, place, value, caller), place, value)
        if place.multi_line:
            # Line breaks and tabs in free text are not what is wrong with this request.
            response = await send(client, place, MULTI_LINE_TEXT, caller)
            assert problems_at(response, place) == [], (str(place), response.text[:500])


# Bodies that arrive as a JSON object and are validated in the route by the model of the
# caller's role (so that a 422 names that role's fields only): the models it uses.
ROLE_VALIDATED_BODIES = {"/api/v1/consultations": (PatientBooking, DoctorProposal)}


def test_every_request_body_model_is_a_request_model(runtime: Runtime) -> None:
    """`RequestModel` checks every string of a body whatever its field's type: a body model
    that is not one would miss that."""
    app = create_app(runtime=runtime)
    models = []
    for route in app_routes(app):
        stack = [route.dependant] if route.dependant is not None else []
        while stack:
            dependant = stack.pop()
            stack.extend(dependant.dependencies)
            for parameter in dependant.body_params:
                annotation = parameter.field_info.annotation
                if route.path in ROLE_VALIDATED_BODIES:
                    assert annotation == dict[str, Any], route.path
                    models += [(route.path, m) for m in ROLE_VALIDATED_BODIES[route.path]]
                    continue
                members = getattr(annotation, "__args__", None) or (annotation,)
                models += [(route.path, m) for m in members if m is not type(None)]
    assert len(models) >= 20
    for path, model in models:
        assert isinstance(model, type) and issubclass(model, RequestModel), (path, model)


class _Loose(RequestModel):
    """A model someone adds later, with plain `str` fields."""

    text: str
    lines: list[str] = []
    by_key: dict[str, str] = {}


@pytest.mark.parametrize("body", [
    {"text": "\x00"}, {"text": "ok", "lines": ["fine", "b\x1bad"]},
    {"text": "ok", "by_key": {"k": "\x85"}}, {"text": "ok", "by_key": {"\x00": "v"}},
])
def test_a_plain_str_field_of_a_request_model_refuses_controls(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="must not contain control characters"):
        _Loose.model_validate(body)
    assert _Loose.model_validate({"text": "a\nb\tc"}).text == "a\nb\tc"


# The rule itself, over every character of the Basic Multilingual Plane.

OneLine = TypeAdapter(Annotated[str, SINGLE_LINE])
ManyLines = TypeAdapter(Annotated[str, MULTI_LINE])


def refused(adapter: TypeAdapter[str], text: str) -> bool:
    try:
        adapter.validate_python(text)
    except ValidationError:
        return True
    return False


def test_exactly_the_controls_are_refused() -> None:
    controls = {*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), *range(0xD800, 0xE000)}
    keeps_lines = {0x09, 0x0A, 0x0D}
    breaks = keeps_lines | {0x2028, 0x2029}
    for code in range(0x10000):
        text = f"a{chr(code)}b"
        assert refused(ManyLines, text) == (code in controls - keeps_lines), hex(code)
        assert refused(OneLine, text) == (code in controls | breaks), hex(code)
    # Beyond the BMP: emoji and other astral characters are text like any other.
    assert not refused(OneLine, "Zoë 👩‍⚕️ 𝔄")


# The finding itself, end to end, on each backend.

async def test_a_nul_in_a_staff_name_is_a_422_not_a_database_error(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    admin = await signed_in(runtime, "admin")
    email = new_email("staff")
    response = await client.post(f"{API}/users", headers=admin.headers, json={
        "email": email, "full_name": "Eve\x00Mallory", "role": "doctor"})
    body = expect(response, 422, "validation_error")
    assert body["fields"] == [{"field": "body.full_name",
                               "problem": "Value error, must not contain control characters"}]
    assert "Mallory" not in response.text
    # Nothing was created: the same email is still free.
    expect(await client.post(f"{API}/users", headers=admin.headers, json={
        "email": email, "full_name": "Eve Mallory", "role": "doctor"}), 201)


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("full_name", "Eve\x00", "must not contain control characters"),
    ("full_name", "Eve\nMallory", "must be a single line (no tab or line break)"),
    ("address", "1 Main St\x00", "must not contain control characters"),
    ("address", "1 Main St\u2028Springfield", "must be a single line (no tab or line break)"),
])
async def test_a_patient_cannot_store_controls_in_the_profile(
        client: httpx.AsyncClient, runtime: Runtime, field: str, value: str,
        problem: str) -> None:
    patient = await signed_in(runtime, "patient")
    response = await client.patch(f"{API}/me", headers=patient.headers, json={field: value})
    body = expect(response, 422, "validation_error")
    assert body["fields"] == [{"field": f"body.{field}", "problem": f"Value error, {problem}"}]
    registered = await client.post(f"{API}/auth/register", json={
        "email": new_email(), "password": "a long enough passphrase 9", "full_name": "Zoë Q",
        field: value})
    assert expect(registered, 422, "validation_error")["fields"] == body["fields"]


async def test_multi_line_notes_keep_their_line_breaks(client: httpx.AsyncClient,
                                                       runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    await set_consent(client, patient, True)
    reason = "Cough for three weeks.\nWorse at night."
    consultation = await book(client, patient, doctor, reason=reason)
    assert consultation["reason"] == reason
    record = expect(await client.post(f"{API}/patients/{patient.id}/records",
                                      headers=doctor.headers, json={
        "diagnosis": "Acute bronchitis\n(viral)", "prescriptions": ["Rest"],
        "notes": MULTI_LINE_TEXT}), 201)
    read = expect(await client.get(f"{API}/records/{record['id']}", headers=patient.headers),
                  200)
    assert (read["diagnosis"], read["notes"]) == ("Acute bronchitis\n(viral)", MULTI_LINE_TEXT)
    # A prescription line, like any single-line field, may not hold a line break.
    expect(await client.post(f"{API}/patients/{patient.id}/records", headers=doctor.headers,
                             json={"diagnosis": "x", "prescriptions": ["Rest\nthen run"]}),
           422, "validation_error")
    # Nor may any text hold NUL, multi-line or not.
    for field in ("diagnosis", "notes"):
        expect(await client.post(f"{API}/patients/{patient.id}/records",
                                 headers=doctor.headers,
                                 json={"diagnosis": "x", "prescriptions": [],
                                       field: "one\x00two"}), 422, "validation_error")


async def test_the_caller_of_a_refused_request_is_unharmed(client: httpx.AsyncClient,
                                                           runtime: Runtime) -> None:
    """The refusal is an ordinary 422: the session still works afterwards."""
    patient: TestUser = await signed_in(runtime, "patient")
    expect(await client.patch(f"{API}/me", headers=patient.headers,
                              json={"full_name": "\x00"}), 422)
    assert expect(await client.get(f"{API}/me", headers=patient.headers), 200)["id"] == \
        str(patient.id)
