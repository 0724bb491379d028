"""`phivault serve` stopping for real (SPEC §12): SIGTERM drains and exits 0 whatever clients keep
open, a second Ctrl-C exits at once, the TLS handshake is bounded, and `--workers N` replaces a
worker that dies.

Each test runs a real server process over TLS. Bounds are generous (the machine may be loaded):
each one sits well below what the server did before it was hardened (30 s for a drain with an
idle client, 60 s for a silent TCP connection).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from phivault.crypto.tls import write_self_signed_certificate
from tests.helpers import cli_env, client_context, free_port, phivault_command, run_cli

# The transport does not depend on the database: these servers run on SQLite only.
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["sqlite"], indirect=True)]

# "Within a few seconds" (SPEC §12), with room for a loaded machine.
PROMPTLY = 10.0


@dataclass
class Served:
    port: int
    cert: Path
    process: subprocess.Popen[bytes]
    log: Path

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def client(self) -> httpx.Client:
        return httpx.Client(verify=client_context(self.cert), timeout=30)

    def tls(self, *, receive_buffer: int | None = None) -> ssl.SSLSocket:
        raw = socket.socket()
        if receive_buffer is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        raw.settimeout(30)
        raw.connect(("127.0.0.1", self.port))
        return client_context(self.cert).wrap_socket(raw, server_hostname="127.0.0.1")

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8")

    def stop_within(self, seconds: float, sig: signal.Signals = signal.SIGTERM) -> int:
        """Sends `sig` and returns the exit status, failing if the server takes longer."""
        self.process.send_signal(sig)
        return self.exit_within(seconds)

    def exit_within(self, seconds: float) -> int:
        try:
            return self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {seconds} s:\n{self.stderr()}") from None


@pytest.fixture
async def serve(fresh_runtime: Callable[..., Any], tmp_path: Path
                ) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    processes: list[subprocess.Popen[bytes]] = []

    async def start(*args: str, **extra: str) -> Served:
        rt = await fresh_runtime()
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        write_self_signed_certificate(cert, key)
        port = free_port()
        log = tmp_path / f"serve-{port}.log"
        env = cli_env(rt, PHIVAULT_TLS_CERT_FILE=str(cert), PHIVAULT_TLS_KEY_FILE=str(key),
                      **extra)
        with log.open("wb") as stderr:
            # A session of its own: the teardown can reach the workers, and a Ctrl-C in the
            # terminal that runs the tests does not reach the server.
            process = subprocess.Popen(
                phivault_command("serve", "--host", "127.0.0.1", "--port", str(port), *args),
                env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        processes.append(process)
        served = Served(port, cert, process, log)
        _wait_answering(served)
        return served

    yield start
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _wait_answering(served: Served, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise AssertionError(f"server exited {served.process.returncode}:\n"
                                 f"{served.stderr()}")
        try:
            with served.client() as client:
                if client.get(served.url("/healthz"), timeout=2).status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server did not answer:\n{served.stderr()}")


def _closed_within(tls: ssl.SSLSocket, seconds: float) -> bool:
    """Reads until the server ends the connection; False if it is still open after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tls.settimeout(max(0.05, min(0.5, deadline - time.monotonic())))
        try:
            if tls.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except (ssl.SSLError, OSError):
            return True
    return False


def _login_request(length: int) -> bytes:
    return (b"POST /api/v1/auth/login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n\r\n")


def _padded_login_body(size: int) -> bytes:
    """A login body of `size` bytes that the API reads in full and refuses (422)."""
    head = b'{"email": "a@example.org", "password": "x", "pad": "'
    return head + b"a" * (size - len(head) - 2) + b'"}'


def _upload(tls: ssl.SSLSocket, body: bytes, *, chunk: int = 16 * 1024,
            pause: float = 0.1, stop: threading.Event | None = None) -> bool:
    """Sends `body` at an honest pace (about 160 KiB/s); False if the server cut it."""
    for offset in range(0, len(body), chunk):
        if stop is not None and stop.is_set():
            return False
        try:
            tls.sendall(body[offset:offset + chunk])
        except (ssl.SSLError, OSError):
            return False
        time.sleep(pause)
    return True


def _refuses_connections_within(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


async def test_sigterm_closes_idle_connections_at_once(
        serve: Callable[..., Awaitable[Served]]) -> None:
    """An idle keep-alive client, a TLS connection that never sends a request and one that
    trickles its headers do not hold the stop up: exit 0 within a few seconds."""
    served = await serve()
    with served.client() as keep_alive, served.tls() as silent, served.tls() as trickling:
        assert keep_alive.get(served.url("/healthz")).status_code == 200  # kept in the pool
        trickling.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.monotonic()
        assert served.stop_within(PROMPTLY) == 0
        assert time.monotonic() - started < PROMPTLY
        assert _closed_within(silent, 1) and _closed_within(trickling, 1)
    assert "Traceback" not in served.stderr()


async def test_sigterm_cuts_a_trickled_body(serve: Callable[..., Awaitable[Served]]) -> None:
    """A client that trickles a request body (a byte now and then) is cut once the drain has
    started, and the server exits 0 promptly."""
    served = await serve()
    with served.tls() as tls:
        tls.sendall(_login_request(100_000) + b'{"email": ')
        time.sleep(0.5)  # the request is in: its body is what trickles
        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        cut = False
        while time.monotonic() - started < PROMPTLY:
            try:
                tls.sendall(b" ")
            except (ssl.SSLError, OSError):
                cut = True
                break
            if _closed_within(tls, 0.3):
                cut = True
                break
        assert cut, "the trickling upload was not cut"
        assert served.exit_within(PROMPTLY) == 0
        assert time.monotonic() - started < PROMPTLY


async def test_sigterm_lets_an_upload_in_flight_finish(
        serve: Callable[..., Awaitable[Served]]) -> None:
    """A request whose body arrives at an honest pace when SIGTERM comes gets its answer;
    meanwhile the server accepts no new connection; then it exits 0."""
    served = await serve()
    body = _padded_login_body(600 * 1024)
    with served.tls() as tls:
        tls.sendall(_login_request(len(body)))
        assert _upload(tls, body[:64 * 1024])
        time.sleep(0.5)  # the server has the request: it is in flight
        served.process.send_signal(signal.SIGTERM)
        assert _refuses_connections_within(served.port, 5)
        assert _upload(tls, body[64 * 1024:]), "the honest upload was cut"
        response = http.client.HTTPResponse(tls)
        response.begin()
        assert response.status == 422
        assert json.loads(response.read())["fields"][0]["field"] == "body.pad"
        assert served.exit_within(PROMPTLY) == 0


async def test_sigterm_waits_for_a_slow_reader(serve: Callable[..., Awaitable[Served]]) -> None:
    """A response still on its way to a slow reader is delivered in full before the
    connection closes; then the server exits 0."""
    served = await serve()
    with served.client() as client:
        expected = client.get(served.url("/openapi.json")).content
    assert len(expected) > 32 * 1024
    with served.tls(receive_buffer=4096) as tls:
        tls.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = tls.recv(1024)  # the answer has begun: the request is in flight
        served.process.send_signal(signal.SIGTERM)
        while True:
            time.sleep(0.05)
            try:
                chunk = tls.recv(4096)
            except (ssl.SSLError, OSError):
                break
            if not chunk:
                break
            received += chunk
            if len(received) > len(expected) + 4096:
                break
        started = time.monotonic()
        head, _, content = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert content == expected
        assert served.exit_within(PROMPTLY) == 0
        assert time.monotonic() - started < PROMPTLY


async def test_second_interrupt_exits_at_once_without_traceback(
        serve: Callable[..., Awaitable[Served]]) -> None:
    """Ctrl-C drains like SIGTERM; a second Ctrl-C while a request is in flight exits at once,
    with 130, and logs one line rather than the cancelled request's traceback."""
    served = await serve()
    body = _padded_login_body(900 * 1024)
    stop = threading.Event()
    with served.tls() as tls:
        tls.sendall(_login_request(len(body)))
        uploader = threading.Thread(target=_upload, args=(tls, body), kwargs={"stop": stop},
                                    daemon=True)
        uploader.start()
        try:
            time.sleep(0.5)
            served.process.send_signal(signal.SIGINT)
            time.sleep(1)
            assert served.process.poll() is None, "the first Ctrl-C did not wait for the upload"
            started = time.monotonic()
            assert served.stop_within(PROMPTLY, signal.SIGINT) == 130
            assert time.monotonic() - started < 5
        finally:
            stop.set()
            uploader.join(timeout=30)
    log = served.stderr()
    assert "forced_exit" in log
    assert "Traceback" not in log and "CancelledError" not in log


async def test_tls_handshake_is_bounded(serve: Callable[..., Awaitable[Served]]) -> None:
    """TCP connections that never start TLS are closed after PHIVAULT_TLS_HANDSHAKE_TIMEOUT,
    and the server answers others meanwhile."""
    served = await serve(PHIVAULT_TLS_HANDSHAKE_TIMEOUT="1")
    silent = [socket.create_connection(("127.0.0.1", served.port), timeout=30)
              for _ in range(20)]
    try:
        started = time.monotonic()
        with served.client() as client:
            assert client.get(served.url("/healthz")).status_code == 200
        for sock in silent:
            sock.settimeout(max(0.1, started + PROMPTLY - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):  # closed, as a reset
                assert sock.recv(1) == b""
        assert time.monotonic() - started < PROMPTLY
        with served.client() as client:
            assert client.get(served.url("/healthz")).status_code == 200
    finally:
        for sock in silent:
            sock.close()
    assert served.stop_within(PROMPTLY) == 0


async def test_tls_handshake_timeout_is_validated(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    result = run_cli("serve", "--port", str(free_port()),
                     env=cli_env(rt, PHIVAULT_TLS_HANDSHAKE_TIMEOUT="0"), timeout=30)
    assert result.returncode == 2
    assert "PHIVAULT_TLS_HANDSHAKE_TIMEOUT" in result.stderr


def _workers(supervisor: int) -> set[int]:
    """The supervisor's worker processes (multiprocessing's resource tracker is not one)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        if parent == supervisor and b"spawn_main" in command:
            found.add(int(entry.name))
    return found


def _poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)


async def test_workers_replace_a_killed_worker_and_drain_on_sigterm(
        serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve("--workers", "2")
    supervisor = served.process.pid
    _poll(lambda: served.stderr().count('"event": "worker_serving"') == 2, 60,
          "two workers serve")
    first, second = sorted(_workers(supervisor))

    os.kill(first, signal.SIGKILL)
    _poll(lambda: first not in _workers(supervisor), 30, "the killed worker is gone")
    for _ in range(5):  # each on a new connection: the surviving worker answers
        with served.client() as client:
            assert client.get(served.url("/healthz")).status_code == 200
    _poll(lambda: len(_workers(supervisor)) == 2, 60, "a new worker replaces the killed one")
    workers = _workers(supervisor)
    (replacement,) = workers - {second}
    assert replacement != first
    _poll(lambda: f'"pid": {replacement}, "event": "worker_serving"' in served.stderr(), 60,
          "the new worker serves")
    assert f'"pid": {first}, "exit_code": -9, "event": "worker_died"' in served.stderr()
    _wait_answering(served)

    with served.client() as keep_alive:
        assert keep_alive.get(served.url("/healthz")).status_code == 200
        started = time.monotonic()
        assert served.stop_within(PROMPTLY + 5) == 0
        assert time.monotonic() - started < PROMPTLY + 5
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # stopped and reaped
    assert "Traceback" not in served.stderr()
