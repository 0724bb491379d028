"""What both clients share about the connection: how httpx is set up, and what goes into a
request's headers.

phivault speaks HTTPS only (TLS 1.3), so the client verifies the server's certificate always,
against the system's CAs or a CA file (a development instance's self-signed `var/tls/cert.pem`);
there is no switch that turns verification off. Plain `http://` is accepted for a loopback
address only: a server behind a local proxy (`PHIVAULT_BEHIND_PROXY`) and tests. Redirects are
not followed, so a bearer token is never sent anywhere but the configured server: a 3xx answer
is an `UnexpectedRedirect`. Answers are asked for uncompressed (see `answers.py`).
"""

from __future__ import annotations

import re
import ssl
from os import PathLike
from typing import Any

import httpx

import phivault
from phivault.client.errors import (
    ConnectionFailed,
    MalformedToken,
    PhivaultClientError,
    SessionRevoked,
)
from phivault.ops.addresses import is_loopback

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
USER_AGENT = f"phivault-client/{phivault.__version__}"


def tls_context(ca_file: str | PathLike[str] | None) -> ssl.SSLContext:
    """Certificate and host name verified, TLS 1.2 at the least (the server offers 1.3)."""
    context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def http_options(base_url: str, *, ca_file: str | PathLike[str] | None,
                 ssl_context: ssl.SSLContext | None, timeout: float | httpx.Timeout | None,
                 user_agent: str | None) -> dict[str, Any]:
    """Keyword arguments for `httpx.Client` or `httpx.AsyncClient`."""
    url = httpx.URL(base_url)
    if url.scheme not in ("https", "http") or not url.host:
        raise ValueError("base_url must be an https:// URL, e.g. https://127.0.0.1:8443")
    if url.scheme == "http" and not is_loopback(url.host):
        raise ValueError("phivault is served over HTTPS; http:// is for a loopback address only")
    if ca_file is not None and ssl_context is not None:
        raise ValueError("give ca_file or ssl_context, not both")
    return {
        "base_url": base_url.rstrip("/"),
        "verify": ssl_context or tls_context(ca_file),
        "timeout": DEFAULT_TIMEOUT if timeout is None else timeout,
        # identity: a compressed answer could inflate beyond any limit the client reads to.
        "headers": {"User-Agent": user_agent or USER_AGENT, "Accept": "application/json",
                    "Accept-Encoding": "identity"},
        "follow_redirects": False,
    }


# RFC 6750's b64token: what a bearer token may hold. A line break or a space in a header value
# would make httpx refuse the request with an error that quotes the whole header.
_BEARER = re.compile(r"[A-Za-z0-9._~+/-]+=*")


def authorization(token: str) -> str:
    """The `Authorization` header for `token`, or `MalformedToken` (which never quotes it)."""
    if not _BEARER.fullmatch(token):
        raise MalformedToken("A token to send holds a character a bearer token cannot (a line "
                             "break, a space?), so it was not sent.")
    return f"Bearer {token}"


def connection_failed(method: str, path: str, exc: httpx.TransportError) -> ConnectionFailed:
    """The error for a request that got no answer: the kind of failure, never httpx's message
    (a `LocalProtocolError` quotes the header it refused, a token included)."""
    return ConnectionFailed(f"{method} {path}: {type(exc).__name__}")


def safe_cause(exc: httpx.TransportError) -> httpx.TransportError | None:
    """The exception to chain to `connection_failed`'s: none when its text may quote a header."""
    return None if isinstance(exc, httpx.LocalProtocolError) else exc


def refresh_error(error: PhivaultClientError) -> PhivaultClientError:
    """A refused refresh token (`invalid_token`) means the session is over."""
    if error.code == "invalid_token":
        return SessionRevoked(error.detail, status=error.status, code=error.code,
                              request_id=error.request_id)
    return error


__all__ = ["DEFAULT_TIMEOUT", "USER_AGENT", "authorization", "connection_failed",
           "http_options", "refresh_error", "safe_cause", "tls_context"]
