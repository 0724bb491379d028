"""uvicorn's HTTP/1.1 protocol on httptools, with a deadline on request headers, limits on the
request head, and its part in a drain.

httptools (llhttp, Node.js's parser, in C) costs a request a fraction of h11's pure Python; it
also refuses request smuggling's ambiguities (Content-Length with Transfer-Encoding, two
Content-Lengths) and control characters in header values. What it does not bound is bounded
here.

uvicorn closes idle keep-alive connections, but a client that trickles header bytes (slowloris)
or sends nothing after the TLS handshake holds its connection forever, and enough of them fill
`limit_concurrency` so that every other client gets 503. Here every request's headers must be
complete within `HEADER_TIMEOUT` seconds of the connection opening (or of the previous response
ending), or the connection is closed. The body's own deadline is in `web/middleware.py`.

When the server drains (`web/server.py`), it asks each connection ten times a second to `drain`:
a connection with nothing in flight closes as soon as the client has received every byte sent to
it, and an upload that has slowed to a trickle is cut.

A request that breaks HTTP/1.1's framing, whose URL or header section is longer than
`h11_max_incomplete_event_size` (the setting's name is uvicorn's), which has more than
`MAX_HEADERS` header fields, which is not HTTP/1.0 or 1.1, whose target is not a path (the
absolute form `GET http://other.host/`, which only a proxy takes), or which has no Host (or two),
which asks to upgrade the connection, which sends trailer fields after a chunked body (httptools
would add them to the headers the application reads), whose chunked framing (chunk sizes,
extensions, trailers) passes `max_head` plus a chunk-size line per chunk, or which arrives while
`MAX_PIPELINED` requests already wait behind the one being answered, is refused here, before any
application code, as the rest of the API refuses: a JSON `{"error", "detail"}` with the security
headers and a request id, 414 when the request line alone is too long, 431 for the header
section, 400 for anything else; then the connection closes. A request pipelined behind others
still being answered is refused after their answers. uvicorn's own answer is a `text/plain` 400
without any of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import os
import struct
import sys
from collections import deque
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from phivault.observability import get_logger
from phivault.request_context import new_request_id
from phivault.web.errors import FRAMEWORK_CODES
from phivault.web.middleware import API_CSP, SECURITY_HEADERS

if TYPE_CHECKING:
    from asyncio.trsock import TransportSocket
if sys.platform == "linux":
    import fcntl
    import termios

# Read from the environment (validated by Settings as PHIVAULT_HEADER_TIMEOUT) so that every
# worker process, which imports this module anew, applies the same deadline.
HEADER_TIMEOUT = float(os.environ.get("PHIVAULT_HEADER_TIMEOUT", "15"))

# While the server drains, a request body still arriving must keep this pace (bytes a second,
# counted from the start of the drain after a grace period), or its connection is cut: an honest
# upload finishes within the drain, a trickle does not hold the shutdown up.
DRAIN_BODY_MIN_RATE = 16 * 1024
DRAIN_BODY_GRACE = 2.0
# A connection closes once this many consecutive drain steps found nothing left to deliver:
# two, so that bytes still in the transport's own buffer have had a turn of the loop to reach
# the kernel.
_QUIET_STEPS = 2

# Header fields a request may carry (Apache's LimitRequestFields); browsers send about twenty.
MAX_HEADERS = 100
# Requests a connection may have waiting behind the one being answered (browsers pipeline none;
# a client that sends on without reading its answers would otherwise queue without end).
MAX_PIPELINED = 16
# A connection the server closes is checked this often, for at most this long, for the client
# to have every byte, and then dropped (`_cut_once_delivered`).
CLOSE_LINGER_STEP = 0.25
CLOSE_LINGER_MAX = 5.0
# A chunked body's framing allowed per chunk (a chunk-size line and the CRLF after the data),
# besides `max_head` for extensions and the end.
FRAMING_PER_CHUNK = 32
# The longest URL, and the largest header section, unless uvicorn's config sets another
# (`h11_max_incomplete_event_size`; `phivault serve` sets 16 KiB).
MAX_HEAD = 16 * 1024
# The codes and sentences are the API's own (web/errors.py, which the OpenAPI document lists).
REFUSALS = {status: FRAMEWORK_CODES[status] for status in (400, 414, 431)}

log = get_logger("phivault.access")


class _Refused(Exception):
    """Raised from a parser callback: the request broke one of the rules here."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol on httptools (llhttp, which refuses request smuggling's
    ambiguities and control characters in header values), with the deadline on request headers,
    the limits on the head and the body's framing, JSON refusals and the drain of the module
    docstring."""

    _header_deadline: asyncio.TimerHandle | None = None
    _received = 0
    _drain_started: float | None = None
    _received_at_drain = 0
    _quiet_steps = 0
    _cut = False
    _draining = False
    _socket: TransportSocket | None = None
    # The request whose application task was started last (uvicorn's `cycle` is the request
    # parsed last, which may wait in the pipeline behind it).
    _running: RequestResponseCycle | None = None
    # The head being parsed: bytes received for it, its header fields and their size.
    _awaiting_head = True
    _head_bytes = 0
    _header_count = 0
    _header_bytes = 0
    _url_done = False
    _messages = 0
    # The body being received: its bytes, its chunks and the bytes that framed them.
    _body_bytes = 0
    _chunks = 0
    _framing_bytes = 0
    # A refusal waiting for the answers to the requests received before it, and its status.
    _refusal_pending = False
    refusal_status = 400

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size
        self.max_head = size if size is not None else MAX_HEAD
        # httptools buffers a URL or a header field until it ends: the bytes of one head are
        # bounded too (the URL and the header section may each take `max_head`).
        self.max_head_bytes = 2 * self.max_head + 4096

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._socket = transport.get_extra_info("socket")
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(HEADER_TIMEOUT, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
            self._cut_once_delivered()

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self._cut_once_delivered()

    def _busy(self) -> bool:
        return self._running is not None and not self._running.response_complete

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        if self._refusal_pending:
            # The parser has failed: nothing more is fed to it (or logged), and reading stays
            # paused (uvicorn resumes it whenever the application asks for the body).
            self.flow.pause_reading()
            return
        messages, body, in_body = self._messages, self._body_bytes, not self._awaiting_head
        super().data_received(data)
        if self.transport.is_closing() or self._refusal_pending:
            return
        if self._messages != messages:
            self._head_bytes = 0  # a message ended in this read; what follows is not counted
        elif self._awaiting_head:
            self._head_bytes += len(data)
            self._url_done = self._url_done or b"\n" in data  # the request line has ended
            if self._head_bytes > self.max_head_bytes:
                self.refusal_status = 431 if self._url_done else 414
                self.send_400_response("request head too large")
        elif in_body:
            # Chunk sizes, their extensions and trailers, which httptools reads (and a trailer
            # field buffers) however long they are: `max_head` in all, and a chunk-size line
            # for each chunk.
            self._framing_bytes += len(data) - (self._body_bytes - body)
            if self._framing_bytes > self.max_head + FRAMING_PER_CHUNK * self._chunks:
                self.refusal_status = 400
                self.send_400_response("body framing too large")

    # Parser callbacks.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = self._header_bytes = 0
        self._body_bytes = self._chunks = self._framing_bytes = 0

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self.max_head:
            self.refusal_status = 414
            raise _Refused
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._awaiting_head:
            # A trailer field (after a chunked body): httptools would add it to the request's
            # headers, where the application would take it for one the client sent up front
            # (an `Authorization` that no proxy saw). No route needs trailers.
            raise _Refused
        self._url_done = True
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_count > MAX_HEADERS or self._header_bytes > self.max_head:
            self.refusal_status = 431
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._url_done = True
        if not self.url.startswith(b"/"):
            # The absolute form (`GET http://other.host/path`), which a client sends to a
            # proxy, and the authority and asterisk forms: this server is no proxy, and its
            # routes would be matched on the path of a URL that names another host.
            raise _Refused
        version = self.parser.get_http_version()
        hosts = sum(1 for name, _ in self.headers if name == b"host")
        if version not in ("1.0", "1.1") or hosts > 1 or (hosts == 0 and version == "1.1"):
            raise _Refused  # HTTP/0.9 or 2 in HTTP/1's syntax; RFC 9112 section 3.2's one Host
        if self.parser.should_upgrade():
            # `Connection: upgrade`: llhttp would take what follows the head for the new
            # protocol's bytes, and a body for the next request. No route upgrades.
            raise _Refused
        if len(self.pipeline) >= MAX_PIPELINED:
            raise _Refused  # a client that pipelines without reading its answers
        try:
            super().on_headers_complete()
        except UnicodeDecodeError:
            raise _Refused from None  # a path that is not ASCII
        # Its headers are complete: the request's own deadlines take over (web/middleware.py).
        self._awaiting_head = False
        self._disarm()

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._messages += 1
        self._awaiting_head = True
        self._head_bytes = 0
        self._url_done = False

    def on_response_complete(self) -> None:
        if self._draining:
            self.pipeline.clear()  # no request waiting in the pipeline starts during a drain
        super().on_response_complete()  # starts the next request of the pipeline, if any
        if self.transport.is_closing():
            self._cut_once_delivered()  # an answer that closed the connection
            return
        if self._busy():
            return
        if self._draining:
            self.transport.close()
        elif self._refusal_pending:
            self._refuse(None)  # every request received before the bad one is answered
        else:
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._cut = True  # ends `_cut_once_delivered` (the socket's number may be reused)
        # uvicorn tells only the request parsed last; the one running may be another.
        running = self._running
        if running is not None and not running.response_complete:
            running.disconnected = True
            running.message_event.set()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Refuse a request the parser could not take (see the module docstring); `msg` is
        uvicorn's fixed text, and the parser's own message is not repeated."""
        cycle = self.cycle
        if self._busy() and not (cycle is self._running and cycle.more_body):
            # Requests received before the one that broke are still being answered: the
            # refusal follows their answers (`on_response_complete`). The broken one, if it is
            # waiting in the pipeline (its body was what broke), never starts.
            if not self._awaiting_head:  # its body broke: it is the request parsed last
                self.pipeline = deque(entry for entry in self.pipeline if entry[0] is not cycle)
            self._refusal_pending = True
            self.flow.pause_reading()
            return
        self._refuse(cycle)

    def _refuse(self, cycle: RequestResponseCycle | None) -> None:
        status = self.refusal_status
        code, detail = REFUSALS[status]
        request_id = new_request_id()
        answer = cycle is None or cycle.response_complete or not cycle.response_started
        if cycle is not None and not cycle.response_complete:
            # The request's body broke the framing while the application reads it: it is told
            # the client has gone, and says nothing more on this connection.
            cycle.disconnected = True
            cycle.message_event.set()
        if answer and not self.transport.is_closing():
            body = json.dumps({"error": code, "detail": detail},
                              separators=(",", ":")).encode()
            head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
                    "content-type: application/json", f"content-length: {len(body)}",
                    "connection: close",
                    *(f"{name}: {value}" for name, value in SECURITY_HEADERS),
                    f"content-security-policy: {API_CSP}", f"x-request-id: {request_id}"]
            self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        log.info("request_refused", status=status, request_id=request_id,
                 ip=self.client[0] if self.client else None)
        self.transport.close()
        self._cut_once_delivered()

    def _cut_once_delivered(self, waited: float = 0.0, quiet: int = 0) -> None:
        """A connection this server closes is dropped once the client has acknowledged every
        byte sent to it (at `_QUIET_STEPS` checks in a row, as in a drain), or after
        `CLOSE_LINGER_MAX` seconds, rather than read from (and decrypted) until the client's TLS
        close_notify or the loop's shutdown timeout: a client that sends without reading had
        4.5 GB read from it in those 5 s (an outside review)."""
        if self._cut:
            return
        quiet = quiet + 1 if self._delivered() else 0
        if quiet >= _QUIET_STEPS or waited >= CLOSE_LINGER_MAX:
            self.cut()
        else:
            self.loop.call_later(CLOSE_LINGER_STEP, self._cut_once_delivered,
                                 waited + CLOSE_LINGER_STEP, quiet)

    # Draining.

    def shutdown(self) -> None:
        """The drain begins: requests waiting in the pipeline are dropped, the one running
        ends the connection when it is answered, an idle connection closes now."""
        self._draining = True
        self.pipeline.clear()
        # (A transport closed twice lets go of its TLS connection, which then can no longer be
        # aborted and lingers until the TLS shutdown times out.)
        if self.transport.is_closing():
            return
        if self._busy():
            self._running.keep_alive = False  # type: ignore[union-attr]
        else:
            self.transport.close()

    def drain(self, now: float) -> None:
        """One step of a graceful shutdown, `now` on the loop's clock.

        A request in flight (its body arriving, the application working, or its response still
        travelling to the client) is left alone, unless its body has slowed to a trickle: then
        the connection is cut. Any other connection (idle keep-alive, headers half sent,
        waiting for the client's TLS close_notify) is closed once the client has acknowledged
        every byte sent to it, which for an idle one is at once.
        """
        if self._cut:
            return
        if self._drain_started is None:
            self._drain_started = now
            self._received_at_drain = self._received
        if self._busy():
            self._quiet_steps = 0
            if self._upload_trickles(now - self._drain_started):
                self.cut()
            return
        if not self.transport.is_closing():
            self.transport.close()  # sends TLS close_notify after whatever is still queued
        if self._delivered():
            self._quiet_steps += 1
        else:
            self._quiet_steps = 0
        # The client's own close_notify is not awaited: an idle client may never read again.
        if self._quiet_steps >= _QUIET_STEPS:
            self.cut()

    def cut(self) -> None:
        """Drop the connection now; a request in flight sees the client disconnect."""
        if not self._cut:
            self._cut = True
            self.transport.abort()

    def _upload_trickles(self, draining_for: float) -> bool:
        running = self._running
        if running is None or not running.more_body or self.flow.read_paused:
            return False  # the body is in, or the application is the one that is slow
        paced = DRAIN_BODY_MIN_RATE * (draining_for - DRAIN_BODY_GRACE)
        return self._received - self._received_at_drain < paced

    def _delivered(self) -> bool:
        if self.flow.write_paused or self.transport.get_write_buffer_size():
            return False
        return _unacknowledged_bytes(self._socket) == 0


def _unacknowledged_bytes(sock: TransportSocket | None) -> int:
    """Bytes the kernel holds for the peer (not yet sent, or not yet acknowledged); 0 where
    the platform cannot tell."""
    if sys.platform != "linux" or sock is None or sock.fileno() < 0:
        return 0
    with contextlib.suppress(OSError):
        # SIOCOUTQ, which Linux also names TIOCOUTQ.
        answer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
        count: int = struct.unpack("i", answer)[0]
        return count
    return 0
