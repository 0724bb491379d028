"""What the hostile-input tests share: the request bodies of the app's OpenAPI document and a
valid example of each, hostile payloads, and a look at every row of the database.

The bodies come from the document, so a route added later is attacked without a line here: each
JSON body (each member of a `oneOf`, where the caller's role picks the model) is a `Variant`,
with every place inside it that takes a string (`$ref`s, `anyOf`, arrays and nested objects
followed), and `example` builds a body the schema accepts, so that a hostile value in one place
is the only thing wrong with a request.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import func, select

from phivault.db.metadata import target_metadata
from phivault.runtime import Runtime
from tests.factories import new_email

Keys = tuple[str | int, ...]

# Valid strings for the patterns of the document; a new pattern needs a candidate here.
FUTURE = "2031-05-04T10:00:00+00:00"
PLAIN_TEXT = "Plain valid text for this field"


def pattern_candidates() -> list[str]:
    return ["123456", "EUR", secrets.token_urlsafe(24), new_email("hostile"),
            "+44 20 7946 0000", "ref-42.a:b_c"]


@dataclass(frozen=True)
class StringField:
    keys: Keys
    schema: dict[str, Any]

    @property
    def max_length(self) -> int:
        # RequestModel bounds every string at 10,000 characters where the field says less.
        return int(self.schema.get("maxLength", 10_000))

    @property
    def json_types(self) -> set[str]:
        kinds: set[str] = set()
        for option in [self.schema, *self.schema.get("anyOf", []), *self.schema.get("oneOf", [])]:
            kind = option.get("type")
            kinds.update([kind] if isinstance(kind, str) else kind or [])
        return kinds

    def __str__(self) -> str:
        return ".".join(map(str, self.keys))


@dataclass
class Variant:
    """One JSON body a route takes: the route, the body's schema, and its string places."""

    method: str
    path: str
    schema: dict[str, Any]
    fields: list[StringField] = field(default_factory=list)
    name: str = ""

    def __str__(self) -> str:
        return f"{self.method} {self.path}{f' ({self.name})' if self.name else ''}"


def resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _not_null(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The schema without its `null` option (`X | None` is `anyOf: [X, null]`)."""
    schema = resolve(schema, spec)
    options = [o for o in schema.get("anyOf", []) if resolve(o, spec).get("type") != "null"]
    return resolve(options[0], spec) if len(options) == 1 else schema


def string_fields(schema: dict[str, Any], spec: dict[str, Any],
                  keys: Keys = ()) -> Iterator[StringField]:
    """Every place inside a body schema that takes a string, with its schema."""
    schema = _not_null(schema, spec)
    kind = schema.get("type")
    if keys and (kind == "string" or (isinstance(kind, list) and "string" in kind)):
        yield StringField(keys, schema)
    for name, sub in schema.get("properties", {}).items():
        yield from string_fields(sub, spec, (*keys, name))
    if isinstance(schema.get("items"), dict):
        yield from string_fields(schema["items"], spec, (*keys, 0))


def variants(spec: dict[str, Any]) -> list[Variant]:
    found = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" not in content:
                continue
            body = resolve(content["application/json"]["schema"], spec)
            members = body.get("oneOf") or [body]
            for member in members:
                schema = resolve(member, spec)
                found.append(Variant(method.upper(), path, schema,
                                     list(string_fields(schema, spec)),
                                     schema.get("title", "") if len(members) > 1 else ""))
    return found


def example(schema: dict[str, Any], spec: dict[str, Any]) -> Any:
    """A value the schema accepts: every property of an object, one item of an array."""
    schema = _not_null(schema, spec)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        return {name: example(sub, spec) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [example(schema["items"], spec)]
    if kind == "boolean":
        return False
    if kind == "integer":
        return max(int(schema.get("minimum", 1)), 1)
    if kind == "number":
        return max(float(schema.get("minimum", 1)), 1.0)
    assert kind == "string", f"no example for {schema}"
    return _example_string(schema)


def _example_string(schema: dict[str, Any]) -> str:
    kind = schema.get("format")
    if kind == "uuid":
        return str(uuid.uuid4())
    if kind == "date-time":
        return FUTURE
    if kind == "date":
        return "1980-02-03"
    low, high = int(schema.get("minLength", 0)), int(schema.get("maxLength", 10_000))
    if "pattern" in schema:
        fits = [c for c in pattern_candidates()
                if re.search(schema["pattern"], c) and low <= len(c) <= high]
        assert fits, f"no example matches the pattern {schema['pattern']!r}: add one"
        return fits[0]
    return (PLAIN_TEXT + "." * low)[:max(low, min(high, len(PLAIN_TEXT)))]


def put(body: Any, keys: Keys, value: Any) -> Any:
    """A copy of `body` with `value` at `keys`."""
    body = copy.deepcopy(body)
    place = body
    for key in keys[:-1]:
        place = place[key]
    place[keys[-1]] = value
    return body


def with_raw(body: Any, keys: Keys, raw: bytes) -> bytes:
    """`body` as JSON bytes, with the bytes `raw` (JSON text, perhaps not even UTF-8) at
    `keys`."""
    hole = f"hole-{secrets.token_hex(8)}"
    text = json.dumps(put(body, keys, hole)).encode()
    assert text.count(f'"{hole}"'.encode()) == 1
    return text.replace(f'"{hole}"'.encode(), raw)


def path_of(template: str) -> str:
    """The path with a new UUID for each of its parameters."""
    return re.sub(r"\{(\w+)\}", lambda _: str(uuid.uuid4()), template)


# Checking an answer.

TRACEBACK_SIGNS = ("Traceback", 'File "', "sqlalchemy", "asyncpg", "aiosqlite", "pydantic_core")


def assert_refused(response: httpx.Response, statuses: set[int] | range, what: str,
                   needles: tuple[str, ...] = ()) -> dict[str, Any]:
    """A 4xx in `statuses`, as the API's JSON error body, quoting none of `needles` (nor
    any traceback)."""
    assert response.status_code in statuses, (what, response.status_code, response.text[:300])
    assert 400 <= response.status_code < 500, (what, response.status_code)
    assert response.headers.get("content-type", "").startswith("application/json"), what
    body = response.json()
    assert isinstance(body.get("error"), str) and isinstance(body.get("detail"), str), \
        (what, response.text[:300])
    assert response.headers.get("x-request-id"), what
    text = response.text
    assert not any(sign in text for sign in TRACEBACK_SIGNS), (what, text[:300])
    for needle in needles:
        assert needle not in text, (what, "echoed", text[:300])
    return dict(body)


def problem_fields(response: httpx.Response) -> set[str]:
    """The places a 422 names, as dotted paths without `body.` and list indices."""
    named = set()
    for problem in response.json().get("fields") or []:
        parts = [p for p in problem["field"].split(".") if not p.isdigit()]
        named.add(".".join(parts[1:]) if parts[:1] == ["body"] else ".".join(parts))
    return named


def dotted(keys: Keys) -> str:
    return ".".join(str(k) for k in keys if isinstance(k, str))


# The database, row by row.

async def table_counts(rt: Runtime) -> dict[str, int]:
    counts = {}
    async with rt.sessions() as session:
        for name, table in target_metadata.tables.items():
            counts[name] = int((await session.execute(
                select(func.count()).select_from(table))).scalar_one())
    return counts


async def rows_holding(rt: Runtime, needles: list[str], *,
                       skip: tuple[str, ...] = ()) -> list[str]:
    """`table.column` of every stored value that holds one of `needles` (text, JSON or bytes,
    ciphertext included: a PHI value must never be there in clear)."""
    wanted = [n.encode() for n in needles]
    found = []
    async with rt.sessions() as session:
        for name, table in target_metadata.tables.items():
            columns = [c for c in table.columns if f"{name}.{c.name}" not in skip]
            for row in (await session.execute(select(*columns))).all():
                for column, value in zip(columns, row, strict=True):
                    if value is None:
                        continue
                    raw = value if isinstance(value, bytes) else value.encode() \
                        if isinstance(value, str) else \
                        json.dumps(value, ensure_ascii=False, default=str).encode()
                    if any(n in raw for n in wanted):
                        found.append(f"{name}.{column.name}")
    return found
