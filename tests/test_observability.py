"""Logs: JSON lines, the request id on each, secrets and PHI redacted by name and by shape."""

from __future__ import annotations

import io
import json
import logging

from phivault.observability import REDACTED, configure_logging, get_logger, redact_value


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_sensitive_fields_are_redacted_at_any_depth() -> None:
    stream = io.StringIO()
    configure_logging("debug", stream)
    log = get_logger("test")
    log.info("signup", email="jane@example.org", password="correct horse battery staple",
             body={"full_name": "Jane Roe", "diagnosis": "influenza",
                   "nested": [{"phone": "+33 6 12 34 56 78", "Authorization": "Bearer x"}]},
             user_id="0f2d1c1e-0000-4000-8000-000000000000")
    (line,) = _lines(stream)
    assert line["email"] == REDACTED and line["password"] == REDACTED
    body = line["body"]
    assert body == REDACTED  # "body" itself is a sensitive name
    assert line["user_id"] == "0f2d1c1e-0000-4000-8000-000000000000"
    text = stream.getvalue()
    for secret in ("jane@example.org", "correct horse", "Jane Roe", "influenza", "12 34 56"):
        assert secret not in text
    configure_logging("warning", io.StringIO())


def test_token_shapes_are_redacted_inside_strings() -> None:
    token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    assert token not in str(redact_value(f"header was Bearer {token} then"))
    assert token not in str(redact_value({"detail": f"got {token}"}))
    assert redact_value({"meta": {"diagnosis": "x", "count": 3}}) == {
        "meta": {"diagnosis": REDACTED, "count": 3}}


def test_standard_library_loggers_are_json_and_redacted() -> None:
    stream = io.StringIO()
    configure_logging("info", stream)
    logging.getLogger("uvicorn.error").info("started with Bearer abc.def.ghi")
    (line,) = _lines(stream)
    assert line["level"] == "info" and "abc.def.ghi" not in stream.getvalue()
    configure_logging("warning", io.StringIO())
