"""Every file phivault reads from its own package ships in the wheel: `pyproject.toml`'s
package data covers each non-Python file under src/phivault/ (the vendored Swagger UI of
`/docs`, the common-password list, the migrations' templates), so a plain `pip install` works
as the editable one does."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "phivault"
# Files of the source tree that are not data: bytecode caches.
NOT_DATA = ("*.pyc",)


def test_every_data_file_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["phivault"]
    data = [path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*")
            if path.is_file() and path.suffix != ".py"
            and not any(fnmatch.fnmatch(path.name, p) for p in NOT_DATA)]
    assert "web/static/swagger/swagger-ui-bundle.js" in data
    assert "auth/data/common-passwords.txt" in data
    unshipped = [name for name in data
                 if not any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    assert unshipped == []
