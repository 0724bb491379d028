"""The server of `phivault serve`: uvicorn's, with a bounded TLS handshake and a drain that ends.

SIGTERM (or a first Ctrl-C) drains: the server stops accepting, closes idle keep-alive
connections at once, cuts uploads that trickle, lets requests in flight finish for at most
`DRAIN_TIMEOUT` seconds, cuts whatever is left, and returns, so the command exits 0 within a few
seconds when nothing is in flight, whatever clients keep open. A second Ctrl-C exits at once,
with status 130 and without tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn
import uvloop

from phivault.observability import get_logger
from phivault.web.protocol import GuardedHttpProtocol

log = get_logger("phivault.server")

# How long requests in flight may take to finish once a drain starts (SPEC §12).
DRAIN_TIMEOUT = 30
# The exit status of a stop forced by a second Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130
# How long a closing TLS connection waits for the client's close_notify (a refused request's
# connection held a concurrency slot for the default 30 s).
TLS_SHUTDOWN_TIMEOUT = 5.0
_DRAIN_STEP = 0.1


class _BoundedHandshakeLoop(uvloop.Loop):
    """uvloop's event loop (libuv; its TLS and sockets cost a request a tenth less CPU than
    asyncio's), whose TLS servers give a client `tls_handshake_timeout` seconds to finish its
    handshake and `TLS_SHUTDOWN_TIMEOUT` seconds to answer the server's close_notify: the
    defaults are 60 s and 30 s, uvicorn passes neither, and a connection in either is not
    counted by `limit_concurrency`.

    Every worker waits on the one listening socket. asyncio's loop accepted every waiting
    connection at each wake-up, so the first worker to wake took a whole burst (a load
    balancer's pool, wrk's 32) and served it while the others idled; libuv accepts one
    connection per wake-up (libuv 1.52, in uvloop 0.23: bursts of 64 connections split 34/30,
    30/34 and 26/38 between two workers), and the workers share a burst."""

    def __init__(self, tls_handshake_timeout: float) -> None:
        super().__init__()
        self.tls_handshake_timeout = tls_handshake_timeout

    async def create_server(self, *args: Any, **kwargs: Any) -> Any:  # uvloop's Server
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", self.tls_handshake_timeout)
            kwargs.setdefault("ssl_shutdown_timeout", TLS_SHUTDOWN_TIMEOUT)
        return await super().create_server(*args, **kwargs)


class _QuietCancellation(logging.Filter):
    """Requests cut at the drain deadline are announced once (by uvicorn and by the drain), not
    with one "Exception in ASGI application" traceback each."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


class PhivaultServer(uvicorn.Server):
    """uvicorn's server with a drain that ends (see the module docstring).

    `on_started` is called once the server listens; with `parent_pid`, the server drains as soon
    as that process (its supervisor) is gone, instead of serving on as an orphan.
    """

    def __init__(self, config: uvicorn.Config, *, tls_handshake_timeout: float,
                 on_started: Callable[[], None] | None = None,
                 parent_pid: int | None = None) -> None:
        super().__init__(config)
        self.tls_handshake_timeout = tls_handshake_timeout
        self.on_started = on_started
        self.parent_pid = parent_pid
        uvicorn_log = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _QuietCancellation) for f in uvicorn_log.filters):
            uvicorn_log.addFilter(_QuietCancellation())

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        factory = functools.partial(_BoundedHandshakeLoop, self.tls_handshake_timeout)
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self.serve(sockets=sockets))

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def on_tick(self, counter: int) -> bool:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.should_exit = True
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the caught signal after its drain, so that its default action ends
        # the process; here the drain is the whole stop, and the command exits 0 after it.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self._exit_at_once()
        self.should_exit = True

    def _exit_at_once(self) -> None:
        # Whatever is cut here is safe to lose: a request commits its changes and their audit
        # events in one transaction, or nothing.
        log.warning("forced_exit", requests_cut=len(self.server_state.tasks))
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.create_task(self._drain())
        try:
            await super().shutdown(sockets=sockets)
        finally:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain

    async def _drain(self) -> None:
        """Runs beside uvicorn's shutdown, which waits for the connections and requests to end
        and cancels the requests still running at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.timeout_graceful_shutdown or DRAIN_TIMEOUT)
        announced = False
        failed: set[int] = set()
        while True:
            now = loop.time()
            connections = [c for c in self.server_state.connections
                           if isinstance(c, GuardedHttpProtocol) and id(c) not in failed]
            if now >= deadline and connections and not announced:
                log.warning("drain_deadline", connections_cut=len(connections))
                announced = True
            for connection in connections:
                try:
                    if now >= deadline:
                        connection.cut()
                    else:
                        connection.drain(now)
                except Exception as exc:  # noqa: BLE001 (one connection must not stop the drain)
                    # Left to uvicorn's deadline; logged once, not ten times a second.
                    failed.add(id(connection))
                    log.error("drain_error", error_type=type(exc).__name__)
            await asyncio.sleep(_DRAIN_STEP)
