"""uvicorn's HTTP/1.1 protocol with a deadline on request headers, and its part in a drain.

uvicorn closes idle keep-alive connections, but a client that trickles header bytes (slowloris)
or sends nothing after the TLS handshake holds its connection forever, and enough of them fill
`limit_concurrency` so that every other client gets 503. Here every request's headers must be
complete within `HEADER_TIMEOUT` seconds of the connection opening (or of the previous response
ending), or the connection is closed. The body's own deadline is in `web/middleware.py`.

When the server drains (`web/server.py`), it asks each connection ten times a second to `drain`:
a connection with nothing in flight closes as soon as the client has received every byte sent to
it, and an upload that has slowed to a trickle is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import sys
from typing import TYPE_CHECKING

from uvicorn.protocols.http.h11_impl import H11Protocol

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



class DeadlineH11Protocol(H11Protocol):
    _header_deadline: asyncio.TimerHandle | None = None
    _seen_cycle: object = None
    _received = 0
    _drain_started: float | None = None
    _received_at_drain = 0
    _quiet_steps = 0
    _cut = False
    _socket: TransportSocket | None = None

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
