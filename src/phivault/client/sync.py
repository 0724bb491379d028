"""The synchronous client: `PhivaultClient`, over one `httpx.Client`.

Every route is a method (declared once in `account_endpoints.py` and `clinical_endpoints.py`);
this class decides how a request goes out. Before a request it refreshes an access token that
is about to expire; when the server refuses the token anyway (401 `invalid_token`: a clock
jump, a token restored from storage) it refreshes once and sends the request again. Refreshes
take a lock, so threads sharing one client rotate the single-use refresh token one at a time,
and a thread that waited uses the pair the other just got instead of refreshing again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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
    parsed,
    read_answer,
    read_refusal,
)
from phivault.client.clinical_endpoints import ClinicalEndpoints
from phivault.client.downloads import AttachmentStream, Destination, saved_to
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
from phivault.client.uploads import MultipartUpload, UploadSource

T = TypeVar("T")


class PhivaultClient(AccountEndpoints, ClinicalEndpoints):
    """A phivault API client for one account's session.

    `base_url`: the server, e.g. `https://127.0.0.1:8443`. `ca_file`: a CA (or self-signed
    certificate) to trust instead of the system's; or a ready `ssl_context`. `tokens`: a session
    to resume; `on_tokens`: told each new pair (store it: refresh tokens are single-use).
    `refresh_leeway`: seconds before the access token's expiry at which it is refreshed.
    `max_answer_bytes` (16 MiB), `max_export_bytes` (64 MiB, `export_my_data`) and `deadline`
    (300 s for an answer's body, None for none) bound what the client reads (`answers.py`)."""

    def __init__(self, base_url: str, *, ca_file: str | PathLike[str] | None = None,
                 ssl_context: SSLContext | None = None, tokens: Tokens | None = None,
                 on_tokens: OnTokens | None = None,
                 refresh_leeway: float = DEFAULT_REFRESH_LEEWAY,
                 timeout: float | httpx.Timeout | None = None, user_agent: str | None = None,
                 clock: Clock = time.time, max_answer_bytes: int = MAX_ANSWER_BYTES,
                 max_export_bytes: int = MAX_EXPORT_BYTES,
                 deadline: float | None = DEFAULT_DEADLINE) -> None:
        self._limits = Limits(max_answer_bytes, max_export_bytes, deadline)
        self._http = httpx.Client(**http_options(base_url, ca_file=ca_file,
                                                 ssl_context=ssl_context, timeout=timeout,
                                                 user_agent=user_agent))
        self._keeper = TokenKeeper(tokens, on_tokens=on_tokens, clock=clock,
                                   leeway=refresh_leeway)
        self._lock = threading.Lock()

    @property
    def tokens(self) -> Tokens | None:
        """The session's current tokens (None before login and after the session ended)."""
        return self._keeper.current

    # The session.

    def login(self, email: str, password: str, totp_code: str | None = None) -> Tokens:
        """Start a session. Raises `InvalidCredentials`, `MfaRequired` (send `totp_code`),
        `MfaEnrollmentRequired` (with its `enrollment_token`) or `RateLimited`."""
        pair = parsed(one(TokenPair), self._request(LOGIN, body(
            email=email, password=password, totp_code=totp_code)))
        with self._lock:
            return self._keeper.keep(pair.access_token, pair.refresh_token, pair.expires_in)

    def refresh(self) -> Tokens:
        """Rotate the tokens now (the client does it by itself when needed). Raises
        `SessionRevoked` when the server refuses the refresh token."""
        with self._lock:
            return self._rotate(self._keeper.require())

    def logout(self) -> None:
        """End the session on the server (every token of it) and forget it here."""
        with self._lock:
            tokens = self._keeper.current
            self._keeper.forget()
        if tokens is not None:
            self._request(LOGOUT, {"refresh_token": tokens.refresh_token})

    def _rotate(self, tokens: Tokens) -> Tokens:
        """Exchange the refresh token for a new pair; the caller holds the lock."""
        try:
            answer = self._request(REFRESH, {"refresh_token": tokens.refresh_token})
        except PhivaultClientError as error:
            if error.code != "invalid_token":
                raise
            self._keeper.forget()
            raise refresh_error(error) from None
        pair = parsed(one(TokenPair), answer)
        return self._keeper.keep(pair.access_token, pair.refresh_token, pair.expires_in)

    def _access_token(self) -> str:
        """A token that is not about to expire, refreshed first if it is."""
        tokens = self._keeper.require()
        if not self._keeper.due(tokens):
            return tokens.access_token
        with self._lock:
            tokens = self._keeper.require()  # another thread may have refreshed meanwhile
            if self._keeper.due(tokens):
                tokens = self._rotate(tokens)
            return tokens.access_token

    def _access_token_after_refusal(self, refused: str) -> str:
        with self._lock:
            tokens = self._keeper.require()
            if tokens.access_token == refused:  # nobody has refreshed since it was sent
                tokens = self._rotate(tokens)
            return tokens.access_token

    # Sending.

    def _open(self, method: str, path: str, *, headers: dict[str, str] | None = None,
              **kwargs: Any) -> httpx.Response:
        """Send a request. Answers a 2xx answer, its body still to read (`_read`, or a
        download's stream); raises the typed error of any other answer (3xx included)."""
        request = self._http.build_request(method, path, headers=headers, **kwargs)
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise connection_failed(method, request.url.path, exc) from safe_cause(exc)
        if not response.is_success:
            raise read_refusal(response, self._limits.deadline)
        return response

    def _read(self, response: httpx.Response, *, large: bool = False) -> Answer:
        limit = self._limits.export if large else self._limits.answer
        return read_answer(response, limit, self._limits.deadline)

    def _request(self, route: RouteSpec, json: object) -> Answer:
        """One of the session's own requests (login, refresh, logout): no token."""
        return self._read(self._open(route.method, route.template, json=json))

    def _exchange(self, call: Call[Any], *, content: Callable[[], Iterable[bytes]] | None = None,
                  headers: dict[str, str] | None = None,
                  rewind: Callable[[], None] | None = None, replayable: bool = True
                  ) -> httpx.Response:
        """Send `call` with the right token; once more after a refresh if the token was
        refused and the body can be sent again. Answers the 2xx answer, unread."""
        def attempt(token: str | None) -> httpx.Response:
            sent = dict(headers or {})
            if token is not None:
                sent["Authorization"] = authorization(token)
            return self._open(call.method, call.path, headers=sent, params=call.params,
                              json=call.json, content=content() if content else None)

        if call.bearer is not None or call.auth == "none":
            response = attempt(call.bearer)
        else:
            token = self._access_token()
            try:
                response = attempt(token)
            except InvalidToken as refused:
                if refused.status != 401 or not replayable:
                    raise
                token = self._access_token_after_refusal(token)
                if rewind is not None:
                    rewind()
                response = attempt(token)
        if call.ends_session:
            with self._lock:
                self._keeper.forget()
        return response

    def _run(self, call: Call[T]) -> T:
        """How every declared route is sent (see `routes.Route`)."""
        return parsed(call.parse, self._read(self._exchange(call), large=call.large_answer))

    # Attachments, streamed both ways.

    def upload_attachment(self, patient_id: Id, source: UploadSource, *, filename: str,
                          content_type: str | None = None, size: int | None = None
                          ) -> AttachmentView:
        """Upload a file (at most 25 MiB: PDF, PNG, JPEG or DICOM) from bytes, a binary file or
        an iterator of bytes, a chunk at a time. `content_type` defaults to the one
        `filename` suggests; `size` gives a `Content-Length` for an iterator."""
        upload = MultipartUpload(source, filename=filename, content_type=content_type,
                                 size=size)
        call: Call[None] = Call(nothing, method=UPLOAD.method,
                                path=UPLOAD.path({"patient_id": patient_id}))
        response = self._exchange(call, content=lambda: iter(upload), headers=upload.headers,
                                  rewind=upload.rewind, replayable=upload.replayable)
        return parsed(one(AttachmentView), self._read(response))

    @contextmanager
    def open_attachment(self, attachment_id: Id) -> Iterator[AttachmentStream]:
        """`with client.open_attachment(id) as download:` then `download.iter_bytes()`; the
        connection is released when the block ends. At most 25 MiB (and a margin), read
        within the client's `deadline`."""
        call: Call[None] = Call(nothing, method=DOWNLOAD.method,
                                path=DOWNLOAD.path({"attachment_id": attachment_id}))
        response = self._exchange(call)
        try:
            yield AttachmentStream(response, self._limits.deadline)
        finally:
            response.close()

    def download_attachment(self, attachment_id: Id, destination: Destination
                            ) -> DownloadedFile:
        """Write an attachment to a path (mode 0600; written beside it and renamed into place
        once whole, so a failed download leaves nothing) or to an open binary file. Name the
        path with `attachment_file_name`, never the attachment's own `filename`."""
        with self.open_attachment(attachment_id) as download, saved_to(destination) as file:
            written = 0
            for chunk in download.iter_bytes():
                file.write(chunk)
                written += len(chunk)
        return DownloadedFile(download.content_type, written, download.filename)

    # Lifetime.

    def close(self) -> None:
        """Close the connections (the session stays valid: `logout` ends it)."""
        self._http.close()

    def __enter__(self) -> PhivaultClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


__all__ = ["PhivaultClient"]
