"""Settings: every variable, the *_FILE variants, masking, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from phivault.config import ConfigError, load_settings
from phivault.crypto.keys import KeyKind, generate_key_line
from tests.conftest import KEY_VARIABLES, generate_keys


def test_defaults(env: dict[str, str]) -> None:
    settings = load_settings()
    assert settings.env == "dev"
    assert settings.database_url_value == "sqlite+aiosqlite:///var/phivault.db"
    assert settings.access_token_ttl == 900 and settings.refresh_token_ttl == 604800
    assert settings.auth_rate_limit == "20/minute" and settings.lockout == "5/15minutes"
    assert settings.mfa_roles == frozenset()
    assert settings.behind_proxy is False and settings.trusted_proxy_networks == ()
    assert settings.master_key_ring.active_id == env["PHIVAULT_MASTER_KEYS"].split(":")[0]


def test_secrets_are_masked(env: dict[str, str]) -> None:
    settings = load_settings()
    shown = repr(settings) + str(settings)
    for value in env.values():
        assert value.split(":")[-1] not in shown


@pytest.mark.parametrize("variable", KEY_VARIABLES)
def test_missing_key_names_the_variable(env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                        variable: str) -> None:
    monkeypatch.delenv(variable)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == f"{variable}: is required but not set"


@pytest.mark.parametrize("variable, value, problem", [
    ("PHIVAULT_INDEX_KEY", "c2hvcnQ", "must decode to 32 bytes"),
    ("PHIVAULT_AUDIT_KEY", "***not base64***", "not base64url"),
    ("PHIVAULT_MASTER_KEYS", "nocolon", ""),
    ("PHIVAULT_JWT_KEYS", "k1:short", ""),
    ("PHIVAULT_DATABASE_URL", "mysql://x", "must start with"),
    ("PHIVAULT_AUTH_RATE_LIMIT", "lots", "must be a rate"),
    ("PHIVAULT_MFA_REQUIRED_ROLES", "doctor,wizard", "unknown role"),
    ("PHIVAULT_ACCESS_TOKEN_TTL", "1", ""),
    ("PHIVAULT_TRUSTED_PROXIES", "10.0.0.0/8,banana", "IP address"),
])
def test_malformed_values_name_the_variable(env: dict[str, str],
                                            monkeypatch: pytest.MonkeyPatch, variable: str,
                                            value: str, problem: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"{variable}: ") and problem in message
    assert "\n" not in message and value not in message.removeprefix(variable)


def test_duplicate_master_key_ids_refused(env: dict[str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    line = env["PHIVAULT_MASTER_KEYS"]
    monkeypatch.setenv("PHIVAULT_MASTER_KEYS", f"{line},{line}")
    with pytest.raises(ConfigError, match="PHIVAULT_MASTER_KEYS"):
        load_settings()


def test_file_variants(env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                       tmp_path: Path) -> None:
    for name in KEY_VARIABLES:
        path = tmp_path / name
        path.write_text(env[name] + "\n")
        monkeypatch.delenv(name)
        monkeypatch.setenv(name + "_FILE", str(path))
    settings = load_settings()
    assert settings.index_key.get_secret_value() == env["PHIVAULT_INDEX_KEY"]


def test_file_variant_and_value_together_refused(env: dict[str, str],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text(env["PHIVAULT_AUDIT_KEY"])
    monkeypatch.setenv("PHIVAULT_AUDIT_KEY_FILE", str(path))
    with pytest.raises(ConfigError, match="^PHIVAULT_AUDIT_KEY_FILE: set either"):
        load_settings()


def test_unreadable_file_names_the_file_variable(env: dict[str, str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PHIVAULT_JWT_KEYS")
    monkeypatch.setenv("PHIVAULT_JWT_KEYS_FILE", "/nonexistent/jwt")
    with pytest.raises(ConfigError, match="^PHIVAULT_JWT_KEYS_FILE: cannot read the file"):
        load_settings()


def test_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    keys = generate_keys()
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in keys.items()))
    assert load_settings().audit_key.get_secret_value() == keys["PHIVAULT_AUDIT_KEY"]


@pytest.mark.parametrize("variable, kind", [
    ("PHIVAULT_MASTER_KEYS", KeyKind.MASTER), ("PHIVAULT_INDEX_KEY", KeyKind.INDEX),
    ("PHIVAULT_AUDIT_KEY", KeyKind.AUDIT), ("PHIVAULT_JWT_KEYS", KeyKind.JWT),
])
def test_prod_refuses_dev_keys(env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                               variable: str, kind: KeyKind) -> None:
    monkeypatch.setenv("PHIVAULT_ENV", "prod")
    load_settings()  # production keys are fine
    monkeypatch.setenv(variable, generate_key_line(kind, dev=True))
    with pytest.raises(ConfigError, match=f"^{variable}: .*init --dev"):
        load_settings()
    monkeypatch.setenv("PHIVAULT_ENV", "dev")
    load_settings()


def test_prod_defaults(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIVAULT_ENV", "prod")
    settings = load_settings()
    assert settings.mfa_roles == {"doctor", "admin", "auditor"}
    with pytest.raises(ConfigError, match="^PHIVAULT_TLS_CERT_FILE: required in prod"):
        settings.check_serving()


def test_prod_refuses_self_signed_localhost_certificate(
        env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from phivault.crypto.tls import write_self_signed_certificate

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    write_self_signed_certificate(cert, key)
    monkeypatch.setenv("PHIVAULT_TLS_CERT_FILE", str(cert))
    monkeypatch.setenv("PHIVAULT_TLS_KEY_FILE", str(key))
    load_settings().check_serving()  # dev: fine
    monkeypatch.setenv("PHIVAULT_ENV", "prod")
    with pytest.raises(ConfigError, match="^PHIVAULT_TLS_CERT_FILE: is a self-signed"):
        load_settings().check_serving()
    monkeypatch.setenv("PHIVAULT_BEHIND_PROXY", "true")
    settings = load_settings()
    settings.check_serving()  # behind a proxy the proxy holds the certificate
    assert [str(n) for n in settings.trusted_proxy_networks] == ["127.0.0.1/32", "::1/128"]


def test_secret_file_that_is_not_utf8(env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\xff\xfe not utf-8")
    monkeypatch.delenv("PHIVAULT_AUDIT_KEY")
    monkeypatch.setenv("PHIVAULT_AUDIT_KEY_FILE", str(path))
    with pytest.raises(ConfigError, match="^PHIVAULT_AUDIT_KEY_FILE: the file is not UTF-8"):
        load_settings()
