"""The Redis at `PHIVAULT_REDIS_URL` (rate limits, refusal bounds, revocations): the URL's forms,
checked once by the settings, and the one way every client of it is opened, so that they all
protect the link alike.

- `redis://host:port/db`: no TLS (`PHIVAULT_ENV=prod` refuses it unless the host is loopback).
- `rediss://host:port/db`: TLS 1.2 or newer; redis-py verifies the server's certificate and its
  host name against the system's CAs, or `ssl_ca_certs=/path/ca.pem`. `ssl_certfile` and
  `ssl_keyfile` present a client certificate. `ssl_cert_reqs=none` or `ssl_check_hostname=false`
  turn the verification off, which prod refuses unless the host is loopback.
- `unix:///path/redis.sock?db=0`.

redis-py's `from_url` reads the query itself (URL options win over keyword arguments); the
checks here catch what it would only find at the first command, or not at all.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis import asyncio as aioredis

from phivault.ops.addresses import is_loopback

SCHEMES = ("redis", "rediss", "unix")
_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = ("none", "optional", "required")
_FALSE = ("0", "F", "FALSE", "N", "NO")  # redis-py's `to_bool`


def redis_url_problem(url: str, *, prod: bool) -> str | None:
    """Why this `PHIVAULT_REDIS_URL` cannot work, or prod must not use it; None if fine. The
    reason never quotes the URL (it may hold a password)."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in SCHEMES:
        return "must start with redis://, rediss:// or unix://"
    query = {name: unquote(values[0]) for name, values in parse_qs(parts.query).items()}
    tls_options = sorted(name for name in query if name.startswith("ssl"))
    if tls_options and parts.scheme != "rediss":
        return f"{tls_options[0]} needs rediss:// (TLS)"
    for name in _FILE_OPTIONS:
        if name in query and not Path(query[name]).is_file():
            return f"{name} file {query[name]} does not exist or is not a file"
    problem = _unusable_files(query)
    if problem:
        return problem
    reqs = query.get("ssl_cert_reqs", "required")
    if reqs not in _CERT_REQS:
        return f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}"
    if not prod or parts.scheme == "unix" or is_loopback(host):
        return None
    if parts.scheme == "redis":
        return "redis:// (no TLS) is for a Redis on this host only in prod: use rediss://"
    if reqs == "none" or query.get("ssl_check_hostname", "").upper() in _FALSE:
        return ("must verify the server's certificate and host name in prod: drop "
                "ssl_cert_reqs=none and ssl_check_hostname=false")
    return None


def _unusable_files(query: dict[str, str]) -> str | None:
    """Load the CA and the client certificate as redis-py will, so that a wrong file is named
    now rather than at the first command."""
    if "ssl_keyfile" in query and "ssl_certfile" not in query:
        return "ssl_keyfile needs ssl_certfile"
    context = ssl.create_default_context()
    loads: list[tuple[str, Callable[[], None]]] = [
        ("ssl_ca_certs", lambda: context.load_verify_locations(cafile=query["ssl_ca_certs"])),
        ("ssl_certfile", lambda: context.load_cert_chain(query["ssl_certfile"],
                                                         query.get("ssl_keyfile"))),
    ]
    for name, load in loads:
        if name not in query:
            continue
        try:
            load()
        except OSError as exc:
            reason = exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror
            return f"{name} file {query[name]} cannot be used ({reason or 'ssl error'})"
    return None


def redis_options(url: str) -> dict[str, Any]:
    """The keyword arguments every client of `url` gets on top of the URL's own options."""
    if urlsplit(url).scheme == "rediss":
        # The floor does not hang on OpenSSL's configuration (Python's default is 1.2 too).
        return {"ssl_min_version": ssl.TLSVersion.TLSv1_2}
    return {}


def redis_client(url: str, **options: Any) -> aioredis.Redis:
    """A redis-py asyncio client of `url` (connecting at its first command)."""
    return aioredis.Redis.from_url(url, **redis_options(url), **options)
