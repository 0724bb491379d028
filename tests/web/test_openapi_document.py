"""The OpenAPI document tells a client every answer it may meet (web/openapi.py).

The fuzzing test (tests/fuzz) holds the server to the document case by case; these hold the
document itself: every operation lists the answers any route may give, every error code is
named where its status is, paged lists document `X-Total-Count`, and the text rules' patterns
say exactly what the validators refuse.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phivault import errors
from phivault.runtime import Runtime
from phivault.schemas import MULTI_LINE_PATTERN, SINGLE_LINE_PATTERN, multi_line, single_line
from phivault.web.app import create_app
from phivault.web.errors import error_codes

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
# Text that often holds what the rules are about: controls and line breaks. (Lone surrogates,
# which the checks also refuse, cannot be written in a JSON Schema pattern: no Unicode regex
# has them; `st.characters()` draws them unless told not to, and found one in a CI run.)
TEXT = st.text(st.one_of(st.characters(max_codepoint=0xA0),
                         st.characters(min_codepoint=0x2020, max_codepoint=0x2030),
                         st.characters(exclude_categories=["Cs"])), max_size=12)


@pytest.fixture
def document(runtime: Runtime) -> dict[str, Any]:
    return create_app(runtime=runtime).openapi()


def operations(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{method.upper()} {path}", operation)
            for path, methods in document["paths"].items()
            for method, operation in methods.items()]


def test_every_operation_lists_the_answers_any_route_may_give(document: dict[str, Any]) -> None:
    assert len(operations(document)) >= 50
    for label, operation in operations(document):
        answers = operation["responses"]
        for status in ("400", "408", "413", "414", "431", "500"):
            assert answers[status]["content"]["application/json"]["schema"] == ERROR_REF, label
        for status, answer in answers.items():
            if status.startswith(("4", "5")):
                assert answer["content"]["application/json"]["schema"] == ERROR_REF, \
                    (label, status)
                assert answer["description"].startswith("`"), (label, status)  # its codes
        if "429" in answers:
            assert "Retry-After" in answers["429"]["headers"], label
        if "401" in answers:
            assert "WWW-Authenticate" in answers["401"]["headers"], label


def test_fastapis_validation_error_is_nowhere(document: dict[str, Any]) -> None:
    text = json.dumps(document)
    assert "HTTPValidationError" not in text and '"ValidationError"' not in text
    text.encode("ascii")  # plain ASCII: the text rules' patterns are escapes
    from schemathesis.core.jsonschema.patterns import is_valid_jsonschema_rs_regex

    # Patterns a JSON Schema validator reads (a Unicode regex), so that clients enforce them.
    for pattern in set(re.findall(r'"pattern": "((?:[^"\\]|\\.)*)"', text)):
        assert is_valid_jsonschema_rs_regex(json.loads(f'"{pattern}"')), pattern


def test_every_error_code_is_documented_with_its_status(document: dict[str, Any]) -> None:
    described: dict[str, set[str]] = {}
    for _, operation in operations(document):
        for status, answer in operation["responses"].items():
            described.setdefault(status, set()).update(
                re.findall(r"`([a-z_]+)`", answer["description"]))
    pending, classes = [errors.PhivaultError], []
    while pending:
        pending.extend(pending.pop().__subclasses__())
        classes.extend(pending)
    assert len(classes) >= 15
    for status, codes in error_codes().items():
        if status in (405,):  # answered to methods the document has no operation for
            continue
        assert set(codes) <= described[str(status)], (status, set(codes) - described[str(status)])
    chart = document["paths"]["/api/v1/records/{record_id}"]["get"]["responses"]["403"]
    assert "`no_consent`" in chart["description"]
    assert "`no_care_relationship`" in chart["description"]


def test_paged_lists_document_their_total(document: dict[str, Any]) -> None:
    paged = [(label, operation) for label, operation in operations(document)
             if {"limit", "offset"} <= {p["name"] for p in operation.get("parameters", [])}]
    assert len(paged) >= 10
    for label, operation in paged:
        success = next(a for s, a in operation["responses"].items() if s.startswith("2"))
        assert success["headers"]["X-Total-Count"]["schema"]["type"] == "integer", label


@given(TEXT)
def test_the_single_line_pattern_refuses_exactly_what_the_check_refuses(value: str) -> None:
    try:
        single_line(value)
        accepted = True
    except ValueError:
        accepted = False
    assert (re.fullmatch(SINGLE_LINE_PATTERN, value) is not None) is accepted


@given(TEXT)
def test_the_multi_line_pattern_refuses_exactly_what_the_check_refuses(value: str) -> None:
    try:
        multi_line(value)
        accepted = True
    except ValueError:
        accepted = False
    assert (re.fullmatch(MULTI_LINE_PATTERN, value) is not None) is accepted


def test_text_fields_carry_their_pattern(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["LoginRequest"]["properties"]["password"]["pattern"] == SINGLE_LINE_PATTERN
    notes = schemas["RecordCreate"]["properties"]["notes"]
    assert MULTI_LINE_PATTERN in json.dumps(notes).replace("\\\\", "\\")
