"""Hostile request bodies (issue 11, item 2): every JSON body of the OpenAPI document, and every
string inside it, attacked with over-long, mistyped, malformed, badly encoded, deeply nested and
oversized input. Each answer is a 4xx with the JSON error body, never a 5xx, a traceback or an
echo of the input; nothing is stored; the value never reaches the database or the log.

Every string place gets the cheap payloads; the heavy ones (1 MiB, 10,000 levels) run once per
body. A refusal that must be a validation error names the attacked place and no other, which
proves that the rest of the body was valid: the attack is the only thing refused.

Four kinds were accepted before the request guard read JSON bodies itself (web/middleware.py):
a name twice in one object (the last won: a proxy that checks the first one is fooled), UTF-16
and UTF-32 (taken by Python's detection of the encoding), `1e999` (infinity, as a number), and a
body of 90,000 unknown names (a second of the event loop and a 6 MB answer for one request).
"""

from __future__ import annotations

import io
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from phivault.runtime import Runtime
from phivault.web.app import create_app
from phivault.web.middleware import (
    JSON_MAX_CONTAINERS,
    JSON_MAX_DEPTH,
    JSON_MAX_MEMBERS,
    MAX_BODY,
)
from tests.factories import signed_in
from tests.security.hostile import (
    StringField,
    Variant,
    assert_refused,
    dotted,
    example,
    path_of,
    problem_fields,
    put,
    rows_holding,
    table_counts,
    variants,
    with_raw,
)

ROLES = (None, "patient", "doctor", "admin", "auditor")
JSON_TYPE = {"content-type": "application/json"}
MALFORMED = {400}
INVALID = {422}


@dataclass(frozen=True)
class Case:
    """One hostile request body: JSON bytes, the statuses it may get, and, for a 422, the
    place the answer must name (alone)."""

    name: str
    content: bytes
    statuses: set[int]
    names: str | None = None
    content_type: str = "application/json"


def field_cases(body: Any, place: StringField, mark: str) -> list[Case]:
    """The cheap payloads, for every string place."""
    at = dotted(place.keys)

    def value(name: str, hostile: Any) -> Case:
        return Case(f"{place} {name}", json.dumps(put(body, place.keys, hostile)).encode(),
                    INVALID, at)

    def raw(name: str, hostile: bytes) -> Case:
        return Case(f"{place} {name}", with_raw(body, place.keys, hostile), MALFORMED)

    cases = [value("over maxLength", mark + "x" * (place.max_length + 1 - len(mark)))]
    wrong = {"integer": 12345, "number": 1.5, "boolean": True, "array": [mark],
             "object": {"k": mark}}
    cases += [value(f"as {kind}", hostile) for kind, hostile in wrong.items()
              if kind not in place.json_types and not (kind == "number"
                                                       and "integer" in place.json_types)]
    # Escaped as JSON allows (json.dumps writes \u0000, \u001b, \ud800).
    cases += [value("NUL", f"{mark}\x00"), value("ESC", f"{mark}\x1b[2J"),
              value("lone surrogate", f"{mark}\ud800")]
    marked = mark.encode()
    cases += [raw("bad continuation byte", b'"' + marked + b'\xc3\x28"'),
              raw("overlong slash", b'"' + marked + b'\xc0\xaf"'),
              raw("encoded surrogate", b'"' + marked + b'\xed\xa0\x80"'),
              raw("truncated sequence", b'"' + marked + b'\xe2\x82"'),
              raw("latin-1 byte", b'"' + marked + b'\xe9"'),
              raw("raw control byte", b'"' + marked + b'\x01"'),
              raw("raw NUL byte", b'"' + marked + b'\x00"')]
    return cases


def body_cases(variant: Variant, body: Any, mark: str) -> list[Case]:
    """The heavy payloads and the malformed bodies, once for each body."""
    valid = json.dumps(body).encode()
    first = variant.fields[0].keys if variant.fields else (next(iter(body)),)

    def at_first(name: str, raw: bytes, statuses: set[int] = MALFORMED) -> Case:
        return Case(f"{name} at {dotted(first)}", with_raw(body, first, raw), statuses)

    deep = 10_000
    members = {f"{mark}{i}": i for i in range(2 * JSON_MAX_MEMBERS)}
    text = valid.decode()
    return [
        at_first("1 MiB value", b'"' + mark.encode() + b"x" * MAX_BODY + b'"', {413}),
        at_first("10,000 levels", b"[" * deep + b"]" * deep),
        at_first(f"{JSON_MAX_DEPTH + 8} levels",
                 b"[" * (JSON_MAX_DEPTH + 8) + b"]" * (JSON_MAX_DEPTH + 8)),
        at_first(f"{JSON_MAX_CONTAINERS} arrays",
                 b"[" + b",".join([b"[]"] * JSON_MAX_CONTAINERS) + b"]"),
        Case("10,000 unclosed levels", b"[" * deep, MALFORMED),
        Case("10,000 levels of objects", b'{"a":' * deep + b"1" + b"}" * deep, MALFORMED),
        Case("truncated", valid[:len(valid) // 2], MALFORMED),
        Case("trailing garbage", valid + b' {"' + mark.encode() + b'": 1}', MALFORMED),
        Case("two documents", valid + valid, MALFORMED),
        at_first("NaN", b"NaN"), at_first("Infinity", b"Infinity"),
        at_first("-Infinity", b"-Infinity"), at_first("1e999", b"1e999"),
        at_first("a 5,000-digit number", b"9" * 5000),
        Case("a name twice, the last one valid",
             ('{"' + str(first[0]) + '": "' + mark + '", ' + text[1:]).encode(), MALFORMED),
        Case("UTF-16", text.encode("utf-16-le"), MALFORMED),
        Case("UTF-16 with BOM", text.encode("utf-16"), MALFORMED),
        Case("UTF-32", text.encode("utf-32"), MALFORMED),
        Case("UTF-8 BOM", b"\xef\xbb\xbf" + valid, MALFORMED),
        Case(f"{2 * JSON_MAX_MEMBERS} unknown names", json.dumps({**body, **members}).encode(),
             MALFORMED),
        Case("an unknown name", json.dumps({**body, f"{mark} HIV+": 1}).encode(), INVALID,
             "(unknown field)"),
        Case("empty", b"", INVALID),
        Case("null", b"null", INVALID), Case("array", b"[]", INVALID),
        Case("string", json.dumps(mark).encode(), INVALID), Case("number", b"1", INVALID),
        Case("a string of brackets", json.dumps("[{" * JSON_MAX_DEPTH).encode(), INVALID),
        Case("form encoding", b"a=" + mark.encode(), MALFORMED),
        Case("JSON as text/plain", valid, {415, 422}, content_type="text/plain"),
        Case("JSON as no type", valid, {415, 422}, content_type=""),
    ]


async def caller_for(client: httpx.AsyncClient, variant: Variant, body: Any,
                     headers: dict[str | None, dict[str, str]], mark: str) -> dict[str, str]:
    """The caller (None: nobody) whom the route lets through to its validation: a 422 that
    names the probed place alone."""
    if variant.fields:
        probe = field_cases(body, variant.fields[0], mark)[0]
    else:
        probe = next(c for c in body_cases(variant, body, mark) if c.name == "an unknown name")
    assert probe.names is not None
    for role in ROLES:
        response = await client.request(variant.method, path_of(variant.path),
                                        content=probe.content,
                                        headers={**headers[role], **JSON_TYPE})
        if response.status_code == 422 and problem_fields(response) == {probe.names}:
            return headers[role]
    raise AssertionError(f"no caller reaches the validation of {variant}")


@pytest.fixture
async def headers(runtime: Runtime) -> dict[str | None, dict[str, str]]:
    found: dict[str | None, dict[str, str]] = {None: {}}
    for role in ROLES[1:]:
        found[role] = (await signed_in(runtime, role)).headers
    return found


async def test_every_json_body_refuses_hostile_input(
        client: httpx.AsyncClient, runtime: Runtime,
        headers: dict[str | None, dict[str, str]], captured_logs: io.StringIO,
        record_property: Callable[[str, object], None]) -> None:
    spec = create_app(runtime=runtime).openapi()
    found = variants(spec)
    # The walk reaches what it must: a sample of the bodies and places it has to find.
    names = {f"{v.method} {v.path} {f}" for v in found for f in v.fields}
    for expected in ("POST /api/v1/auth/register email", "PATCH /api/v1/me address",
                     "POST /api/v1/patients/{patient_id}/records prescriptions.0",
                     "POST /api/v1/consultations reason", "POST /api/v1/users full_name",
                     "POST /api/v1/consultations/{consultation_id}/payments currency",
                     "POST /api/v1/patients/{patient_id}/break-glass reason"):
        assert expected in names, expected
    assert len(found) >= 18 and sum(len(v.fields) for v in found) >= 40
    mark = f"HX{secrets.token_hex(6)}"
    # Finding each body's caller may write denials to the audit trail; the count starts after.
    bodies = [example(v.schema, spec) for v in found]
    callers = [await caller_for(client, v, b, headers, mark) for v, b in zip(found, bodies,
                                                                            strict=True)]
    before = await table_counts(runtime)
    cases = 0
    started = time.monotonic()
    for variant, body, who in zip(found, bodies, callers, strict=True):
        planned = [case for place in variant.fields for case in field_cases(body, place, mark)]
        planned += body_cases(variant, body, mark)
        for case in planned:
            kind = {"content-type": case.content_type} if case.content_type else {}
            response = await client.request(variant.method, path_of(variant.path),
                                            content=case.content, headers={**who, **kind})
            what = f"{variant}: {case.name}"
            answer = assert_refused(response, case.statuses, what, needles=(mark,))
            if response.status_code == 400:
                assert answer["error"] == "malformed_json", (what, answer)
            if case.names is not None:
                assert problem_fields(response) == {case.names}, (what, response.text[:400])
            cases += 1
    elapsed = time.monotonic() - started
    print(f"\nhostile bodies: {cases} cases over {len(found)} bodies and "
          f"{sum(len(v.fields) for v in found)} string places in {elapsed:.1f} s")
    record_property("hostile_body_cases", cases)
    assert cases >= 1000

    # Nothing was stored, and the hostile values are nowhere: not in any row (audit metadata
    # included), not in the log.
    assert await table_counts(runtime) == before
    assert await rows_holding(runtime, [mark]) == []
    assert mark not in captured_logs.getvalue()


async def test_a_refused_body_costs_little_and_says_little(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    """A megabyte of unknown names was a second of the event loop and a 6 MB answer listing
    each one; now it is refused before validation, in milliseconds, in a few bytes."""
    patient = await signed_in(runtime, "patient")
    body = b"{" + b",".join(b'"k%d":1' % i for i in range(90_000)) + b"}"
    assert len(body) < MAX_BODY
    started = time.monotonic()
    response = await client.patch("/api/v1/me", content=body,
                                  headers={**patient.headers, **JSON_TYPE})
    elapsed = time.monotonic() - started
    assert_refused(response, MALFORMED, "90,000 names")
    assert response.json() == {"error": "malformed_json", "detail": (
        f"The request body has an object of more than {JSON_MAX_MEMBERS} members.")}
    assert elapsed < 0.5 and len(response.content) < 200


@pytest.mark.parametrize(("content", "detail"), [
    (b'{"full_name": "Eve Mallory", "full_name": "Zoe Q"}',
     "The request body repeats a name within one object."),
    ('{"full_name": "Zoe Q"}'.encode("utf-16"),
     "The request body is not UTF-8 JSON (without a byte order mark)."),
    (b'{"full_name": 1e999}',
     "The request body holds NaN or Infinity, which are not JSON numbers."),
    (b'{"full_name": ' + b"[" * 40 + b"]" * 40 + b"}",
     f"The request body nests deeper than {JSON_MAX_DEPTH} levels."),
    (b'{"full_name": [' + b",".join([b"{}"] * 5000) + b"]}",
     f"The request body holds more than {JSON_MAX_CONTAINERS} objects and arrays."),
], ids=["a name twice", "UTF-16", "1e999", "40 levels", "5,000 objects"])
async def test_json_that_parsers_read_differently_is_refused_and_changes_nothing(
        client: httpx.AsyncClient, runtime: Runtime, content: bytes, detail: str) -> None:
    """I-JSON (RFC 7493): the body a proxy, a WAF or a client library reads is the body the
    API reads. The first two were accepted (the profile renamed), the third was a 422."""
    patient = await signed_in(runtime, "patient", full_name="Original Name")
    response = await client.patch("/api/v1/me", content=content,
                                  headers={**patient.headers, **JSON_TYPE})
    assert_refused(response, MALFORMED, detail)
    assert response.json() == {"error": "malformed_json", "detail": detail}
    me = await client.get("/api/v1/me", headers=patient.headers)
    assert me.json()["full_name"] == "Original Name"


async def test_a_json_body_is_never_held_past_1_mib(client: httpx.AsyncClient,
                                                    runtime: Runtime) -> None:
    """JSON is read whole before the app sees it: on the upload route, whose streamed files
    may reach 25 MiB, a JSON body still stops at 1 MiB (it would have been held in memory)."""
    patient = await signed_in(runtime, "patient")
    path = f"/api/v1/patients/{patient.id}/attachments"
    body = json.dumps({"file": "x" * (2 * MAX_BODY)}).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    for content in (body, pieces()):
        response = await client.post(path, content=content,
                                     headers={**patient.headers, **JSON_TYPE})
        assert_refused(response, {413}, "2 MiB of JSON to the upload route")
        assert response.headers["connection"] == "close"


@pytest.mark.parametrize("shape", [b'\\"', b'"\\', b'\\\\"', b'"a'],
                         ids=["escaped quotes", "quote backslash", "escapes", "many strings"])
async def test_a_body_of_quotes_and_escapes_is_refused_in_linear_time(
        client: httpx.AsyncClient, runtime: Runtime, shape: bytes) -> None:
    """Found by the outside review: with more than 32 brackets, strings are blanked out before
    the brackets are counted, and the string pattern backtracked on an unterminated string of
    escaped quotes; each quote restarted a scan to the end, so 48 KiB took 7 s of the event
    loop (every other request waited), and 1 MiB would have taken about an hour. Anonymous:
    the check runs before authentication."""
    body = b"[" * 33 + b'"' + shape * (64 * 1024 // len(shape))  # 64 KiB: 13 s before
    started = time.monotonic()
    response = await client.post("/api/v1/auth/login", content=body, headers=JSON_TYPE)
    elapsed = time.monotonic() - started
    assert_refused(response, MALFORMED, "64 KiB of quotes")
    assert elapsed < 2, elapsed  # linear: about a millisecond of scanning


async def test_a_422_names_at_most_20_fields(client: httpx.AsyncClient,
                                             runtime: Runtime) -> None:
    """A body may hold up to 1,000 unknown names (the I-JSON bound): the answer names the first
    20 problems, not a thousand (a 422 is small whatever the body)."""
    patient = await signed_in(runtime, "patient")
    body = {f"unknown_{i}": 1 for i in range(900)}
    response = await client.patch("/api/v1/me", json=body, headers=patient.headers)
    assert response.status_code == 422
    assert len(response.json()["fields"]) == 20
    assert len(response.content) < 3000
