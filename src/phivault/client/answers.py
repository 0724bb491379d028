"""Reading the server's answers within limits, and parsing them without quoting them.

A broken or hostile server (or whatever answers in its place) can send a body that never ends,
a few KiB of gzip that inflate to gigabytes, or a byte every few seconds, each read well within
the timeout. So the client asks for no compression (`Accept-Encoding: identity`) and refuses a
compressed answer, reads the raw bytes a chunk at a time against a cap and the declared
`Content-Length`, and gives up on a body that takes longer than its deadline. An answer that
does not fit its model raises `InvalidAnswer`, which names the places that did not fit and never
their values: a success answer carries PHI, and a token answer tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
from pydantic import ValidationError

from phivault.client.errors import (
    AnswerTimedOut,
    AnswerTooLarge,
    ConnectionFailed,
    FieldProblem,
    InvalidAnswer,
    PhivaultClientError,
    error_for,
)

T = TypeVar("T")

MiB = 1024 * 1024
MAX_ANSWER_BYTES = 16 * MiB
"""A JSON answer, by default. A page holds at most 500 items; records are the largest (up to
about 45,000 characters of text each), so a page of ordinary records is far below this. A page
(or `record_versions`) of very long records may not be: ask for a smaller `limit`, or raise the
client's `max_answer_bytes`."""
MAX_EXPORT_BYTES = 64 * MiB
"""`export_my_data`, by default. The server streams the export and sets it no limit: it grows
with the patient's history (records, the access log). Raise `max_export_bytes` for more."""
MAX_DOWNLOAD_BYTES = 25 * MiB + 64 * 1024
"""An attachment: 25 MiB at most (the server refuses larger uploads), and a margin."""
MAX_ERROR_BYTES = 64 * 1024
"""An error answer's body: a code and a sentence. A longer one is ignored; its status counts."""
DEFAULT_DEADLINE = 300.0
"""Seconds an answer's body may take, from its headers to its last byte: a 25 MiB attachment
at about 90 KB/s."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A success answer read whole (within its limit)."""

    status_code: int
    headers: httpx.Headers
    content: bytes


@dataclass(frozen=True, slots=True)
class Limits:
    """A client's limits on what it reads (see the constants above)."""

    answer: int = MAX_ANSWER_BYTES
    export: int = MAX_EXPORT_BYTES
    deadline: float | None = DEFAULT_DEADLINE

    def __post_init__(self) -> None:
        if self.answer < 1 or self.export < 1:
            raise ValueError("max_answer_bytes and max_export_bytes must be positive")
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError("deadline must be positive seconds, or None for none")


def _request_id(response: httpx.Response) -> str | None:
    found: str | None = response.headers.get("x-request-id")
    return found


class BodyMeter:
    """Counts an answer's raw bytes against its limit, its `Content-Length` and its deadline,
    as they arrive. Refuses a compressed answer, and one that declares too much, at once.

    It must see each piece as the socket gives it (`iter_raw()` without a chunk size): httpx
    gathers pieces into chunks of a given size, and a body that drips a byte at a time would
    keep the meter waiting for a whole chunk."""

    def __init__(self, response: httpx.Response, limit: int, deadline: float | None) -> None:
        self.request_id = _request_id(response)
        self.status = response.status_code
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise InvalidAnswer("The server's answer is compressed, which the client did not "
                                "ask for (it cannot tell how large it would grow).",
                                status=self.status, request_id=self.request_id)
        length = response.headers.get("content-length", "").strip()
        self.declared = int(length) if length.isdigit() else None
        if self.declared is not None and self.declared > limit:
            raise self._too_large(limit)
        self.limit = limit if self.declared is None else self.declared
        self.received = 0
        self.until = None if deadline is None else time.monotonic() + deadline

    def _too_large(self, limit: int) -> AnswerTooLarge:
        return AnswerTooLarge(
            f"The server's answer is longer than the client takes ({limit} bytes, or its own "
            "Content-Length); the client stopped reading it.",
            limit=limit, status=self.status, request_id=self.request_id)

    def count(self, chunk: bytes) -> bytes:
        self.received += len(chunk)
        if self.received > self.limit:
            raise self._too_large(self.limit)
        if self.until is not None and time.monotonic() > self.until:
            raise AnswerTimedOut("The server's answer did not arrive within the client's "
                                 "deadline.", request_id=self.request_id)
        return chunk

    def finish(self) -> None:
        if self.declared is not None and self.received < self.declared:
            raise ConnectionFailed("The answer broke off before its Content-Length.",
                                   request_id=self.request_id)


def broke_off(exc: httpx.TransportError) -> ConnectionFailed:
    # Only the kind of failure: httpx's message may quote what was sent.
    return ConnectionFailed(f"The answer broke off: {type(exc).__name__}.")


def read_answer(response: httpx.Response, limit: int, deadline: float | None) -> Answer:
    """The body of a streamed answer, at most `limit` bytes within `deadline`; closes it."""
    try:
        meter = BodyMeter(response, limit, deadline)
        body = bytearray()
        for chunk in response.iter_raw():
            body += meter.count(chunk)
        meter.finish()
    except httpx.TransportError as exc:
        raise broke_off(exc) from exc
    finally:
        response.close()
    return Answer(response.status_code, response.headers, bytes(body))


async def aread_answer(response: httpx.Response, limit: int, deadline: float | None
                       ) -> Answer:
    """`read_answer`, awaited."""
    try:
        meter = BodyMeter(response, limit, deadline)
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += meter.count(chunk)
        meter.finish()
    except httpx.TransportError as exc:
        raise broke_off(exc) from exc
    finally:
        await response.aclose()
    return Answer(response.status_code, response.headers, bytes(body))


def read_refusal(response: httpx.Response, deadline: float | None) -> PhivaultClientError:
    """The typed error of a non-2xx answer (its body read, closed). A body that is too long,
    compressed or broken off is ignored: the status still says what kind of refusal it is."""
    try:
        content = read_answer(response, MAX_ERROR_BYTES, deadline).content
    except PhivaultClientError:
        content = b""
    return error_for(response.status_code, response.headers, content)


async def aread_refusal(response: httpx.Response, deadline: float | None
                        ) -> PhivaultClientError:
    """`read_refusal`, awaited."""
    try:
        content = (await aread_answer(response, MAX_ERROR_BYTES, deadline)).content
    except PhivaultClientError:
        content = b""
    return error_for(response.status_code, response.headers, content)


MAX_PROBLEMS = 10


def parsed(parse: Callable[[Answer], T], answer: Answer) -> T:
    """`parse(answer)`, or `InvalidAnswer` naming where it did not fit (never a value, and
    without pydantic's error, whose text quotes the input)."""
    common = {"status": answer.status_code, "request_id": answer.headers.get("x-request-id")}
    try:
        return parse(answer)
    except ValidationError as exc:
        problems = tuple(
            FieldProblem(".".join(str(part) for part in error["loc"]) or "(answer)",
                         error["type"])
            for error in exc.errors(include_url=False, include_context=False,
                                    include_input=False)[:MAX_PROBLEMS])
        where = ", ".join(f"{p.field} ({p.problem})" for p in problems)
        raise InvalidAnswer(f"The server's answer does not fit {exc.title}: {where}.",
                            fields=problems, **common) from None
    except ValueError:
        raise InvalidAnswer("The server's answer is not what this route answers.",
                            **common) from None


__all__ = ["DEFAULT_DEADLINE", "MAX_ANSWER_BYTES", "MAX_DOWNLOAD_BYTES", "MAX_ERROR_BYTES",
           "MAX_EXPORT_BYTES", "Answer", "BodyMeter", "Limits", "aread_answer",
           "aread_refusal", "parsed", "read_answer", "read_refusal"]
