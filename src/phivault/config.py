"""Settings: every `PHIVAULT_*` variable, validated once, with secrets masked.

`load_settings()` is called by the app factory and the CLI, never at import time. Any bad or
missing variable becomes one `ConfigError` naming the variable, which the CLI prints as one line
and exits 2.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from email.utils import parseaddr
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from limits import RateLimitItem, parse
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from phivault.crypto import KeyFormatError
from phivault.crypto.audit_signing import CheckpointSigner, parse_audit_signing_keys
from phivault.crypto.envelope import MasterKeyRing
from phivault.crypto.keys import decode_key, is_dev_key, parse_key_ring
from phivault.crypto.signing import SigningKey, parse_jwt_keys
from phivault.crypto.tls import certificate_problem, is_self_signed_localhost
from phivault.db.tls import postgres_tls_problem
from phivault.ops.redis_client import redis_url_problem
from phivault.ops.smtp import SmtpTarget

ENV_PREFIX = "PHIVAULT_"

# The settings that may also be given as `<NAME>_FILE` (a path to a file holding the value).
SECRET_FIELDS = ("master_keys", "index_key", "audit_key", "jwt_keys", "redis_url", "metrics_token",
                 "database_url", "audit_signing_key", "smtp_url", "index_key_previous")

# The order in which problems are reported: the spec's table order, so the first line an
# operator sees names the first variable they would look at.
FIELD_ORDER = (
    "env", "database_url", "master_keys", "index_key", "index_key_previous", "audit_key",
    "jwt_keys",
    "audit_signing_key", "tls_cert_file",
    "tls_key_file", "behind_proxy", "trusted_proxies", "redis_url", "access_token_ttl",
    "refresh_token_ttl", "auth_rate_limit", "lockout", "staff_approval", "smtp_url", "mail_from",
    "mfa_required_roles", "metrics_token",
    "header_timeout", "redis_prefix", "session_cache_seconds", "portal_idle_minutes",
    "portal_session_hours", "db_pool_size",
    "argon2_memory_kib",
    "argon2_time_cost", "argon2_parallelism", "log_level",
)

ROLES = ("patient", "doctor", "admin", "auditor")
# OWASP's minimum for argon2id (m = 19 MiB, t = 2, p = 1); prod refuses anything weaker.
OWASP_ARGON2_MEMORY_KIB = 19456
OWASP_ARGON2_TIME_COST = 2
DEV_TLS_CERT = Path("var/tls/cert.pem")
DEV_TLS_KEY = Path("var/tls/key.pem")


class ConfigError(Exception):
    """A setting is missing or wrong. `str()` is one line naming the variable; no secrets."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


class _SecretFileSource(PydanticBaseSettingsSource):
    """Reads `PHIVAULT_<NAME>_FILE` for the secret settings (the container-secrets convention)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        path = os.environ.get(env_name(field_name) + "_FILE")
        if field_name not in SECRET_FIELDS or not path:
            return None, field_name, False
        if os.environ.get(env_name(field_name)):
            raise ConfigError(env_name(field_name) + "_FILE",
                              f"set either {env_name(field_name)} or {env_name(field_name)}_FILE,"
                              " not both")
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except UnicodeError:
            raise ConfigError(env_name(field_name) + "_FILE",
                              "the file is not UTF-8 text") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(env_name(field_name) + "_FILE",
                              f"cannot read the file ({reason})") from None
        return value, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, info in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(info, name)
            if value is not None:
                values[key] = value
        return values


class Settings(BaseSettings):
    """phivault's configuration (SPEC §3). Build it with `load_settings()`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True,
        hide_input_in_errors=True,
    )

    env: Literal["dev", "prod"] = "dev"
    database_url: SecretStr = SecretStr("sqlite+aiosqlite:///var/phivault.db")
    master_keys: SecretStr
    index_key: SecretStr
    # During a rotation of the index key: the one before, until `phivault keys reindex` has
    # made every blind index again under `index_key`.
    index_key_previous: SecretStr | None = None
    audit_key: SecretStr
    jwt_keys: SecretStr
    # Signs audit checkpoints (`phivault audit checkpoint`); optional until one is made.
    audit_signing_key: SecretStr | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    behind_proxy: bool = False
    trusted_proxies: str = ""
    redis_url: SecretStr | None = None
    access_token_ttl: int = Field(900, ge=60, le=3600)
    refresh_token_ttl: int = Field(604800, ge=3600, le=90 * 86400)
    auth_rate_limit: str = "20/minute"
    lockout: str = "5/15minutes"
    mfa_required_roles: str | None = None
    # SPEC §6: a staff account an admin creates waits for a second admin's approval; unset, on
    # in prod and off in dev (`staff_approval_required`).
    staff_approval: bool | None = None
    # Staff invitations and break-glass notices (ops/mail.py, ops/smtp.py for the URL's forms);
    # unset or empty: no mail. `mail_from` is their sender (unset: phivault@<host name>).
    smtp_url: SecretStr | None = None
    mail_from: str | None = Field(None, max_length=320)
    care_relationship_days: int = Field(365, ge=1, le=3650, description=(
        "How long a completed consultation keeps the care relationship, in days after its "
        "scheduled time (SPEC §7); then the doctor needs a new consultation."))
    metrics_token: SecretStr | None = None
    header_timeout: float = Field(15.0, ge=1.0, le=120.0)
    # Seconds a client has to finish the TLS handshake (`phivault serve`; asyncio's own is 60).
    tls_handshake_timeout: float = Field(10.0, ge=1.0, le=60.0)
    redis_prefix: str = Field("phivault", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    # How long a worker may reuse a request's session check (auth/session_cache.py): SPEC §6
    # lets a revocation take up to a second to reach every worker; 0 asks the database always.
    session_cache_seconds: float = Field(1.0, ge=0.0, le=1.0)
    # The privacy portal's sessions (portal/sessions.py): signed out after this many idle
    # minutes, and this many hours after sign-in whatever the use.
    portal_idle_minutes: int = Field(15, ge=1, le=24 * 60)
    portal_session_hours: int = Field(8, ge=1, le=7 * 24)
    # Database connections each server process keeps (db/engine.py): a request holds one for
    # its unit of work, and one opened past these is closed again after its request.
    db_pool_size: int = Field(32, ge=1, le=500)
    argon2_memory_kib: int = Field(65536, ge=8, le=4 * 1024 * 1024)
    argon2_time_cost: int = Field(2, ge=1, le=20)
    argon2_parallelism: int = Field(1, ge=1, le=16)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _SecretFileSource(settings_cls), env_settings, dotenv_settings)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        url = value.get_secret_value()
        if not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        if url.startswith("postgresql+asyncpg://"):
            try:
                parsed = make_url(url)
            except (ArgumentError, ValueError):
                raise ValueError("is not a valid URL") from None
            # TLS to the database (db/tls.py): files readable, and verify-full across a network
            # in prod.
            problem = postgres_tls_problem(parsed, prod=info.data.get("env") == "prod")
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("master_keys")
    @classmethod
    def _check_master_keys(cls, value: SecretStr) -> SecretStr:
        MasterKeyRing(parse_key_ring(value.get_secret_value()))
        return value

    @field_validator("index_key", "audit_key")
    @classmethod
    def _check_bare_key(cls, value: SecretStr) -> SecretStr:
        decode_key(value.get_secret_value())
        return value

    @field_validator("metrics_token")
    @classmethod
    def _check_metrics_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None  # blank: no token (a blank one would match a blank bearer)
        if len(value.get_secret_value().strip()) < 32:
            raise ValueError("must be at least 32 characters (`openssl rand -hex 32`)")
        return value

    @field_validator("index_key_previous")
    @classmethod
    def _check_previous_index_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None  # optional: only during a rotation
        decode_key(value.get_secret_value())
        return value

    @field_validator("jwt_keys")
    @classmethod
    def _check_jwt_keys(cls, value: SecretStr) -> SecretStr:
        parse_jwt_keys(value.get_secret_value())
        return value

    @field_validator("audit_signing_key")
    @classmethod
    def _check_audit_signing_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None  # optional: an empty value is no key
        parse_audit_signing_keys(value.get_secret_value())
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: str) -> str:
        for item in filter(None, (p.strip() for p in value.split(","))):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError("each item must be an IP address or network") from None
        return value

    @field_validator("auth_rate_limit", "lockout")
    @classmethod
    def _check_limit(cls, value: str) -> str:
        try:
            parse(value)
        except ValueError:
            raise ValueError("must be a rate such as 20/minute or 5/15minutes") from None
        return value

    @field_validator("mfa_required_roles")
    @classmethod
    def _check_roles(cls, value: str | None) -> str | None:
        if value is not None:
            unknown = {r.strip() for r in value.split(",") if r.strip()} - set(ROLES)
            if unknown:
                raise ValueError(f"unknown role(s): {', '.join(sorted(unknown))}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None, info: ValidationInfo
                         ) -> SecretStr | None:
        if value is not None:
            # ops/redis_client.py: the URL's forms, TLS files readable, verified TLS across a
            # network in prod.
            problem = redis_url_problem(value.get_secret_value(),
                                        prod=info.data.get("env") == "prod")
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("smtp_url")
    @classmethod
    def _check_smtp_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None  # optional: an empty value is no mail
        SmtpTarget.parse(value.get_secret_value())
        return value

    @field_validator("mail_from")
    @classmethod
    def _check_mail_from(cls, value: str | None) -> str | None:
        if value is not None and (any(ord(c) < 32 or ord(c) == 127 for c in value)
                                  or "@" not in parseaddr(value)[1]):
            raise ValueError("must be an e-mail address, optionally as Name <address>")
        return value

    @model_validator(mode="after")
    def _refuse_dev_material_in_prod(self) -> Settings:
        if self.env != "prod":
            return self
        if self.argon2_memory_kib < OWASP_ARGON2_MEMORY_KIB:
            raise ConfigError(env_name("argon2_memory_kib"),
                              f"must be at least {OWASP_ARGON2_MEMORY_KIB} in prod (OWASP)")
        if self.argon2_time_cost < OWASP_ARGON2_TIME_COST:
            raise ConfigError(env_name("argon2_time_cost"),
                              f"must be at least {OWASP_ARGON2_TIME_COST} in prod (OWASP)")
        if any(is_dev_key(raw) or kid.startswith("dev-") for kid, raw in self.master_key_pairs):
            raise ConfigError(env_name("master_keys"), _DEV_KEY)
        for field in ("index_key", "audit_key"):
            if is_dev_key(decode_key(getattr(self, field).get_secret_value())):
                raise ConfigError(env_name(field), _DEV_KEY)
        # The previous index key may be a development one: it is on its way out.
        if any(key.is_dev for key in self.signing_keys):
            raise ConfigError(env_name("jwt_keys"), _DEV_KEY)
        if any(key.is_dev for key in self.checkpoint_signer.keys):
            raise ConfigError(env_name("audit_signing_key"), _DEV_KEY)
        target = self.smtp_target
        if target is not None and target.security == "plain" and not target.is_loopback:
            # Invitations carry setup tokens: in clear only to a relay on this host.
            raise ConfigError(env_name("smtp_url"), "smtp:// (no TLS) is for a relay on this "
                              "host only in prod: use smtps:// or smtp+starttls://")
        return self

    # Parsed forms, computed once per Settings object.

    @cached_property
    def master_key_pairs(self) -> list[tuple[str, bytes]]:
        return parse_key_ring(self.master_keys.get_secret_value())

    @cached_property
    def master_key_ring(self) -> MasterKeyRing:
        return MasterKeyRing(self.master_key_pairs)

    @cached_property
    def index_key_bytes(self) -> bytes:
        return decode_key(self.index_key.get_secret_value())

    @cached_property
    def index_key_previous_bytes(self) -> bytes | None:
        previous = self.index_key_previous
        return decode_key(previous.get_secret_value()) if previous is not None else None

    @cached_property
    def audit_key_bytes(self) -> bytes:
        return decode_key(self.audit_key.get_secret_value())

    @cached_property
    def signing_keys(self) -> list[SigningKey]:
        return parse_jwt_keys(self.jwt_keys.get_secret_value())

    @cached_property
    def checkpoint_signer(self) -> CheckpointSigner:
        """The audit checkpoint keys (none when `PHIVAULT_AUDIT_SIGNING_KEY` is unset)."""
        text = self.audit_signing_key.get_secret_value() if self.audit_signing_key else ""
        return CheckpointSigner(tuple(parse_audit_signing_keys(text)) if text else ())

    def require_checkpoint_signer(self) -> CheckpointSigner:
        """The checkpoint keys, or a `ConfigError` naming the variable when there are none."""
        if not self.checkpoint_signer.keys:
            raise ConfigError(env_name("audit_signing_key"),
                              "is required for audit checkpoints but not set "
                              "(`phivault keys generate --kind audit-signing` makes one)")
        return self.checkpoint_signer

    @cached_property
    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        items = [p.strip() for p in self.trusted_proxies.split(",") if p.strip()]
        if not items and self.behind_proxy:
            # Behind a proxy on the same host (deploy/nginx.conf): trust the loopback proxy.
            items = ["127.0.0.1/32", "::1/128"]
        return tuple(ipaddress.ip_network(item, strict=False) for item in items)

    @cached_property
    def auth_rate_limit_item(self) -> RateLimitItem:
        return parse(self.auth_rate_limit)

    @cached_property
    def lockout_item(self) -> RateLimitItem:
        return parse(self.lockout)

    @cached_property
    def mfa_roles(self) -> frozenset[str]:
        if self.mfa_required_roles is None:
            return frozenset({"doctor", "admin", "auditor"}) if self.env == "prod" else frozenset()
        return frozenset(r.strip() for r in self.mfa_required_roles.split(",") if r.strip())

    @cached_property
    def staff_approval_required(self) -> bool:
        return self.env == "prod" if self.staff_approval is None else self.staff_approval

    @cached_property
    def smtp_target(self) -> SmtpTarget | None:
        """Where mail goes (None: no mail is sent)."""
        return SmtpTarget.parse(self.smtp_url.get_secret_value()) if self.smtp_url else None

    @cached_property
    def mail_sender(self) -> str:
        return self.mail_from or f"phivault@{socket.gethostname() or 'localhost'}"

    @property
    def database_url_value(self) -> str:
        return self.database_url.get_secret_value()

    def tls_files(self) -> tuple[Path, Path]:
        """The certificate chain and key `serve` uses (dev defaults under var/tls/)."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            if self.env == "prod":
                raise ConfigError("PHIVAULT_TLS_CERT_FILE",
                                  "required in prod (or set PHIVAULT_BEHIND_PROXY=true)")
            return (self.tls_cert_file or DEV_TLS_CERT, self.tls_key_file or DEV_TLS_KEY)
        return self.tls_cert_file, self.tls_key_file

    def check_serving(self) -> None:
        """Refuse to serve with TLS material that cannot work, or that prod must not use."""
        if self.behind_proxy:
            return
        cert, key = self.tls_files()
        problem = certificate_problem(cert, key)
        if problem:
            raise ConfigError("PHIVAULT_TLS_CERT_FILE", problem)
        if self.env == "prod" and is_self_signed_localhost(cert):
            raise ConfigError("PHIVAULT_TLS_CERT_FILE",
                              "is a self-signed certificate for localhost; prod needs a real one")


_DEV_KEY = ("holds a key made by `phivault init --dev`; PHIVAULT_ENV=prod needs keys from "
            "`phivault keys generate`")


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment, turning every problem into one `ConfigError`."""
    try:
        return Settings(**overrides)
    except ConfigError:
        raise
    except ValidationError as exc:
        raise _first_problem(exc) from None


def _first_problem(exc: ValidationError) -> ConfigError:
    errors = exc.errors(include_input=False, include_url=False)

    def rank(error: Any) -> int:
        field = str(error["loc"][0]) if error["loc"] else ""
        return FIELD_ORDER.index(field) if field in FIELD_ORDER else len(FIELD_ORDER)

    errors.sort(key=rank)
    first = errors[0]
    field = str(first["loc"][0]) if first["loc"] else "settings"
    ctx_error = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_error, ConfigError):
        return ctx_error
    if first["type"] == "missing":
        problem = "is required but not set"
    elif isinstance(ctx_error, KeyFormatError | ValueError):
        problem = str(ctx_error)
    else:
        problem = str(first["msg"])
    more = len({str(e["loc"][0]) for e in errors if e["loc"]}) - 1
    if more > 0:
        problem += f" (and {more} more setting{'s' if more > 1 else ''} to fix)"
    return ConfigError(env_name(field), problem)


__all__ = ["ConfigError", "Settings", "load_settings", "ROLES", "SECRET_FIELDS"]
