"""Structured JSON logs with the request id on every line, and redaction of secrets and PHI.

Redaction is by field name (any key that names a secret or a PHI field, at any depth) and by
shape (bearer tokens and JWTs inside any string), so a careless `log.info(..., body=payload)`
still prints nothing it must not.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[REDACTED]"

SENSITIVE_KEYS = frozenset({
    # Secrets.
    "authorization", "cookie", "set_cookie", "password", "current_password", "new_password",
    "password_hash", "token", "access_token", "refresh_token", "setup_token", "id_token",
    "secret", "totp_secret", "totp_code", "code", "otpauth_uri", "api_key", "master_keys",
    "index_key", "index_key_previous", "audit_key", "jwt_keys", "metrics_token",
    "database_url", "redis_url",
    "private_key", "key", "smtp_url", "mail_from", "to", "recipient",
    # PHI (SPEC §4).
    "email", "full_name", "name", "birth_date", "sex", "phone", "address", "reason", "notes",
    "diagnosis", "prescriptions", "medication", "dosage", "instructions", "filename", "text",
    "content", "body",
})

_TOKEN_SHAPES = re.compile(
    r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+"
    r"|eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"
)


def _normalise(key: str) -> str:
    return key.lower().replace("-", "_")


def redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: (REDACTED if _normalise(str(k)) in SENSITIVE_KEYS else redact_value(v))
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    if isinstance(value, str):
        return _TOKEN_SHAPES.sub(REDACTED, value)
    return value


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]
           ) -> MutableMapping[str, Any]:
    """structlog processor: mask sensitive keys and token-shaped strings, at any depth."""
    for key in list(event_dict):
        if _normalise(key) in SENSITIVE_KEYS:
            event_dict[key] = REDACTED
        elif key != "event" or isinstance(event_dict[key], str):
            event_dict[key] = redact_value(event_dict[key])
    return event_dict


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """JSON lines on `stream` (stderr by default), from structlog and the standard library."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer()],
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log prints query strings and is replaced by ours.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
