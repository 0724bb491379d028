"""Attachment downloads as streams: a chunk at a time from the socket to the caller or a file.

The server authenticates the whole stored file before it sends the first byte, so a download
that starts is the genuine file; a connection that breaks midway raises `ConnectionFailed`
(the body is checked against its `Content-Length`), never a silently short file. A download is
at most 25 MiB and a margin (`AnswerTooLarge` beyond, or beyond its own `Content-Length`).

A file written for the caller is readable by its owner only (0600): it holds PHI in clear. It
is written to a new temporary file beside the destination (created exclusively, so never
through a link someone planted there) and renamed over the destination once complete; a
download that fails leaves no partial file behind.

The file's name comes from `Content-Disposition` (RFC 6266): `filename*` (UTF-8, RFC 8187)
when given, else `filename`. It is the uploader's choice, so the client only reports it: it
never uses it as a path (`download_attachment` writes where the caller says), and neither should
an app: `attachment_file_name` makes a safe one from the attachment's id and type.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import IO
from urllib.parse import unquote

import httpx

from phivault.client.answers import MAX_DOWNLOAD_BYTES, BodyMeter
from phivault.client.errors import ConnectionFailed
from phivault.client.routes import canonical_id

CHUNK_BYTES = 64 * 1024
Destination = str | os.PathLike[str] | IO[bytes]

SUFFIXES = {"application/pdf": ".pdf", "image/png": ".png", "image/jpeg": ".jpg",
            "application/dicom": ".dcm"}

_EXTENDED_NAME = re.compile(r"filename\*\s*=\s*UTF-8''([^;\s]+)", re.IGNORECASE)
_PLAIN_NAME = re.compile(r'filename\s*=\s*"((?:[^"\\]|\\.)*)"|filename\s*=\s*([^;\s]+)',
                         re.IGNORECASE)


def disposition_filename(header: str | None) -> str | None:
    """The file name a `Content-Disposition` header gives, if any."""
    if not header:
        return None
    extended = _EXTENDED_NAME.search(header)
    if extended:
        return unquote(extended.group(1), errors="replace") or None
    plain = _PLAIN_NAME.search(header)
    if plain:
        quoted, bare = plain.groups()
        return re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
    return None


def attachment_file_name(attachment_id: uuid.UUID | str, content_type: str) -> str:
    """A name to save an attachment under, safe to join to a directory: its id (a UUID) and
    the suffix of its type (`.pdf`, `.png`, `.jpg`, `.dcm`; `.bin` for another). Never the
    attachment's `filename`, which the uploader chose (`../../.bashrc`, `/etc/cron.d/x`)."""
    media_type = content_type.partition(";")[0].strip().lower()
    return canonical_id("attachment_id", attachment_id) + SUFFIXES.get(media_type, ".bin")


class _Download:
    """What the answer's headers say about the file."""

    def __init__(self, response: httpx.Response, deadline: float | None) -> None:
        self._response = response
        self._meter = BodyMeter(response, MAX_DOWNLOAD_BYTES, deadline)
        self.content_type = response.headers.get("content-type", "application/octet-stream")
        self.size: int | None = self._meter.declared
        self.filename = disposition_filename(response.headers.get("content-disposition"))


class AttachmentStream(_Download):
    """An attachment being downloaded (from `PhivaultClient.open_attachment`): its
    `content_type`, `size`, `filename` (None when the server names none) and its bytes."""

    def iter_bytes(self, chunk_size: int = CHUNK_BYTES) -> Iterator[bytes]:
        def metered() -> Iterator[bytes]:
            for piece in self._response.iter_raw():  # as they come: see `BodyMeter`
                yield self._meter.count(piece)
            self._meter.finish()

        try:
            yield from _chunked(metered(), chunk_size)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"the download broke off: {type(exc).__name__}") from exc


class AsyncAttachmentStream(_Download):
    """An attachment being downloaded (from `AsyncPhivaultClient.open_attachment`)."""

    async def aiter_bytes(self, chunk_size: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
        buffer = bytearray()
        try:
            async for piece in self._response.aiter_raw():  # as they come: see `BodyMeter`
                buffer += self._meter.count(piece)
                while len(buffer) >= chunk_size:
                    yield bytes(buffer[:chunk_size])
                    del buffer[:chunk_size]
            self._meter.finish()
            if buffer:
                yield bytes(buffer)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"the download broke off: {type(exc).__name__}") from exc


def _chunked(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """`pieces` gathered into chunks of `size` bytes (the last one shorter)."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


@contextlib.contextmanager
def saved_to(destination: Destination) -> Iterator[IO[bytes]]:
    """The file to write a download into. For a path: a new temporary file (0600, created with
    `O_EXCL`, so a link planted at its name is never followed) in the destination's directory,
    renamed over the destination when the block ends well and removed when it does not. An
    open binary file is the caller's: written to as it is, and left open."""
    if not isinstance(destination, str | os.PathLike):
        yield destination
        return
    path = os.path.abspath(os.fspath(destination))
    descriptor, temporary = tempfile.mkstemp(prefix=".phivault-", suffix=".part",
                                             dir=os.path.dirname(path))
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
        # A rename replaces a link at `path` itself, never the file it points to.
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


__all__ = ["AsyncAttachmentStream", "AttachmentStream", "Destination", "attachment_file_name",
           "disposition_filename", "saved_to"]
