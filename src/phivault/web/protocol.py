"""uvicorn's HTTP/1.1 protocol with a deadline on request headers, and its part in a drain.

uvicorn closes idle keep-alive connections, but a client that trickles header bytes (slowloris)
or sends nothing after the TLS handshake holds its connection forever, and enough of them fill
`limit_concurrency` so that every other client gets 503. Here every request's headers must be
complete within `HEADER_TIMEOUT` seconds of the connection opening (or of the previous response
ending), or the connection is closed. The body's own deadline is in `web/middleware.py`.

When the server drains (`web/server.py`), it asks each connection ten times a second to `drain`:
a connection with nothing in flight closes as soon as the client has received every byte sent to
it, and an upload that has slowed to a trickle is cut.

A request that breaks HTTP/1.1's framing, whose URL or header section is longer than
`h11_max_incomplete_event_size`, or which has more than `MAX_HEADERS` header fields, is refused
here, before any application code, as the rest of the API refuses: a JSON
`{"error", "detail"}` with the security headers and a request id, 414 when the request line
alone is too long, 431 for the header section, 400 for anything else; then the connection
closes. uvicorn's own answer is a `text/plain` 400 without any of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import os
import struct
import sys
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

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
# The longest URL, and the largest header section, unless uvicorn's config sets another
# (`h11_max_incomplete_event_size`; `phivault serve` sets 16 KiB).
MAX_HEAD = 16 * 1024
# The codes and sentences are the API's own (web/errors.py, which the OpenAPI document lists).
REFUSALS = {status: FRAMEWORK_CODES[status] for status in (400, 414, 431)}

log = get_logger("phivault.access")


class _GuardedConnection(h11.Connection):
    """h11's connection, which also bounds a request it parsed whole: h11 bounds only the
    part of a head it still waits for, so a larger head that arrives in one read passes. It
    keeps the status its last refusal calls for (uvicorn's handler drops h11's error)."""

    refusal_status = 400

    def __init__(self, our_role: type[h11.SERVER], max_head: int) -> None:
        super().__init__(our_role, max_incomplete_event_size=max_head)
        self.max_head = max_head

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal_status = 400
            if exc.error_status_hint == 431:
                # A head too large to wait for: the URL's fault when the request line has not
                # ended within the limit.
                line_end = self.trailing_data[0].find(b"\n")
                self.refusal_status = 414 if not 0 <= line_end <= self.max_head else 431
            raise
        if isinstance(event, h11.Request):
            if len(event.target) > self.max_head:
                self.refusal_status = 414
            elif len(event.headers) > MAX_HEADERS or sum(
                    len(name) + len(value) + 4 for name, value in event.headers) > self.max_head:
                self.refusal_status = 431
            else:
                return event
            raise h11.RemoteProtocolError("request head too large",
                                          error_status_hint=self.refusal_status)
        return event


class DeadlineH11Protocol(H11Protocol):
    _header_deadline: asyncio.TimerHandle | None = None
    _seen_cycle: object = None
    _received = 0
    _drain_started: float | None = None
    _received_at_drain = 0
    _quiet_steps = 0
    _cut = False
    _socket: TransportSocket | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size
        self.conn = _GuardedConnection(h11.SERVER, size if size is not None else MAX_HEAD)

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

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        super().data_received(data)
        # A new request cycle means its headers are complete.
        if self.cycle is not None and self.cycle is not self._seen_cycle:
            self._seen_cycle = self.cycle
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Refuse a request h11 could not take (see the module docstring); `msg` is uvicorn's
        fixed text, and h11's own message is not repeated (it may quote the request)."""
        status = getattr(self.conn, "refusal_status", 400)
        code, detail = REFUSALS[status]
        request_id = new_request_id()
        if self.cycle is not None and not self.cycle.response_complete:
            # The request's body broke the framing while the application reads it: it is told
            # the client has gone, and says nothing more on this connection.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = json.dumps({"error": code, "detail": detail},
                              separators=(",", ":")).encode()
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close"),
                       *((name.encode(), value.encode()) for name, value in SECURITY_HEADERS),
                       (b"content-security-policy", API_CSP.encode()),
                       (b"x-request-id", request_id.encode())]
            with contextlib.suppress(h11.LocalProtocolError):
                self.transport.write(
                    (self.conn.send(h11.Response(status_code=status, headers=headers,
                                                 reason=http.HTTPStatus(status).phrase)) or b"")
                    + (self.conn.send(h11.Data(data=body)) or b"")
                    + (self.conn.send(h11.EndOfMessage()) or b""))
        log.info("request_refused", status=status, request_id=request_id,
                 ip=self.client[0] if self.client else None)
        self.transport.close()

    # Draining.

    def shutdown(self) -> None:
        # uvicorn closes an idle connection here even when it is closing already, and asyncio's
        # TLS transport, closed twice, lets go of its connection, which then can no longer be
        # aborted and lingers until the TLS shutdown times out (30 s).
        if not self.transport.is_closing():
            super().shutdown()

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
        if self.cycle is not None and not self.cycle.response_complete:
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
        if not self.cycle.more_body or self.flow.read_paused:
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
