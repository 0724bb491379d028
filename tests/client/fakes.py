"""A fake server in this process for the client's handling of answers: a function answers each
request (httpx's `MockTransport`), so a test can answer what no honest phivault would (a
redirect, a body that never ends, a compressed one, a model that does not fit) without
starting a live server. The client is the real one, its headers and limits included; only its
transport is swapped."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Literal

import httpx

from phivault.client import AsyncPhivaultClient, PhivaultClient, Tokens

BASE = "https://phivault.test"
Kind = Literal["sync", "async"]
Handler = Callable[[httpx.Request], httpx.Response]
SESSION = Tokens.issued("head.payload.signature", "refresh-token", 900)
PATIENT_ID = str(uuid.UUID(int=1))
ATTACHMENT_ID = str(uuid.UUID(int=2))


class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body whose chunks are made as the client asks for them (for either client); `pulled`
    counts the bytes handed over."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.pulled = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.pulled += len(chunk)
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk


def endless(chunk: bytes = b" " * 65536, *, every: float = 0.0,
            give_up_after: int = 64 * 1024 * 1024) -> Iterator[bytes]:
    """A body that does not end (until `give_up_after` bytes, so that a client without a limit
    fails its test rather than hangs it), a chunk each `every` seconds."""
    sent = 0
    while sent < give_up_after:
        if every:
            time.sleep(every)
        sent += len(chunk)
        yield chunk


def streamed(status: int, content: bytes, **headers: str) -> httpx.Response:
    """An answer whose body arrives as a socket's would. (`httpx.Response(content=...)` is
    read already, which no transport's answer is.)"""
    return httpx.Response(status, stream=Body([content] if content else []),
                          headers={"Content-Length": str(len(content)), **headers})


def answer(status: int = 200, value: object = None, **headers: str) -> httpx.Response:
    """A JSON answer of `value` (an empty 204 when `value` is None and `status` is 204)."""
    if value is None and status == 204:
        return streamed(204, b"", **headers)
    return streamed(status, json.dumps(value).encode(),
                    **{"Content-Type": "application/json", **headers})


def shown(error: BaseException) -> str:
    """What a logged traceback of `error` would say of it: the message of the error and of
    every exception chained to it (`raise ... from`, or raised while handling another)."""
    said: list[str] = []
    seen: BaseException | None = error
    while seen is not None:
        said.append(f"{type(seen).__name__}: {seen} {seen!r}")
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return "\n".join(said)


class Fake:
    """A client of either kind whose requests `handler` answers; `await fake.call("me")` runs
    a method on both. `requests` holds what the client sent."""

    def __init__(self, kind: Kind, handler: Handler, **options: Any) -> None:
        self.kind = kind
        self.requests: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return handler(request)

        transport = httpx.MockTransport(record)
        self.client: PhivaultClient | AsyncPhivaultClient
        if kind == "sync":
            client = PhivaultClient(BASE, **options)
            headers = client._http.headers
            client._http.close()
            client._http = httpx.Client(base_url=BASE, headers=headers, transport=transport)
            self.client = client
        else:
            aclient = AsyncPhivaultClient(BASE, **options)
            headers = aclient._http.headers
            aclient._http = httpx.AsyncClient(base_url=BASE, headers=headers,
                                              transport=transport)
            self.client = aclient

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, name)(*args, **kwargs)
        return await result if self.kind == "async" else result

    async def close(self) -> None:
        if isinstance(self.client, AsyncPhivaultClient):
            await self.client.aclose()
        else:
            self.client.close()
