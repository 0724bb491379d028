"""What every benchmark result records about the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(**extra: str) -> dict[str, object]:
    return {"platform": platform.platform(), "cpu_model": cpu_model(),
            "cores": os.cpu_count() or 0, "python": platform.python_version(), **extra}
