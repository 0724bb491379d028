"""Shared pieces of request and response models: strict, bounded, no unknown fields, no
control characters.

FastAPI validates bodies in Python mode, where a strict `date`, `datetime` or `UUID` field would
refuse the JSON string it arrives as; those fields relax strictness for strings in their one
exact textual form only, so `"yes"` is still no boolean, `"12"` no integer and `0` or
`"1700000000"` no date.

Text is refused (422) when it holds characters no field needs and some layer chokes on: NUL
(PostgreSQL refuses it in text: a 500), the other C0 and C1 controls and DEL (escape sequences
in terminals, logs and exports), and lone surrogates (they have no UTF-8: a 500 in the database
driver or the password hash). Multi-line free text (notes, diagnoses, reasons, instructions:
`MULTI_LINE`) keeps tab, line feed and carriage return; every other field (`SINGLE_LINE`:
names, emails, phones, addresses, references, passwords) refuses those and U+2028/U+2029 too,
since a line break in a name or an address forges lines wherever it is printed (a mail header,
a CSV row). `RequestModel` applies the multi-line rule to every string of every request body
whatever its declared type, so no model can miss it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from annotated_types import GroupedMetadata
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# Only ISO 8601 with an explicit offset: pydantic alone would also take a Unix timestamp
# ("1700000000") or a date, and a time without an offset is ambiguous.
_INSTANT = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|z|[+-]\d{2}:\d{2})$")
# Never in any text: C0 controls but tab, LF and CR; DEL and the C1 controls; lone surrogates.
# (Escapes, not characters: the controls are also the OpenAPI document's pattern below, which
# must stay plain ASCII. Lone surrogates are not in it: JSON Schema validators read patterns as
# Unicode regexes, in which no lone surrogate can be written.)
_REFUSED = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
_CONTROLS = re.compile(f"[{_REFUSED}\ud800-\udfff]")
# Never in single-line text, besides the above: tab and the line and paragraph breaks.
_LINE_BREAKS = r"\t\n\r\u2028\u2029"
_BREAKS = re.compile(f"[{_LINE_BREAKS}]")
CONTROL_PROBLEM = "must not contain control characters"
BREAK_PROBLEM = "must be a single line (no tab or line break)"


def multi_line(value: str) -> str:
    """The multi-line rule (a `ValueError` naming the problem, or the value unchanged)."""
    if _CONTROLS.search(value):
        raise ValueError(CONTROL_PROBLEM)
    return value


def single_line(value: str) -> str:
    """The single-line rule, for text outside request models too (an upload's file name)."""
    multi_line(value)
    if _BREAKS.search(value):
        raise ValueError(BREAK_PROBLEM)
    return value


# The same rules as JSON Schema patterns, for the OpenAPI document: clients (and the fuzzer)
# learn which characters a field refuses.
MULTI_LINE_PATTERN = f"^[^{_REFUSED}]*$"
SINGLE_LINE_PATTERN = f"^[^{_REFUSED}{_LINE_BREAKS}]*$"
_EMAIL_PART = rf"[^@\s{_REFUSED}{_LINE_BREAKS}]+"


@dataclass(frozen=True)
class _TextRule(GroupedMetadata):
    """A text rule as one annotation: its check, and its pattern in the JSON schema (which
    only documents it: pydantic runs the check, never the pattern)."""

    check: Callable[[str], str]
    pattern: str

    def __iter__(self) -> Iterator[Any]:
        yield AfterValidator(self.check)
        yield Field(json_schema_extra={"pattern": self.pattern})


# Annotations for string types: `Annotated[str, StringConstraints(...), SINGLE_LINE]`. They come
# last, so that they see the value after any stripping.
SINGLE_LINE = _TextRule(single_line, SINGLE_LINE_PATTERN)
MULTI_LINE = _TextRule(multi_line, MULTI_LINE_PATTERN)


def _refuse_controls(value: object) -> None:
    """The multi-line rule on every string inside `value` (lists, dicts and their keys)."""
    if isinstance(value, str):
        multi_line(value)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            _refuse_controls(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_controls(key)
            _refuse_controls(item)


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are a 422, no type coercion, and no control
    characters in any string, whatever the field's type says (a field typed plain `str` gets
    the multi-line rule; single-line fields declare `SINGLE_LINE`)."""

    model_config = ConfigDict(extra="forbid", strict=True, str_max_length=10_000)

    @field_validator("*", mode="after")
    @classmethod
    def _no_control_characters(cls, value: Any) -> Any:
        # Nested request models have checked their own fields; this sees str, lists, dicts.
        _refuse_controls(value)
        return value


def examples(*values: dict[str, Any]) -> ConfigDict:
    """A request model's `model_config` addition: its examples for the OpenAPI document, with
    obviously fake data (a test checks that each one is a valid request)."""
    return ConfigDict(json_schema_extra={"examples": list(values)})


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def _iso_date(value: Any) -> Any:
    if not isinstance(value, str) or not _ISO_DATE.fullmatch(value):
        raise ValueError("must be a date written YYYY-MM-DD")
    return value


def _uuid_text(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise ValueError("must be a UUID")
    return value


def _instant(value: Any) -> Any:
    if isinstance(value, datetime):  # a caller using the library, not JSON
        return value
    if not isinstance(value, str) or not _INSTANT.fullmatch(value):
        # The usual mistake: an unencoded "+01:00" arrives as " 01:00" in a query string.
        raise ValueError("must be an ISO 8601 time with an offset, e.g. 2031-05-04T10:00:00Z "
                         "(in a URL, write + as %2B)")
    return value


def _in_utc_range(value: datetime) -> datetime:
    # 0001-01-01T00:00:00+14:00 is a valid time that has no UTC equivalent a datetime can hold;
    # refuse it here, or comparing it with stored UTC times fails as a 500.
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("must be a time between 0001-01-01 and 9999-12-31 in UTC") from None
    return value


def _upcoming(value: datetime) -> datetime:
    # Compared with the server's clock in UTC; the grace lets a client whose clock runs a little
    # ahead book "now". The upper bound keeps far-off years (which overflow on their way to
    # some databases) out.
    value = value.astimezone(UTC)
    if value.year > LATEST_YEAR:
        raise ValueError(f"must be no later than the year {LATEST_YEAR}")
    if value < datetime.now(UTC) - BOOKING_GRACE:
        raise ValueError("must not be in the past")
    return value


def _plausible_birth(value: date) -> date:
    # The bounds are the caller's calendar day in UTC: a birth "tomorrow" anywhere on earth
    # is at most one day ahead of UTC, and refusing it costs nobody a real birth date.
    if value < EARLIEST_BIRTH:
        raise ValueError("must be on or after 1900-01-01")
    if value > datetime.now(UTC).date():
        raise ValueError("must not be in the future")
    return value


EARLIEST_BIRTH = date(1900, 1, 1)
BOOKING_GRACE = timedelta(minutes=1)
LATEST_YEAR = 2200
# Every time in a request (bodies and query parameters alike): an ISO 8601 string with an
# offset (`Z` or `+hh:mm`), that has a UTC equivalent; never a timestamp, a date, or a naive time.
Instant = Annotated[AwareDatetime, Field(strict=False), BeforeValidator(_instant),
                    AfterValidator(_in_utc_range)]
# The time of a booking: an `Instant`, not in the past (BOOKING_GRACE for clock skew), at the
# latest in LATEST_YEAR; in UTC.
Upcoming = Annotated[AwareDatetime, Field(strict=False), BeforeValidator(_instant),
                     AfterValidator(_in_utc_range), AfterValidator(_upcoming)]
IsoDate = Annotated[date, Field(strict=False), BeforeValidator(_iso_date)]
# A date of birth: 1900-01-01 to today (SPEC §9's rectification, and registration alike).
BirthDate = Annotated[date, Field(strict=False), BeforeValidator(_iso_date),
                      AfterValidator(_plausible_birth)]
UUIDText = Annotated[uuid.UUID, Field(strict=False), BeforeValidator(_uuid_text)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=2000), MULTI_LINE]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
                 SINGLE_LINE]
Email = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=254,
                                         pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"), SINGLE_LINE,
                  # The address pattern and the single-line rule in one (the last pattern wins)
                  Field(json_schema_extra={
                      "pattern": rf"^{_EMAIL_PART}@{_EMAIL_PART}\.{_EMAIL_PART}$"})]
# Any characters (NIST SP 800-63B) but controls and line breaks: none can be typed into a
# password field on purpose, and a lone surrogate cannot even be hashed (it has no UTF-8).
Password = Annotated[str, StringConstraints(min_length=1, max_length=1024), SINGLE_LINE]

__all__ = ["BOOKING_GRACE", "MULTI_LINE", "SINGLE_LINE", "BirthDate", "Email", "Instant",
           "IsoDate", "Name", "Password", "RequestModel", "ResponseModel", "Text", "UUIDText",
           "Upcoming", "examples", "multi_line", "single_line"]
