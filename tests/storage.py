"""Reading a test database's raw storage, to prove that no plaintext reached it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from phivault.runtime import Runtime


async def raw_storage(rt: Runtime, tmp_path: Path) -> bytes:
    """Every byte the database holds: the SQLite files (WAL included), or a `pg_dump`."""
    url = rt.settings.database_url_value
    if url.startswith("sqlite"):
        await rt.engine.dispose()  # checkpoint-free: read the WAL file as well
        path = Path(url.split("///", 1)[1])
        return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))
    dump = tmp_path / "dump.sql"
    plain = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    subprocess.run(["pg_dump", "--no-owner", "-f", str(dump), plain], check=True, timeout=120)
    return dump.read_bytes()
