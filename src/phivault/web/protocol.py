"""uvicorn's HTTP/1.1 protocol with a deadline on request headers.

uvicorn closes idle keep-alive connections, but a client that trickles header bytes (slowloris)
or sends nothing after the TLS handshake holds its connection forever, and enough of them fill
`limit_concurrency` so that every other client gets 503. Here every request's headers must be
complete within `HEADER_TIMEOUT` seconds of the connection opening (or of the previous response
ending), or the connection is closed. The body's own deadline is in `web/middleware.py`.
"""

from __future__ import annotations

import asyncio
import os

from uvicorn.protocols.http.h11_impl import H11Protocol

# Read from the environment (validated by Settings as PHIVAULT_HEADER_TIMEOUT) so that every
# worker process, which imports this module anew, applies the same deadline.
HEADER_TIMEOUT = float(os.environ.get("PHIVAULT_HEADER_TIMEOUT", "15"))


class DeadlineH11Protocol(H11Protocol):
    _header_deadline: asyncio.TimerHandle | None = None
    _seen_cycle: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
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
