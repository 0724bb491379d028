"""Running the real `phivault` command against a test runtime's database and keys."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def client_context(cert: Path, *, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = maximum
    return context


def wait_listening(port: int, process: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}: "
                                 f"{process.stderr.read() if process.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not start listening")
