"""Shared pieces of request and response models: strict, bounded, no unknown fields.

FastAPI validates bodies in Python mode, where a strict `date` or `UUID` field would refuse the
JSON string it arrives as; those fields relax strictness for strings in their one exact textual
form only, so `"yes"` is still no boolean, `"12"` no integer and `0` no date.
"""

from __future__ import annotations

import re
import uuid
from datetime import date
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are a 422, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, str_max_length=10_000)


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def _iso_date(value: Any) -> Any:
    if not isinstance(value, str) or not _ISO_DATE.match(value):
        raise ValueError("must be a date written YYYY-MM-DD")
    return value


def _uuid_text(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str) or not _UUID.match(value):
        raise ValueError("must be a UUID")
    return value


IsoDate = Annotated[date, Field(strict=False), BeforeValidator(_iso_date)]
UUIDText = Annotated[uuid.UUID, Field(strict=False), BeforeValidator(_uuid_text)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=2000)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Email = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=254,
                                         pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
Password = Annotated[str, StringConstraints(min_length=1, max_length=1024)]

__all__ = ["Email", "IsoDate", "Name", "Password", "RequestModel", "ResponseModel", "Text",
           "UUIDText"]
