"""TLS with certificate verification to PostgreSQL and Redis (issue 10, item 9).

A test CA, made here, signs a server certificate for `localhost` only; a second, unrelated CA is
the wrong one, and `127.0.0.1` (which the certificate does not name) is the wrong host name. A
throwaway PostgreSQL takes TLS connections only (pg_hba: `hostssl`, plain `host` rejected) and a
throwaway `redis-server` has no plain port at all, so every command that works went over TLS.
Nothing here touches the shared servers.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import asyncpg
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from limits import parse
from redis import asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.auth.ratelimits import AuthLimits
from phivault.auth.session_cache import SessionCache
from phivault.config import ConfigError, Settings
from phivault.db.engine import create_engine
from phivault.db.migrate import current_revision
from phivault.db.tls import PostgresTls, asyncpg_options
from phivault.errors import RateLimited, Unavailable
from phivault.ops.redis_client import redis_options
from phivault.runtime import Runtime
from tests.conftest import build_settings, client_for
from tests.factories import signed_in
from tests.helpers import free_port, phivault_command
from tests.pg_server import ThrowawayPostgres, throwaway_postgres

# TLS only; the database `template1` also wants a client certificate.
ONLY_TLS_HBA = ("local all all trust\n"
                "hostssl template1 all 127.0.0.1/32 cert\n"
                "hostssl template1 all ::1/128 cert\n"
                "hostssl all all 127.0.0.1/32 trust\n"
                "hostssl all all ::1/128 trust\n"
                "hostnossl all all all reject\n")
IS_TLS = text("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")


@pytest.fixture(autouse=True)
def _no_libpq_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """libpq's variables and ~/.postgresql/ would change what the URLs here mean."""
    for name in ("PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGHOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


# A test PKI, made at test time.

@dataclass(frozen=True)
class Pki:
    ca: Path  # signed the server's certificate
    other_ca: Path  # an unrelated CA: the wrong certificate
    server_cert: Path  # names DNS:localhost only, so 127.0.0.1 is the wrong host name
    server_key: Path
    client_cert: Path  # CN=postgres, for PostgreSQL's `cert` authentication
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_ca(path: Path, common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _write_leaf(cert_path: Path, key_path: Path, common_name: str,
                ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], *,
                server: bool = True) -> None:
    """A server certificate for the DNS name `common_name`, or a client one for that user."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _write_ca(folder / "ca.pem", "phivault test CA")
    _write_ca(folder / "other-ca.pem", "some other CA")
    _write_leaf(folder / "server.crt", folder / "server.key", "localhost", ca)
    _write_leaf(folder / "client.crt", folder / "client.key", "postgres", ca, server=False)
    return Pki(folder / "ca.pem", folder / "other-ca.pem", folder / "server.crt",
               folder / "server.key", folder / "client.crt", folder / "client.key")


def _in_chain(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of `kind` in `error`'s chain of causes."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _refusal(error: BaseException) -> BaseException | None:
    """The certificate verification error somewhere in `error`'s chain."""
    return _in_chain(error, ssl.SSLCertVerificationError)


# PostgreSQL.

@pytest.fixture(scope="module")
def tls_postgres(pki: Pki) -> Iterator[ThrowawayPostgres]:
    settings = {"ssl": "on", "ssl_cert_file": "'server.crt'", "ssl_key_file": "'server.key'",
                "ssl_ca_file": "'ca.pem'", "ssl_min_protocol_version": "'TLSv1.2'"}
    with throwaway_postgres(settings=settings, hba=ONLY_TLS_HBA,
                            files={"server.crt": pki.server_cert, "server.key": pki.server_key,
                                   "ca.pem": pki.ca}) as server:
        yield server


def _verify_full(server: ThrowawayPostgres, ca: Path, host: str = "localhost") -> str:
    return server.url(host=host, query=f"sslmode=verify-full&sslrootcert={ca}")


async def _tls_of(url: str) -> tuple[bool, str]:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            row = (await connection.execute(IS_TLS)).one()
            return bool(row.ssl), str(row.version)
    finally:
        await engine.dispose()


async def _refused(url: str) -> BaseException:
    """The error connecting to `url` raised (the callers look for its cause)."""
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect():
            pass
    except Exception as error:
        return error
    finally:
        await engine.dispose()
    raise AssertionError("connected")


def _env_for(settings: Settings, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHIVAULT_", "PG"))}
    env.update({
        "PHIVAULT_DATABASE_URL": url,
        "PHIVAULT_MASTER_KEYS": settings.master_keys.get_secret_value(),
        "PHIVAULT_INDEX_KEY": settings.index_key.get_secret_value(),
        "PHIVAULT_AUDIT_KEY": settings.audit_key.get_secret_value(),
        "PHIVAULT_JWT_KEYS": settings.jwt_keys.get_secret_value(),
    })
    return env


async def test_phivault_works_on_postgres_over_verified_tls(
        tls_postgres: ThrowawayPostgres, pki: Pki, keys_env: dict[str, str]) -> None:
    """`phivault migrate` and a request through the app, over verify-full with the test CA:
    TLS (1.3) on every connection, where the server refuses any other (below)."""
    url = _verify_full(tls_postgres, pki.ca)
    settings = build_settings(keys_env, url)
    migrate = await asyncio.to_thread(
        subprocess.run, phivault_command("migrate"), env=_env_for(settings, url),
        capture_output=True, text=True, timeout=120, check=False)
    assert migrate.returncode == 0, migrate.stderr
    rt = Runtime.from_settings(settings, chain_after_commit=True)
    try:
        assert await current_revision(rt.engine) is not None  # the migration happened
        user = await signed_in(rt, "patient")
        async with client_for(rt) as client:
            answer = await client.get("/api/v1/me", headers=user.headers)
        assert answer.status_code == 200, answer.text
        async with rt.engine.connect() as connection:
            row = (await connection.execute(IS_TLS)).one()
        assert row.ssl is True
        assert row.version == "TLSv1.3"
    finally:
        await rt.close()


async def test_postgres_refuses_a_server_certificate_from_another_ca(
        tls_postgres: ThrowawayPostgres, pki: Pki) -> None:
    error = await _refused(_verify_full(tls_postgres, pki.other_ca))
    refusal = _refusal(error)
    assert refusal is not None, repr(error)
    assert "certificate verify failed" in str(refusal)


async def test_postgres_refuses_a_certificate_for_another_host_name(
        tls_postgres: ThrowawayPostgres, pki: Pki) -> None:
    """The right CA, but the certificate names localhost, not 127.0.0.1: verify-full refuses;
    verify-ca, which checks only the chain, connects (so the name made the difference)."""
    error = await _refused(_verify_full(tls_postgres, pki.ca, host="127.0.0.1"))
    refusal = _refusal(error)
    assert refusal is not None, repr(error)
    assert "IP address mismatch" in str(refusal)
    chain_only = tls_postgres.url(host="127.0.0.1",
                                  query=f"sslmode=verify-ca&sslrootcert={pki.ca}")
    assert (await _tls_of(chain_only))[0] is True


async def test_postgres_refuses_plain_connections(tls_postgres: ThrowawayPostgres) -> None:
    """The server half of the proof: a connection without TLS is turned away."""
    error = await _refused(tls_postgres.url(host="localhost", query="sslmode=disable"))
    cause = _in_chain(error, asyncpg.InvalidAuthorizationSpecificationError)
    assert cause is not None, repr(error)
    assert "no encryption" in str(cause)


async def test_require_encrypts_and_verifies_only_against_a_given_ca(
        tls_postgres: ThrowawayPostgres, pki: Pki) -> None:
    """libpq's `require`: encrypted; with `sslrootcert`, also the chain (not the name)."""
    assert await _tls_of(tls_postgres.url(host="127.0.0.1", query="sslmode=require")) \
        == (True, "TLSv1.3")
    error = await _refused(tls_postgres.url(
        host="localhost", query=f"sslmode=require&sslrootcert={pki.other_ca}"))
    assert _refusal(error) is not None, repr(error)


async def test_postgres_takes_a_client_certificate_from_the_url(
        tls_postgres: ThrowawayPostgres, pki: Pki) -> None:
    """`sslcert` and `sslkey`: PostgreSQL's `cert` authentication (template1 here) lets in
    the holder of the client certificate, and no one without it."""
    url = tls_postgres.url(database="template1", host="localhost", query=(
        f"sslmode=verify-full&sslrootcert={pki.ca}"
        f"&sslcert={pki.client_cert}&sslkey={pki.client_key}"))
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            client_dn = (await connection.execute(text(
                "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))).scalar()
        assert client_dn == "/CN=postgres"
    finally:
        await engine.dispose()
    error = await _refused(_verify_full(tls_postgres, pki.ca).replace("/postgres?",
                                                                      "/template1?"))
    refusal = _in_chain(error, asyncpg.InvalidAuthorizationSpecificationError)
    assert "requires a valid client certificate" in str(refusal), repr(error)


async def test_a_process_with_asyncpg_alone_gets_the_same_tls(
        tls_postgres: ThrowawayPostgres, pki: Pki) -> None:
    """`asyncpg_options`: the dialect's connect options made fit for `asyncpg.connect` (as the
    audit verifier's helper processes connect), verify-full included."""
    def options(ca: Path) -> dict[str, Any]:
        url = make_url(_verify_full(tls_postgres, ca))
        _args, found = url.get_dialect()().create_connect_args(url)
        return asyncpg_options(found)

    connection = await asyncpg.connect(**options(pki.ca))
    try:
        assert await connection.fetchval(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
    finally:
        await connection.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(**options(pki.other_ca))


# Redis.

@dataclass(frozen=True)
class TlsRedis:
    port: int
    pki: Pki

    def url(self, ca: Path | None = None, host: str = "localhost") -> str:
        return (f"rediss://{host}:{self.port}/0?ssl_ca_certs={ca or self.pki.ca}"
                "&ssl_cert_reqs=required")


@pytest.fixture(scope="module")
def tls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    program = shutil.which("redis-server")
    if program is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is missing: install Redis (built with TLS)")
        pytest.skip("redis-server is not installed")
    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    with (folder / "redis.log").open("w") as log:
        process = subprocess.Popen(
            [program, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
             "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "no",
             "--save", "", "--appendonly", "no", "--dir", str(folder)],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        server = TlsRedis(port, pki)
        _wait_for_redis(server, process, folder / "redis.log")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_redis(server: TlsRedis, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    client = redis.Redis.from_url(server.url(), socket_connect_timeout=1)
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                message = log.read_text(errors="replace")
                if "TLS" in message and "not supported" in message.lower():
                    pytest.skip("this redis-server is built without TLS")
                raise AssertionError(f"redis-server exited {process.returncode}: {message}")
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not answer over TLS")
    finally:
        client.close()


@asynccontextmanager
async def _limits(url: str) -> AsyncIterator[AuthLimits]:
    limits = AuthLimits(parse("2/minute"), parse("5/15minutes"), url,
                        prefix=f"tls-{secrets.token_hex(4)}")
    try:
        yield limits
    finally:
        # `limits`' storage has no close of its own: close its redis-py client.
        await limits._storage.bridge.storage.aclose()  # type: ignore[attr-defined]


def _revoking(cache: SessionCache, user: uuid.UUID) -> AsyncSession:
    """A session whose transaction revoked `user`'s sessions (only its `info` is used)."""
    session = cast(AsyncSession, SimpleNamespace(info={}))
    cache.revoked(session, [user])
    return session


async def _subscribed(server: TlsRedis, channel: str) -> None:
    client = aioredis.Redis.from_url(server.url())
    try:
        deadline = time.monotonic() + 5
        while dict(await client.pubsub_numsub(channel)).get(channel.encode(), 0) < 1:
            assert time.monotonic() < deadline, "the session cache did not subscribe"
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def test_rate_limits_and_revocations_work_over_verified_tls(tls_redis: TlsRedis) -> None:
    url = tls_redis.url()
    async with _limits(url) as limits:
        await limits.hit_ip("198.51.100.7")
        await limits.hit_ip("198.51.100.7")
        with pytest.raises(RateLimited):
            await limits.hit_ip("198.51.100.7")

    prefix = f"tls-{secrets.token_hex(4)}"
    listening = SessionCache(1.0, redis_url=url, prefix=prefix)
    revoking = SessionCache(1.0, redis_url=url, prefix=prefix)
    listening.start()
    try:
        await _subscribed(tls_redis, listening.channel)
        session_id, user_id = uuid.uuid4(), uuid.uuid4()
        listening.put(listening.ticket(), session_id, user_id, ("login",))
        await revoking.committed(_revoking(revoking, user_id))
        deadline = time.monotonic() + 2
        while listening.get(session_id, user_id) is not None:
            assert time.monotonic() < deadline, "the revocation did not arrive"
            await asyncio.sleep(0.01)
    finally:
        await listening.close()
        await revoking.close()


@pytest.mark.parametrize("wrong", ["another CA", "another host name"])
async def test_redis_clients_refuse_a_wrong_certificate(
        tls_redis: TlsRedis, wrong: str, captured_logs: Any) -> None:
    url = (tls_redis.url(ca=tls_redis.pki.other_ca) if wrong == "another CA"
           else tls_redis.url(host="127.0.0.1"))
    async with _limits(url) as limits:
        with pytest.raises(Unavailable) as caught:  # fails closed: 503, never unlimited
            await limits.hit_ip("198.51.100.8")
    refusal = caught.value.__cause__
    assert isinstance(refusal, redis.ConnectionError)
    assert "certificate verify failed" in str(refusal)
    if wrong == "another host name":
        assert "IP address mismatch" in str(refusal)

    cache = SessionCache(1.0, redis_url=url)
    try:
        await cache.committed(_revoking(cache, uuid.uuid4()))
    finally:
        await cache.close()
    logged = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    assert {"event": "session_revocation_publish_failed", "error": "ConnectionError"} \
        in [{"event": line.get("event"), "error": line.get("error")} for line in logged]


# Settings: the URLs' forms, checked once, in one line that never repeats the URL.

def _settings(keys_env: dict[str, str], **values: Any) -> Settings:
    values.setdefault("database_url", "sqlite+aiosqlite:///unused.db")
    if values.get("env") == "prod":  # OWASP's argon2 minimum, which prod requires
        values.update(argon2_memory_kib=19456, argon2_time_cost=2)
    return build_settings(keys_env, **values)


def test_settings_accept_verified_tls_urls(keys_env: dict[str, str], pki: Pki) -> None:
    for env in ("dev", "prod"):
        settings = _settings(
            keys_env, env=env,
            database_url=f"postgresql+asyncpg://app:pw@db.internal:5432/phivault"
                         f"?sslmode=verify-full&sslrootcert={pki.ca}",
            redis_url=f"rediss://:pw@cache.internal:6380/0?ssl_ca_certs={pki.ca}")
        assert settings.redis_url is not None


@pytest.mark.parametrize(("variable", "values", "problem"), [
    ("PHIVAULT_DATABASE_URL",
     {"database_url": "postgresql+asyncpg://app:secretpw@db.internal/p"
                      "?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"},
     "sslrootcert file /nonexistent/ca.pem cannot be read (No such file or directory)"),
    ("PHIVAULT_DATABASE_URL",
     {"database_url": "postgresql+asyncpg://app:secretpw@db.internal/p?sslmode=verify-full"},
     "sslmode=verify-full needs sslrootcert=/path/to/ca.pem"),
    ("PHIVAULT_DATABASE_URL",
     {"database_url": "postgresql+asyncpg://app:secretpw@db.internal/p?sslmode=verify-all"},
     "sslmode (or PGSSLMODE) must be one of"),
    ("PHIVAULT_REDIS_URL",
     {"redis_url": "rediss://:secretpw@cache.internal/0?ssl_ca_certs=/nonexistent/ca.pem"},
     "ssl_ca_certs file /nonexistent/ca.pem does not exist"),
    ("PHIVAULT_REDIS_URL",
     {"redis_url": "redis://:secretpw@cache.internal/0?ssl_ca_certs=/nonexistent/ca.pem"},
     "ssl_ca_certs needs rediss://"),
    ("PHIVAULT_DATABASE_URL",
     {"database_url": "postgresql+asyncpg://app:secretpw@db.internal/p"
                      "?sslmode=verify-full&sslrootcert={not_pem}"},
     "sslrootcert file {not_pem} holds no usable PEM"),
    ("PHIVAULT_REDIS_URL",
     {"redis_url": "rediss://:secretpw@cache.internal/0?ssl_ca_certs={not_pem}"},
     "ssl_ca_certs file {not_pem} cannot be used"),
])
def test_settings_explain_a_broken_tls_url_in_one_line(
        keys_env: dict[str, str], variable: str, values: dict[str, Any], problem: str,
        tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    values = {name: value.format(not_pem=not_pem) for name, value in values.items()}
    problem = problem.format(not_pem=not_pem)
    with pytest.raises(ConfigError) as caught:
        _settings(keys_env, **values)
    assert caught.value.variable == variable
    assert problem in caught.value.problem
    assert "\n" not in str(caught.value) and "secretpw" not in str(caught.value)


@pytest.mark.parametrize(("values", "problem"), [
    ({"database_url": "postgresql+asyncpg://app@db.internal/p"}, "sslmode=verify-full"),
    ({"database_url": "postgresql+asyncpg://app@db.internal/p?sslmode=require"},
     "sslmode=verify-full"),
    ({"database_url": "postgresql+asyncpg://app@10.0.0.5/p?sslmode=verify-ca&sslrootcert={ca}"},
     "sslmode=verify-full"),
    ({"redis_url": "redis://cache.internal:6379/0"}, "use rediss://"),
    ({"redis_url": "rediss://cache.internal:6380/0?ssl_cert_reqs=none"}, "must verify"),
    ({"redis_url": "rediss://cache.internal:6380/0?ssl_check_hostname=false"}, "must verify"),
])
def test_prod_refuses_an_unverified_link_to_another_host(
        keys_env: dict[str, str], pki: Pki, values: dict[str, str], problem: str) -> None:
    values = {name: value.format(ca=pki.ca) for name, value in values.items()}
    _settings(keys_env, env="dev", **values)  # development may
    with pytest.raises(ConfigError) as caught:
        _settings(keys_env, env="prod", **values)
    assert problem in caught.value.problem


@pytest.mark.parametrize("query", [
    # asyncpg.connect(dsn=...) takes its host from the dsn: the URL names none, so it looked
    # local to the prod rule while asyncpg connected elsewhere in clear (an outside review).
    "dsn=postgresql://app:pw@db.evil.example/phivault%3Fsslmode%3Ddisable",
    "server_settings=x", "direct_tls=true", "krbsrvname=x",
])
@pytest.mark.parametrize("env", ["dev", "prod"])
def test_a_database_url_takes_only_known_parameters(keys_env: dict[str, str], query: str,
                                                    env: str) -> None:
    url = f"postgresql+asyncpg://app:pw@/phivault?{query}"
    with pytest.raises(ConfigError) as caught:
        _settings(keys_env, env=env, database_url=url)
    assert "is not allowed" in caught.value.problem and "pw" not in caught.value.problem
    with pytest.raises(ValueError, match="is not allowed"):
        create_engine(url)


def test_prod_allows_a_plain_link_on_this_host(keys_env: dict[str, str]) -> None:
    _settings(keys_env, env="prod", database_url="postgresql+asyncpg://app@127.0.0.1:5432/p",
              redis_url="redis://localhost:6379/0")
    _settings(keys_env, env="prod",
              database_url="postgresql+asyncpg://app@/p?host=/var/run/postgresql")


def test_the_tls_floor_is_1_2_on_both_links(pki: Pki) -> None:
    context = PostgresTls.from_options({"sslmode": "verify-full",
                                        "sslrootcert": str(pki.ca)}).connect_argument()
    assert isinstance(context, ssl.SSLContext)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert redis_options("rediss://h/0") == {"ssl_min_version": ssl.TLSVersion.TLSv1_2}
    assert redis_options("redis://h/0") == {}
