"""TLS to PostgreSQL: libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in
`PHIVAULT_DATABASE_URL`, made into the `ssl.SSLContext` that asyncpg takes.

SQLAlchemy's asyncpg dialect hands every query parameter of the URL to `asyncpg.connect` as a
keyword, and `asyncpg.connect` knows none of libpq's names: `?sslmode=verify-full` fails with a
`TypeError`, and asyncpg's own `?ssl=verify-full` finds its CA only in `PGSSLROOTCERT` or
`~/.postgresql/root.crt`. Here the URL's parameters mean what they mean to libpq, and TLS 1.2
is the minimum:

- `verify-full`: the server's certificate must chain to `sslrootcert` (a PEM file, or `system`
  for the system's CAs) and name the host of the URL. The mode for PHI crossing a network:
  `PHIVAULT_ENV=prod` refuses any other when a host is not this one (`postgres_tls_problem`).
- `verify-ca`: the chain only. `require`: encrypted; the chain verified if there is a CA file
  (as libpq does), otherwise not at all.
- `disable`, `allow`, `prefer`, or no `sslmode` (nor `PGSSLMODE`): asyncpg's own behaviour
  (no mode is `prefer`: TLS if the server offers it, unverified, else plain).

`sslcert` and `sslkey` present a client certificate. Where the URL names no file, libpq's
defaults apply (`PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`, else `~/.postgresql/root.crt`,
`postgresql.crt`, `postgresql.key`). `ssl=<mode>`, asyncpg's spelling, is read as `sslmode`.
Files are read when the engine is made: a renewed CA or client certificate needs a restart.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from phivault.ops.addresses import is_loopback

MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_UNVERIFIED = ("disable", "allow", "prefer")
# The URL's query parameters read here; none of them reaches asyncpg.connect as a keyword.
TLS_PARAMETERS = frozenset({"sslmode", "ssl", "sslrootcert", "sslcert", "sslkey"})
SYSTEM_CAS = "system"


@dataclass(frozen=True, slots=True)
class PostgresTls:
    """The TLS a database URL asks for (its file paths are not secret; the URL is)."""

    mode: str | None = None
    rootcert: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PostgresTls:
        """Read a URL's query (or asyncpg's connect options). A `ValueError` says in one line
        what is wrong, never quoting the URL."""
        values: dict[str, str] = {}
        for name in TLS_PARAMETERS:
            value = options.get(name)
            if value is None:
                continue
            if isinstance(value, tuple | list):
                raise ValueError(f"{name} is given more than once")
            if not isinstance(value, str):
                raise ValueError(f"{name} must be text")
            values[name] = value
        if "ssl" in values and "sslmode" in values:
            raise ValueError("give sslmode or ssl, not both")
        mode = values.get("sslmode", values.get("ssl")) or os.environ.get("PGSSLMODE") or None
        if mode is not None and mode not in MODES:
            raise ValueError(f"sslmode (or PGSSLMODE) must be one of {', '.join(MODES)}")
        rootcert, cert, key = (values.get(name) for name in ("sslrootcert", "sslcert", "sslkey"))
        if mode is None or mode in _UNVERIFIED:
            if rootcert or cert or key:
                raise ValueError("sslrootcert, sslcert and sslkey need sslmode=verify-full "
                                 "(or require, verify-ca)")
            return cls(mode)
        if key and not cert:
            raise ValueError("sslkey needs sslcert")
        # Where the URL names no file, libpq's (and asyncpg's) defaults.
        rootcert = rootcert or _libpq_default("PGSSLROOTCERT", "root.crt")
        if not cert:
            cert = _libpq_default("PGSSLCERT", "postgresql.crt")
            key = _libpq_default("PGSSLKEY", "postgresql.key") if cert else None
        if mode != "require" and not rootcert:
            raise ValueError(f"sslmode={mode} needs sslrootcert=/path/to/ca.pem "
                             f"(or sslrootcert={SYSTEM_CAS} for the system's CAs)")
        return cls(mode, rootcert, cert, key)

    def connect_argument(self) -> ssl.SSLContext | str | None:
        """asyncpg.connect's `ssl`: a context for `require` and the verifying modes (its files
        read now: a `ValueError` when one cannot be), the mode's name for the others, None when
        the URL names no mode."""
        if self.mode is None or self.mode in _UNVERIFIED:
            return self.mode
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = self.mode == "verify-full"
        if self.rootcert == SYSTEM_CAS:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        elif self.rootcert:
            _load("sslrootcert", self.rootcert,
                  lambda: context.load_verify_locations(cafile=self.rootcert))
        else:
            context.verify_mode = ssl.CERT_NONE  # `require` without a CA: encrypted only
        if self.cert:
            cert = self.cert
            _load("sslcert", cert, lambda: context.load_cert_chain(cert, keyfile=self.key))
        return context


def _libpq_default(variable: str, name: str) -> str | None:
    """The file libpq uses when the URL names none: `$variable`, else `~/.postgresql/name` if
    it exists."""
    if os.environ.get(variable):
        return os.environ[variable]
    try:
        path = Path.home() / ".postgresql" / name
    except RuntimeError:  # no home directory
        return None
    return str(path) if path.is_file() else None


def _load(name: str, path: str, load: Callable[[], None]) -> None:
    try:
        load()
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise ValueError(f"{name} file {path} holds no usable PEM "
                             f"({exc.reason or 'ssl error'})") from None
        raise ValueError(f"{name} file {path} cannot be read "
                         f"({exc.strerror or type(exc).__name__})") from None


# The query parameters a PostgreSQL URL may carry. SQLAlchemy hands every other one to
# asyncpg.connect as a keyword, and some of those reroute the connection past these checks
# (an outside review connected to a remote host in clear with `?dsn=...` under prod's
# verify-full rule), so anything else is refused.
URL_PARAMETERS = frozenset({*TLS_PARAMETERS, "host", "timeout", "command_timeout",
                            "prepared_statement_cache_size"})


def postgres_tls_problem(url: URL, *, prod: bool) -> str | None:
    """Why the TLS parameters of this PostgreSQL URL cannot work, or that prod must not use
    them: anything but `sslmode=verify-full` to a host other than this one; or a query
    parameter outside `URL_PARAMETERS`. None if fine."""
    unknown = sorted(set(url.query) - URL_PARAMETERS)
    if unknown:
        return (f"query parameter {unknown[0]} is not allowed (allowed: "
                f"{', '.join(sorted(URL_PARAMETERS))})")
    try:
        tls = PostgresTls.from_options(url.query)
        tls.connect_argument()
    except ValueError as exc:
        return str(exc)
    if prod and tls.mode != "verify-full" and not _only_this_host(url):
        return ("needs sslmode=verify-full and sslrootcert in prod when the database is on "
                "another host")
    return None


def _only_this_host(url: URL) -> bool:
    """Every host the URL names (or, naming none, `PGHOST`) is a Unix socket or a loopback
    address. With neither, asyncpg connects to this host."""
    hosts = [url.host] if url.host else []
    extra = url.query.get("host")
    hosts += [extra] if isinstance(extra, str) else list(extra or ())
    if not hosts and os.environ.get("PGHOST"):
        hosts = os.environ["PGHOST"].split(",")
    return all(_is_this_host(host.strip()) for host in hosts)


def _is_this_host(host: str) -> bool:
    if host.startswith("/"):
        return True
    if not host.startswith("[") and host.count(":") == 1:
        host = host.split(":")[0]  # `?host=name:port`, SQLAlchemy's multi-host form
    return is_loopback(host)


def asyncpg_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """asyncpg.connect's keywords for a URL's connect options (the dialect's
    `create_connect_args`): libpq's TLS parameters become its `ssl`. For a process that
    connects with asyncpg alone."""
    argument = PostgresTls.from_options(options).connect_argument()
    connect = {name: value for name, value in options.items() if name not in TLS_PARAMETERS}
    if argument is not None:
        connect["ssl"] = argument
    return connect


def use_postgres_tls(engine: AsyncEngine) -> None:
    """Connect `engine` with the TLS its URL asks for (the module's docstring).

    The context is made once, here; every new connection of the pool takes it in place of the
    URL's TLS parameters, which stay in `engine.url` for whoever reads it. A query parameter
    outside `URL_PARAMETERS` is a `ValueError` here too, whoever built the engine."""
    unknown = sorted(set(engine.url.query) - URL_PARAMETERS)
    if unknown:
        raise ValueError(f"query parameter {unknown[0]} is not allowed in a database URL")
    argument = PostgresTls.from_options(engine.url.query).connect_argument()

    @event.listens_for(engine.sync_engine, "do_connect")
    def _with_tls(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        for name in TLS_PARAMETERS:
            cparams.pop(name, None)
        if argument is not None:
            cparams["ssl"] = argument
