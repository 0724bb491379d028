"""The drain of `web/server.py`, in process: a connection closes only once the client has every
byte sent to it, a large response to a slow reader arrives whole, and what is still in flight at
the deadline is cut, without a traceback.

`phivault serve` waits 30 s for requests in flight (SPEC §12); here the server runs in a thread
with test applications and, for the deadline, a 1 s deadline. tests/cli/test_shutdown.py drives
the real command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from phivault.crypto.tls import write_self_signed_certificate
from phivault.web.protocol import GuardedHttpProtocol
from phivault.web.server import PhivaultServer
from tests.helpers import client_context, free_port


async def _never_ending(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"still working", "more_body": True})
    await asyncio.sleep(3600)


LARGE = 8 * 1024 * 1024


async def _large(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(LARGE).encode())]})
    await send({"type": "http.response.body", "body": b"x" * LARGE})


def _start(app: Any, **options: Any) -> tuple[PhivaultServer, threading.Thread, int]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                            http=GuardedHttpProtocol, ws="none", log_config=None, **options)
    server = PhivaultServer(config, tls_handshake_timeout=5)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    return server, thread, port


def test_a_slow_reader_gets_the_whole_response(tmp_path: Path) -> None:
    """More than the kernel buffers: the tail waits in the server's own buffers, which a
    close that did not wait for the client's acknowledgements would drop."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed_certificate(cert, key)
    server, thread, port = _start(_large, ssl_certfile=str(cert), ssl_keyfile=str(key),
                                  timeout_graceful_shutdown=30)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    raw.settimeout(30)
    raw.connect(("127.0.0.1", port))
    with client_context(cert).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = tls.recv(4096)
        server.should_exit = True
        while True:
            try:
                chunk = tls.recv(256 * 1024)
            except (ssl.SSLError, OSError):
                break
            if not chunk:
                break
            received += chunk
            time.sleep(0.002)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(received.partition(b"\r\n\r\n")[2]) == LARGE


def test_the_drain_deadline_cuts_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server, thread, port = _start(_never_ending, timeout_graceful_shutdown=1)

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        while b"still working" not in received:  # the request is in flight
            chunk = sock.recv(4096)
            assert chunk, "the server closed the connection"
            received += chunk
        started = time.monotonic()
        server.should_exit = True
        thread.join(timeout=20)
        assert not thread.is_alive(), "the server outlived its drain deadline"
        assert time.monotonic() - started < 20
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # the response never completes: cut
            assert sock.recv(4096) == b""

    cancelled = [r for r in caplog.records
                 if r.exc_info and isinstance(r.exc_info[1], asyncio.CancelledError)]
    assert not cancelled, "a cut request logged a traceback"
    assert any("Cancel 1 running task" in r.getMessage() for r in caplog.records)


class _Transport:
    """Just enough of an asyncio transport over a real socket for the protocol's drain."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closing = False
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"socket": self.sock, "sockname": self.sock.getsockname(),
                "peername": self.sock.getpeername()}.get(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)


def _connected(accepted: socket.socket, loop: asyncio.AbstractEventLoop
               ) -> tuple[GuardedHttpProtocol, _Transport]:
    """The server's protocol on `accepted`, outside any server, for a test to drive."""
    config = uvicorn.Config(_never_ending, http=GuardedHttpProtocol, lifespan="off",
                            log_config=None)
    protocol = GuardedHttpProtocol(config=config, server_state=ServerState(), app_state={},
                                   _loop=loop)
    transport = _Transport(accepted)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


def test_an_idle_connection_closes_once_the_client_has_every_byte() -> None:
    """The drain drops a connection only when the kernel holds nothing more for the client:
    dropping it earlier may lose the end of a response (or reset the connection)."""
    loop = asyncio.new_event_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        with client, accepted:
            accepted.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:  # the client reads nothing: the kernel fills up
                    accepted.send(b"x" * 65536)
            protocol, transport = _connected(accepted, loop)
            for step in range(5):
                protocol.drain(step * 0.1)
            assert transport.closing and not transport.aborted

            client.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                while client.recv(65536):
                    pass
            protocol.drain(1.0)
            protocol.drain(1.1)
            assert transport.aborted
            protocol.connection_lost(None)
    loop.close()


def test_a_drain_drops_the_requests_waiting_in_the_pipeline() -> None:
    """A drain answered a connection's whole pipeline (20,000 requests over 17 s, an outside
    review): now the request running is answered and the connection then closes."""
    loop = asyncio.new_event_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with client, accepted:
            protocol, transport = _connected(accepted, loop)
            protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
            assert len(protocol.pipeline) == 3  # one running, three waiting
            protocol.shutdown()
            assert not protocol.pipeline
            protocol.drain(0.0)
            assert not transport.closing  # the running request is left to finish
            protocol.connection_lost(None)
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()


def test_the_running_request_hears_of_a_lost_connection_with_another_queued() -> None:
    """uvicorn tells only the request parsed last: with one waiting in the pipeline, the one
    running streamed on to a dead connection (an outside review)."""
    loop = asyncio.new_event_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with client, accepted:
            protocol, _transport = _connected(accepted, loop)
            protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
            running = protocol._running  # the first request's cycle (the second waits)
            assert running is not None and running is not protocol.cycle
            protocol.connection_lost(None)
            assert running.disconnected and running.message_event.is_set()
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
