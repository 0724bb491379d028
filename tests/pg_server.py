"""A throwaway PostgreSQL server for tests that stop, restart or reconfigure it (outages, TLS).

The shared server on 127.0.0.1:5432 is never stopped: these tests `initdb` a cluster of their own
in a temporary folder, on a free port, and remove it afterwards. PostgreSQL refuses to run as
root, so when the tests run as root the cluster belongs to the `postgres` system user and its
commands run through `runuser`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import free_port


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return candidates[0].parent if candidates else None


class ThrowawayPostgres:
    """One cluster: `start()`, `stop()`, `url(...)`; its folder goes with `remove()`."""

    def __init__(self, *, settings: dict[str, str] | None = None,
                 files: dict[str, Path] | None = None, hba: str | None = None) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None or not (bin_dir / "initdb").exists():
            if os.environ.get("CI") == "true":
                raise RuntimeError("initdb is missing: install PostgreSQL's server package")
            pytest.skip("initdb is not installed")
        self.bin_dir = bin_dir
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="phivault-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        for name, source in (files or {}).items():
            target = self.data / name
            shutil.copyfile(source, target)
            target.chmod(0o600)
            if self.as_root:
                shutil.chown(target, "postgres", "postgres")
        lines = [f"port = {self.port}", "listen_addresses = '127.0.0.1'",
                 f"unix_socket_directories = '{self.root}'", "fsync = off",
                 "max_connections = 60"]
        lines += [f"{key} = {value}" for key, value in (settings or {}).items()]
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(lines) + "\n")
        if hba is not None:
            (self.data / "pg_hba.conf").write_text(hba)

    def _run(self, program: str, *args: str, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / program), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast` ends sessions; `immediate` is a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                  check=False)

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg",
            host: str = "127.0.0.1", query: str = "") -> str:
        suffix = f"?{query}" if query else ""
        return f"{driver}://postgres@{host}:{self.port}/{database}{suffix}"

    def wait_until_down(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                return
            time.sleep(0.1)
        raise TimeoutError("the throwaway PostgreSQL did not stop")

    def log(self) -> str:
        path = self.root / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def throwaway_postgres(**options: object) -> Iterator[ThrowawayPostgres]:
    """A started throwaway cluster for the block (`ThrowawayPostgres`'s options)."""
    server = ThrowawayPostgres(**options)  # type: ignore[arg-type]
    try:
        server.start()
        yield server
    finally:
        server.remove()
