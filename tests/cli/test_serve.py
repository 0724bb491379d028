"""`phivault serve` for real: HTTPS with TLS 1.3 only, security headers, SIGTERM drains."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from phivault.crypto.tls import write_self_signed_certificate
from tests.helpers import (
    cli_env,
    client_context,
    free_port,
    phivault_command,
    run_cli,
    wait_listening,
)


@pytest.fixture
def server(fresh_runtime: Callable[..., Any], tmp_path: Path
           ) -> Iterator[Callable[..., Any]]:
    processes: list[subprocess.Popen[str]] = []

    async def start(**extra: str) -> tuple[int, Path, subprocess.Popen[str]]:
        rt = await fresh_runtime()
        start.runtimes.append(rt)  # type: ignore[attr-defined]
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        write_self_signed_certificate(cert, key)
        port = free_port()
        env = cli_env(rt, PHIVAULT_TLS_CERT_FILE=str(cert), PHIVAULT_TLS_KEY_FILE=str(key),
                      **extra)
        process = subprocess.Popen(
            phivault_command("serve", "--host", "127.0.0.1", "--port", str(port)),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        processes.append(process)
        wait_listening(port, process)
        return port, cert, process

    start.runtimes = []  # type: ignore[attr-defined]
    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)  # reaps it and closes its pipes


async def test_tls13_served_tls12_refused_sigterm_drains(server: Callable[..., Any]) -> None:
    port, cert, process = await server()
    url = f"https://127.0.0.1:{port}/healthz"

    with httpx.Client(verify=client_context(cert)) as client:
        response = client.get(url)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["strict-transport-security"].startswith("max-age=31536000")
    assert "server" not in response.headers

    with socket.create_connection(("127.0.0.1", port)) as raw, \
            client_context(cert).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() == "TLSv1.3"

    with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", port)) as raw:
        client_context(cert, maximum=ssl.TLSVersion.TLSv1_2).wrap_socket(
            raw, server_hostname="127.0.0.1")

    with pytest.raises(httpx.RemoteProtocolError), httpx.Client() as plain:
        plain.get(f"http://127.0.0.1:{port}/healthz")

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


async def test_behind_proxy_refuses_public_host(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    result = run_cli("serve", "--host", "0.0.0.0", "--port", str(free_port()),  # noqa: S104
                     env=cli_env(rt, PHIVAULT_BEHIND_PROXY="true"), timeout=30)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "phivault: PHIVAULT_BEHIND_PROXY=true serves plain HTTP and binds loopback only; "
        "--host 0.0.0.0 is not a loopback address"]


async def test_serve_without_certificate_exits_2(fresh_runtime: Callable[..., Any],
                                                 tmp_path: Path) -> None:
    rt = await fresh_runtime()
    result = run_cli("serve", "--port", str(free_port()), env=cli_env(
        rt, PHIVAULT_TLS_CERT_FILE=str(tmp_path / "missing.pem"),
        PHIVAULT_TLS_KEY_FILE=str(tmp_path / "missing-key.pem")), timeout=30)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("phivault: PHIVAULT_TLS_CERT_FILE: ")


async def test_behind_proxy_serves_http_on_loopback_and_believes_the_proxy(
        server: Callable[..., Any]) -> None:
    from sqlalchemy import select

    from phivault.audit.models import AuditEvent
    from tests.factories import bearer

    port, _, process = await server(PHIVAULT_BEHIND_PROXY="true")
    rt = server.runtimes[-1]  # type: ignore[attr-defined]
    with httpx.Client() as client:
        response = client.get(f"http://127.0.0.1:{port}/api/v1/audit/verify", headers={
            **(await bearer(rt, "auditor")), "X-Forwarded-For": "6.6.6.6, 198.51.100.23"})
    assert response.status_code == 200, response.text
    await rt.sequencer.drain()  # the server chains in the background; a reader drains first
    async with rt.sessions() as session:
        event = (await session.execute(select(AuditEvent).where(
            AuditEvent.request_id == response.headers["x-request-id"]))).scalar_one()
    assert event.ip == "198.51.100.23"


async def test_slow_headers_are_cut_off(server: Callable[..., Any]) -> None:
    """Slowloris: a client that trickles its headers loses its connection at the deadline,
    and the server keeps answering others."""
    port, cert, _ = await server(PHIVAULT_HEADER_TIMEOUT="1")
    context = client_context(cert)
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 5:
            try:
                tls.sendall(b"X-Slow: 1\r\n")
                tls.settimeout(0.4)
                if tls.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError):
                closed = True
                break
        assert closed and time.monotonic() - started < 3
    with httpx.Client(verify=client_context(cert)) as client:
        assert client.get(f"https://127.0.0.1:{port}/healthz").status_code == 200
