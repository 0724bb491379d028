"""Running the real `phivault` command against a test runtime's database and keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from phivault.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent


def cli_env(rt: Runtime, **extra: str) -> dict[str, str]:
    s = rt.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
    env.update({
        "PHIVAULT_DATABASE_URL": s.database_url_value,
        "PHIVAULT_MASTER_KEYS": s.master_keys.get_secret_value(),
        "PHIVAULT_INDEX_KEY": s.index_key.get_secret_value(),
        "PHIVAULT_AUDIT_KEY": s.audit_key.get_secret_value(),
        "PHIVAULT_JWT_KEYS": s.jwt_keys.get_secret_value(),
    })
    env.update(extra)
    return env


def phivault_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "phivault.cli.main", *args]


def run_cli(*args: str, env: dict[str, str], cwd: Path | None = None, stdin: str = "",
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(phivault_command(*args), env=env, cwd=cwd or ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)
