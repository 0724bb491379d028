"""TLS for `phivault serve`: a self-signed localhost certificate for development, the TLS 1.3-only
server context, and checks that the configured certificate and key are usable."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LOCALHOST = "localhost"
_LOOPBACK_IPS = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_self_signed_certificate(cert_path: Path, key_path: Path, *, days: int = 365) -> None:
    """Write a new EC P-256 key (mode 0o600) and a self-signed certificate for localhost.

    The certificate names CN=localhost and SAN DNS:localhost, IP:127.0.0.1 and IP:::1, and is valid
    from five minutes ago (clock skew) for `days` days. Parent directories are created; existing
    files are replaced atomically.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _LOCALHOST)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(_LOCALHOST), *(x509.IPAddress(ip) for ip in _LOOPBACK_IPS)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def _is_loopback_name(name: str) -> bool:
    host = name.lower().rstrip(".")
    if host == _LOCALHOST or host.endswith("." + _LOCALHOST):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_self_signed_localhost(cert_path: Path) -> bool:
    """Tell whether the leaf certificate is self-issued and names only localhost or loopback IPs.

    This is what `PHIVAULT_ENV=prod` refuses. A certificate without any name counts as not
    localhost. Raises OSError when the file cannot be read and ValueError when it holds no PEM
    certificate (`certificate_problem` explains either in one line).
    """
    certificate = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    if certificate.issuer != certificate.subject:
        return False
    names: list[str] = [
        str(attribute.value)
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for general_name in san:
            if isinstance(general_name, x509.DNSName):
                names.append(general_name.value)
            elif isinstance(general_name, x509.IPAddress):
                names.append(str(general_name.value))
            else:
                return False
    return bool(names) and all(_is_loopback_name(name) for name in names)


def server_ssl_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Return a server context that speaks TLS 1.3 only, loaded with the certificate chain."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return context


def _public_der(public_key: object) -> bytes | None:
    public_bytes = getattr(public_key, "public_bytes", None)
    if public_bytes is None:
        return None
    der: bytes = public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def certificate_problem(cert_file: Path, key_file: Path) -> str | None:
    """Return a one-line reason why this certificate and key cannot serve TLS, or None if they can.

    Checks, in order: both files readable, the certificate file holds PEM certificates, the key
    file holds an unencrypted PEM private key, the key matches the leaf certificate, the leaf is
    within its validity period, and Python's ssl module loads the pair. The reason names the file
    but never quotes its contents.
    """
    try:
        cert_pem = Path(cert_file).read_bytes()
    except OSError as exc:
        return f"TLS certificate file {cert_file} cannot be read: {exc.strerror or 'error'}"
    try:
        key_pem = Path(key_file).read_bytes()
    except OSError as exc:
        return f"TLS key file {key_file} cannot be read: {exc.strerror or 'error'}"
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        return f"TLS certificate file {cert_file} holds no PEM certificate"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        return f"TLS key file {key_file} is encrypted; give an unencrypted key"
    except (ValueError, UnicodeError):
        return f"TLS key file {key_file} holds no readable PEM private key"
    except UnsupportedAlgorithm:
        return f"TLS key file {key_file} holds an unsupported private key"
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        return f"TLS key file {key_file} does not match the certificate in {cert_file}"
    now = datetime.datetime.now(datetime.UTC)
    if now > leaf.not_valid_after_utc:
        return f"TLS certificate in {cert_file} expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
    if now < leaf.not_valid_before_utc:
        return f"TLS certificate in {cert_file} is not valid before {leaf.not_valid_before_utc}"
    try:
        server_ssl_context(Path(cert_file), Path(key_file))
    except ssl.SSLError as exc:
        return f"TLS certificate and key cannot be loaded: {exc.reason or 'ssl error'}"
    return None
