"""The asynchronous client: `AsyncPhivaultClient`, over one `httpx.AsyncClient`.

The same routes and the same refresh rules as `sync.py`, awaited. Refreshes are serialised by
an `asyncio.Lock`: when many tasks find the access token about to expire (or refused) at once,
the first refreshes and the others wait for it and use the pair it got. Without the lock two
tasks would present the same single-use refresh token, the server would see a reuse, and it
would revoke the whole session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from os import PathLike
from ssl import SSLContext
from types import TracebackType
from typing import Any, TypeVar

import httpx

from phivault.client.account_endpoints import AccountEndpoints, Id
from phivault.client.answers import (
    DEFAULT_DEADLINE,
    MAX_ANSWER_BYTES,
    MAX_EXPORT_BYTES,
    Answer,
    Limits,
    aread_answer,
    aread_refusal,
    parsed,
)
from phivault.client.clinical_endpoints import ClinicalEndpoints
from phivault.client.downloads import AsyncAttachmentStream, Destination, saved_to
from phivault.client.errors import InvalidToken, PhivaultClientError
from phivault.client.models import AttachmentView, DownloadedFile, TokenPair
from phivault.client.routes import (
    DOWNLOAD,
    LOGIN,
    LOGOUT,
    REFRESH,
    UPLOAD,
    Call,
    RouteSpec,
    body,
    nothing,
    one,
)
from phivault.client.tokens import DEFAULT_REFRESH_LEEWAY, Clock, OnTokens, TokenKeeper, Tokens
from phivault.client.transport import (
    authorization,
    connection_failed,
    http_options,
    refresh_error,
    safe_cause,
)
from phivault.client.uploads import AsyncUploadSource, MultipartUpload

T = TypeVar("T")


class AsyncPhivaultClient(AccountEndpoints, ClinicalEndpoints):
    """The asynchronous phivault API client; the arguments are `PhivaultClient`'s. Use it from
    one event loop."""

    def __init__(self, base_url: str, *, ca_file: str | PathLike[str] | None = None,
                 ssl_context: SSLContext | None = None, tokens: Tokens | None = None,
                 on_tokens: OnTokens | None = None,
                 refresh_leeway: float = DEFAULT_REFRESH_LEEWAY,
                 timeout: float | httpx.Timeout | None = None, user_agent: str | None = None,
                 clock: Clock = time.time, max_answer_bytes: int = MAX_ANSWER_BYTES,
                 max_export_bytes: int = MAX_EXPORT_BYTES,
                 deadline: float | None = DEFAULT_DEADLINE) -> None:
        self._limits = Limits(max_answer_bytes, max_export_bytes, deadline)
        self._http = httpx.AsyncClient(**http_options(base_url, ca_file=ca_file,
                                                      ssl_context=ssl_context, timeout=timeout,
                                                      user_agent=user_agent))
        self._keeper = TokenKeeper(tokens, on_tokens=on_tokens, clock=clock,
                                   leeway=refresh_leeway)
        self._lock = asyncio.Lock()

    @property
    def tokens(self) -> Tokens | None:
        """The session's current tokens (None before login and after the session ended)."""
        return self._keeper.current

    # The session.

    async def login(self, email: str, password: str, totp_code: str | None = None) -> Tokens:
        """Start a session (see `PhivaultClient.login`)."""
        pair = parsed(one(TokenPair), await self._request(LOGIN, body(
            email=email, password=password, totp_code=totp_code)))
        async with self._lock:
            return self._keeper.keep(pair.access_token, pair.refresh_token, pair.expires_in)

    async def refresh(self) -> Tokens:
        """Rotate the tokens now. Raises `SessionRevoked` when the refresh token is refused."""
        async with self._lock:
            return await self._rotate(self._keeper.require())

    async def logout(self) -> None:
        """End the session on the server (every token of it) and forget it here."""
        async with self._lock:
            tokens = self._keeper.current
            self._keeper.forget()
        if tokens is not None:
            await self._request(LOGOUT, {"refresh_token": tokens.refresh_token})

    async def _rotate(self, tokens: Tokens) -> Tokens:
        """Exchange the refresh token for a new pair; the caller holds the lock."""
        try:
            answer = await self._request(REFRESH, {"refresh_token": tokens.refresh_token})
        except PhivaultClientError as error:
            if error.code != "invalid_token":
                raise
            self._keeper.forget()
            raise refresh_error(error) from None
        pair = parsed(one(TokenPair), answer)
        return self._keeper.keep(pair.access_token, pair.refresh_token, pair.expires_in)

    async def _access_token(self) -> str:
        tokens = self._keeper.require()
        if not self._keeper.due(tokens):
            return tokens.access_token
        async with self._lock:
            tokens = self._keeper.require()  # the task before us may have refreshed
            if self._keeper.due(tokens):
                tokens = await self._rotate(tokens)
            return tokens.access_token

    async def _access_token_after_refusal(self, refused: str) -> str:
        async with self._lock:
            tokens = self._keeper.require()
            if tokens.access_token == refused:
                tokens = await self._rotate(tokens)
            return tokens.access_token

    # Sending.

    async def _open(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                    **kwargs: Any) -> httpx.Response:
        """Send a request (see `PhivaultClient._open`)."""
        request = self._http.build_request(method, path, headers=headers, **kwargs)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise connection_failed(method, request.url.path, exc) from safe_cause(exc)
        if not response.is_success:
            raise await aread_refusal(response, self._limits.deadline)
        return response

    async def _read(self, response: httpx.Response, *, large: bool = False) -> Answer:
        limit = self._limits.export if large else self._limits.answer
        return await aread_answer(response, limit, self._limits.deadline)

    async def _request(self, route: RouteSpec, json: object) -> Answer:
        """One of the session's own requests (login, refresh, logout): no token."""
        return await self._read(await self._open(route.method, route.template, json=json))

    async def _exchange(self, call: Call[Any], *,
                        content: Callable[[], AsyncIterable[bytes]] | None = None,
                        headers: dict[str, str] | None = None,
                        rewind: Callable[[], None] | None = None, replayable: bool = True
                        ) -> httpx.Response:
        async def attempt(token: str | None) -> httpx.Response:
            sent = dict(headers or {})
            if token is not None:
                sent["Authorization"] = authorization(token)
            return await self._open(call.method, call.path, headers=sent, params=call.params,
                                    json=call.json, content=content() if content else None)

        if call.bearer is not None or call.auth == "none":
            response = await attempt(call.bearer)
        else:
            token = await self._access_token()
            try:
                response = await attempt(token)
            except InvalidToken as refused:
                if refused.status != 401 or not replayable:
                    raise
                token = await self._access_token_after_refusal(token)
                if rewind is not None:
                    rewind()
                response = await attempt(token)
        if call.ends_session:
            async with self._lock:
                self._keeper.forget()
        return response

    async def _run(self, call: Call[T]) -> T:
        """How every declared route is sent (see `routes.Route`)."""
        response = await self._exchange(call)
        return parsed(call.parse, await self._read(response, large=call.large_answer))

    # Attachments, streamed both ways.

    async def upload_attachment(self, patient_id: Id, source: AsyncUploadSource, *,
                                filename: str, content_type: str | None = None,
                                size: int | None = None) -> AttachmentView:
        """Upload a file from bytes, a binary file, or an iterator or async iterator of bytes,
        a chunk at a time (see `PhivaultClient.upload_attachment`)."""
        upload = MultipartUpload(source, filename=filename, content_type=content_type,
                                 size=size)
        call: Call[None] = Call(nothing, method=UPLOAD.method,
                                path=UPLOAD.path({"patient_id": patient_id}))
        response = await self._exchange(call, content=upload.__aiter__, headers=upload.headers,
                                        rewind=upload.rewind, replayable=upload.replayable)
        return parsed(one(AttachmentView), await self._read(response))

    @asynccontextmanager
    async def open_attachment(self, attachment_id: Id) -> AsyncIterator[AsyncAttachmentStream]:
        """`async with client.open_attachment(id) as download:` then
        `async for chunk in download.aiter_bytes()` (see `PhivaultClient.open_attachment`)."""
        call: Call[None] = Call(nothing, method=DOWNLOAD.method,
                                path=DOWNLOAD.path({"attachment_id": attachment_id}))
        response = await self._exchange(call)
        try:
            yield AsyncAttachmentStream(response, self._limits.deadline)
        finally:
            await response.aclose()

    async def download_attachment(self, attachment_id: Id, destination: Destination
                                  ) -> DownloadedFile:
        """Write an attachment to a path or a binary file (see
        `PhivaultClient.download_attachment`; local writes of 64 KiB chunks, made from the
        event loop)."""
        async with self.open_attachment(attachment_id) as download:
            with saved_to(destination) as file:
                written = 0
                async for chunk in download.aiter_bytes():
                    file.write(chunk)
                    written += len(chunk)
        return DownloadedFile(download.content_type, written, download.filename)

    # Lifetime.

    async def aclose(self) -> None:
        """Close the connections (the session stays valid: `logout` ends it)."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncPhivaultClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.aclose()


__all__ = ["AsyncPhivaultClient"]
