"""A real SMTP server for the mail tests: aiosmtpd, in a thread of its own, on a free loopback
port. It keeps every message it accepts, and can offer STARTTLS, speak implicit TLS, require a
login, or refuse some recipients."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from phivault.crypto.tls import server_ssl_context, write_self_signed_certificate
from tests.helpers import free_port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool
    login: str | None

    @property
    def text(self) -> str:
        body = self.message.get_body(("plain",))
        assert body is not None
        return str(body.get_content())


@dataclass
class Inbox:
    """The aiosmtpd handler: what arrived, in order."""

    refuse: set[str] = field(default_factory=set)  # recipients answered 550
    received: list[Received] = field(default_factory=list)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address in self.refuse:
            return "550 5.1.1 No such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        login = session.auth_data.login.decode() if isinstance(session.auth_data,
                                                               LoginPassword) else None
        # STARTTLS sets the session's `ssl`; implicit TLS shows on the transport.
        transport = server.transport
        tls = session.ssl is not None or (
            transport is not None and transport.get_extra_info("ssl_object") is not None)
        self.received.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                      message, tls, login))
        return "250 Message accepted"

    def to(self, address: str) -> list[Received]:
        return [r for r in self.received if address in r.rcpt_tos]


@dataclass
class SmtpServer:
    inbox: Inbox
    port: int
    cert: Path | None

    def url(self, scheme: str = "smtp", credentials: str = "") -> str:
        return f"{scheme}://{credentials}127.0.0.1:{self.port}"


def tls_files(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    if not cert.exists():
        write_self_signed_certificate(cert, key)
    return cert, key


@contextmanager
def smtp_server(*, tls_dir: Path | None = None, implicit_tls: bool = False,
                login: tuple[str, str] | None = None,
                refuse: set[str] | None = None) -> Iterator[SmtpServer]:
    """Serve SMTP on 127.0.0.1. With `tls_dir`: a self-signed certificate for localhost made
    there, offered by STARTTLS (required), or from the first byte with `implicit_tls`. With
    `login`: AUTH is required (and only over TLS)."""
    inbox = Inbox(refuse=refuse or set())
    options: dict[str, Any] = {}
    cert = None
    if tls_dir is not None:
        cert, key = tls_files(tls_dir)
        context = server_ssl_context(cert, key)
        if implicit_tls:
            options["ssl_context"] = context
        else:
            options.update(tls_context=context, require_starttls=True)
    if login is not None:
        def authenticate(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                         auth_data: Any) -> AuthResult:
            ok = (isinstance(auth_data, LoginPassword)
                  and (auth_data.login.decode(), auth_data.password.decode()) == login)
            return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)
        # aiosmtpd counts only STARTTLS as TLS for AUTH; implicit TLS is TLS from the start.
        options.update(authenticator=authenticate, auth_required=True,
                       auth_require_tls=not implicit_tls)
    # The server's own log quotes every command (addresses too): quiet, so that the tests'
    # scans of phivault's logs read phivault's lines only.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield SmtpServer(inbox, port, cert)
    finally:
        controller.stop()


def trusting(cert: Path) -> ssl.SSLContext:
    """A client context that trusts the test server's self-signed certificate."""
    return ssl.create_default_context(cafile=str(cert))
