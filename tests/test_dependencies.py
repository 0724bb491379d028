"""Every package the product imports is installed by `pip install phivault`, not only by the
dev extra: `make run` installs no dev dependency (a command importing httpx, a test-only
dependency then, broke `make run` on a fresh machine)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "phivault"


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0].lower().replace(
        "_", "-").replace(".", "-")


def runtime_distributions() -> set[str]:
    """The project's dependencies and everything they require, without extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [_name(r) for r in project["dependencies"]]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def imported_top_levels() -> set[str]:
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n != "phivault" and n not in sys.stdlib_module_names}


def test_the_product_imports_only_its_runtime_dependencies() -> None:
    runtime = runtime_distributions()
    owners = metadata.packages_distributions()
    missing = {}
    for module in sorted(imported_top_levels()):
        dists = {_name(d) for d in owners.get(module, [])}
        if not dists & runtime:
            missing[module] = sorted(dists)
    assert missing == {}, f"imported by src/ but installed only by the dev extra: {missing}"
