"""The one-way streets of STYLE.md, checked: only crypto/ touches cryptography.hazmat, and no
service imports the web framework."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "phivault"
# Framework-free rooms: services, models, recipes. (api.py, guards.py, web/ and cli/ may use the
# framework.)
SERVICES = [
    "auth/service.py", "auth/accounts.py", "auth/passwords.py", "auth/ratelimits.py",
    "auth/mfa.py", "auth/tokens.py", "access/care.py", "access/break_glass.py",
    "audit/service.py", "audit/chain.py", "keys/service.py", "clinical/consultations.py",
    "clinical/records.py", "clinical/attachments.py", "clinical/notifications.py",
    "privacy/consents.py", "runtime.py", "config.py", "errors.py",
    "access/care_team.py", "access/schemas.py",
    "privacy/erasure.py", "privacy/rectification.py", "privacy/research.py",
    "privacy/export.py", "privacy/fhir.py", "ops/mail.py", "ops/smtp.py",
    "auth/reindex.py", "ops/redis_client.py", "ops/addresses.py", "db/phases.py", "db/tls.py",
    "ops/metrics.py",
]
FRAMEWORK = ("fastapi", "starlette", "uvicorn")


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_crypto_imports_hazmat() -> None:
    offenders = [str(path.relative_to(SRC)) for path in SRC.rglob("*.py")
                 if "crypto" not in path.relative_to(SRC).parts
                 and any(name.startswith("cryptography.hazmat") for name in imports(path))]
    assert offenders == []


def test_services_do_not_import_the_web_framework() -> None:
    offenders = {}
    for relative in SERVICES:
        found = [n for n in imports(SRC / relative) if n.split(".")[0] in FRAMEWORK]
        if found:
            offenders[relative] = found
    assert offenders == {}


def test_every_service_listed_exists() -> None:
    assert all((SRC / relative).is_file() for relative in SERVICES)
