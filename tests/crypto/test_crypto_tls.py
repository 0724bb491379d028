"""TLS: the self-signed localhost certificate, the TLS 1.3-only context, certificate checks."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from phivault.crypto.tls import (
    certificate_problem,
    is_self_signed_localhost,
    server_ssl_context,
    write_self_signed_certificate,
)


@pytest.fixture
def dev_pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls" / "deep" / "cert.pem", tmp_path / "tls" / "deep" / "key.pem"
    write_self_signed_certificate(cert, key, days=30)
    return cert, key


def _write_cert(
    path: Path,
    subject_cn: str,
    names: list[x509.GeneralName],
    *,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    days: int = 30,
) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    issuer_name, signer = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=60))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    path.write_bytes(builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return key


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def test_self_signed_certificate(dev_pair: tuple[Path, Path]) -> None:
    cert_path, key_path = dev_pair
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert certificate.subject.rfc4514_string() == "CN=localhost"
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert datetime.timedelta(days=30) <= lifetime <= datetime.timedelta(days=30, minutes=10)
    assert is_self_signed_localhost(cert_path)
    assert certificate_problem(cert_path, key_path) is None


def test_context_is_tls13_only_and_serves(dev_pair: tuple[Path, Path]) -> None:
    cert_path, key_path = dev_pair
    context = server_ssl_context(cert_path, key_path)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER

    def handshake(client_context: ssl.SSLContext) -> str | None:
        server_sock, client_sock = socket.socketpair()
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                with context.wrap_socket(server_sock, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError) as exc:
                errors.append(exc)
            finally:
                server_sock.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with client_context.wrap_socket(client_sock, server_hostname="localhost") as tls:
                version = tls.version()
                tls.sendall(b"x")
        finally:
            client_sock.close()
            thread.join(timeout=10)
        return version

    client = ssl.create_default_context(cafile=str(cert_path))
    assert handshake(client) == "TLSv1.3"
    old_client = ssl.create_default_context(cafile=str(cert_path))
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        handshake(old_client)


def test_other_certificates_are_not_self_signed_localhost(tmp_path: Path) -> None:
    public = tmp_path / "public.pem"
    _write_cert(public, "clinic.example.org", [x509.DNSName("clinic.example.org")])
    assert not is_self_signed_localhost(public)

    mixed = tmp_path / "mixed.pem"
    _write_cert(mixed, "localhost", [x509.DNSName("localhost"), x509.DNSName("example.org")])
    assert not is_self_signed_localhost(mixed)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Clinic CA")])
    issued = tmp_path / "issued.pem"
    _write_cert(issued, "localhost", [x509.DNSName("localhost")], issuer=(ca_name, ca_key))
    assert not is_self_signed_localhost(issued)

    loopback_only = tmp_path / "loopback.pem"
    _write_cert(loopback_only, "127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.2"))])
    assert is_self_signed_localhost(loopback_only)


def test_certificate_problems(tmp_path: Path, dev_pair: tuple[Path, Path]) -> None:
    cert_path, key_path = dev_pair
    missing = tmp_path / "missing.pem"
    problem = certificate_problem(missing, key_path)
    assert problem is not None and "cannot be read" in problem and "\n" not in problem
    assert "cannot be read" in (certificate_problem(cert_path, missing) or "")

    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    assert "no PEM certificate" in (certificate_problem(not_pem, key_path) or "")
    assert "no readable PEM private key" in (certificate_problem(cert_path, not_pem) or "")

    other_key = tmp_path / "other-key.pem"
    _write_key(other_key, ec.generate_private_key(ec.SECP256R1()))
    assert "does not match" in (certificate_problem(cert_path, other_key) or "")

    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        serialization.load_pem_private_key(key_path.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    assert "encrypted" in (certificate_problem(cert_path, encrypted) or "")

    expired_cert, expired_key = tmp_path / "expired.pem", tmp_path / "expired-key.pem"
    _write_key(expired_key, _write_cert(expired_cert, "localhost", [], days=-1))
    assert "expired" in (certificate_problem(expired_cert, expired_key) or "")

    key_text = key_path.read_text()
    for path_pair in ((not_pem, key_path), (cert_path, other_key), (cert_path, encrypted)):
        reason = certificate_problem(*path_pair) or ""
        assert key_text[40:80] not in reason
