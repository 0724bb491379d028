"""The SMTP server phivault mails through: the forms of `PHIVAULT_SMTP_URL`, and sending one
message with the standard library's `smtplib` (blocking: `mail.py` runs it in a worker thread).

Three forms, so that how the connection is protected is never a guess:

- `smtp://host[:port]` (port 25): no TLS and no credentials, for a relay on the same host or a
  private network (prod refuses it unless the host is loopback: `config.py`).
- `smtp+starttls://[user:password@]host[:port]` (port 587): STARTTLS is required; a server that
  does not offer it fails the delivery rather than send in clear.
- `smtps://[user:password@]host[:port]` (port 465): implicit TLS from the first byte.

TLS verifies the server's certificate and host name against the system's CAs (OpenSSL also
reads `SSL_CERT_FILE`). User and password are percent-decoded; credentials on plain `smtp://`
are refused, since they would cross the network in clear.
"""

from __future__ import annotations

import ipaddress
import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Literal
from urllib.parse import unquote, urlsplit

Security = Literal["plain", "starttls", "tls"]
SCHEMES: dict[str, tuple[Security, int]] = {
    "smtp": ("plain", 25),
    "smtp+starttls": ("starttls", 587),
    "smtps": ("tls", 465),
}
TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    """Where and how to connect. The password never shows in a `repr`."""

    host: str
    port: int
    security: Security
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> SmtpTarget:
        """Parse a `PHIVAULT_SMTP_URL`. A `ValueError` says what is wrong, never quoting the
        URL (it may hold a password)."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            raise ValueError("is not a valid URL (smtp://host:port, smtp+starttls://... or "
                             "smtps://...)") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError("must start with smtp://, smtp+starttls:// or smtps://")
        security, default_port = SCHEMES[scheme]
        if not parts.hostname:
            raise ValueError("names no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("takes no path, query or fragment")
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        if (username is None) != (password is None) or username == "":
            raise ValueError("credentials must be given as user:password@")
        if username is not None and security == "plain":
            raise ValueError("sends credentials only over TLS: use smtps:// or smtp+starttls://")
        return cls(parts.hostname, port or default_port, security, username, password)

    @property
    def is_loopback(self) -> bool:
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def send_message(target: SmtpTarget, message: EmailMessage, *,
                 ssl_context: ssl.SSLContext | None = None,
                 timeout: float = TIMEOUT_SECONDS) -> None:
    """Deliver `message` to the server (blocking). Raises `OSError` (including `ssl.SSLError`)
    or `smtplib.SMTPException` when it cannot."""
    context = ssl_context or ssl.create_default_context()
    client: smtplib.SMTP
    if target.security == "tls":
        client = smtplib.SMTP_SSL(target.host, target.port, timeout=timeout, context=context)
    else:
        client = smtplib.SMTP(target.host, target.port, timeout=timeout)
    with client:
        if target.security == "starttls":
            client.starttls(context=context)  # SMTPNotSupportedError when not offered
        if target.username is not None and target.password is not None:
            client.login(target.username, target.password)
        client.send_message(message)
