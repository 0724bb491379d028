"""A streamed `multipart/form-data` body for attachment uploads.

An attachment may be 25 MiB, and an app may hold many, so the client never reads one whole into
memory: the body is the multipart head, the file's bytes a chunk at a time, and the closing
boundary. httpx's own `files=` wants a file object, and takes neither an iterator of bytes nor an
async one; this body takes all three. When the size is known (bytes, a seekable file, or the
caller says), the body has a `Content-Length`; otherwise it is sent chunked, which the server
accepts and bounds the same way.

A body can be sent again only if it can be rewound (bytes, or a seekable file): that is what
allows the client to retry an upload after refreshing a refused access token. An iterator is
consumed by the first attempt, so the client refreshes before an upload, never after.
"""

from __future__ import annotations

import mimetypes
import os
import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import IO, cast

CHUNK_BYTES = 64 * 1024
UploadSource = bytes | IO[bytes] | Iterable[bytes]
AsyncUploadSource = UploadSource | AsyncIterable[bytes]

_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE = re.compile(f"^{_NAME}/{_NAME}$")


def guess_content_type(filename: str) -> str:
    """The attachment type a file name suggests (`.pdf`, `.png`, `.jpg`, `.dcm`). The server
    checks it against the file's own bytes, so a wrong guess is a 415, never a mislabelled
    file."""
    if filename.lower().endswith(".dcm"):
        return "application/dicom"
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def _quoted(filename: str) -> str:
    # As browsers do (HTML's multipart encoding): a quote or a line break in the name cannot
    # end the header or forge another.
    return filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class MultipartUpload:
    """The body of one upload: one part named `file` holding `source`."""

    def __init__(self, source: AsyncUploadSource, *, filename: str,
                 content_type: str | None = None, size: int | None = None) -> None:
        content_type = content_type or guess_content_type(filename)
        if not _MEDIA_TYPE.fullmatch(content_type):
            raise ValueError("content_type must be a media type such as application/pdf")
        if not filename:
            raise ValueError("the file needs a name")
        self.source = source
        self.boundary = secrets.token_hex(16)
        self.head = (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                     f"filename=\"{_quoted(filename)}\"\r\nContent-Type: {content_type}\r\n"
                     f"\r\n").encode()
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._start = self._position()
        self.size = size if size is not None else self._remaining()

    def _file(self) -> IO[bytes] | None:
        # Any object with `read` is a file (httpx decides the same way).
        return cast("IO[bytes]", self.source) if hasattr(self.source, "read") else None

    def _position(self) -> int | None:
        file = self._file()
        if file is not None and file.seekable():
            return file.tell()
        return None

    def _remaining(self) -> int | None:
        if isinstance(self.source, bytes | bytearray | memoryview):
            return len(self.source)
        file = self._file()
        if file is None or self._start is None:
            return None
        end = file.seek(0, os.SEEK_END)
        file.seek(self._start)
        return end - self._start

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": f"multipart/form-data; boundary={self.boundary}"}
        if self.size is not None:
            headers["Content-Length"] = str(len(self.head) + self.size + len(self.tail))
        return headers

    @property
    def replayable(self) -> bool:
        return isinstance(self.source, bytes | bytearray | memoryview) or self._start is not None

    def rewind(self) -> None:
        """Back to the start of the file, for a second attempt (only when `replayable`)."""
        file = self._file()
        if file is not None and self._start is not None:
            file.seek(self._start)

    def _chunks(self) -> Iterator[bytes]:
        source = self.source
        if isinstance(source, bytes | bytearray | memoryview):
            view = memoryview(source)
            for start in range(0, len(view), CHUNK_BYTES):
                yield bytes(view[start:start + CHUNK_BYTES])
            return
        file = self._file()
        if file is not None:
            while chunk := file.read(CHUNK_BYTES):
                yield _bytes(chunk)
            return
        if isinstance(source, AsyncIterable):
            raise TypeError("an async iterator can only be uploaded by the async client")
        for chunk in source:
            yield _bytes(chunk)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        yield from self._chunks()
        yield self.tail

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        if isinstance(self.source, AsyncIterable):
            async for chunk in self.source:
                yield _bytes(chunk)
        else:
            # A local file or an iterator: its reads are short, like httpx's own file uploads.
            for chunk in self._chunks():
                yield chunk
        yield self.tail


def _bytes(chunk: object) -> bytes:
    if not isinstance(chunk, bytes | bytearray | memoryview):
        raise TypeError("upload bytes: open the file in binary mode ('rb')")
    return bytes(chunk)


__all__ = ["AsyncUploadSource", "MultipartUpload", "UploadSource", "guess_content_type"]
