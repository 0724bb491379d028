"""`docs/compliance.md` names the tests that prove each safeguard: every one must exist, so the
map cannot drift from the suite (issue 11, item 6)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAP = ROOT / "docs" / "compliance.md"
NAME = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")
HIPAA = ["(a)(1)", "(a)(2)(i)", "(a)(2)(ii)", "(a)(2)(iii)", "(a)(2)(iv)", "(b)", "(c)(1)",
         "(d)", "(e)(1)"]
GDPR = ["5(1)(c)", "| 7 ", "| 15 ", "| 16 ", "| 17 ", "| 20 ", "| 25 ", "| 30 ", "| 32 "]


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")}


def test_every_named_test_exists() -> None:
    named = NAME.findall(MAP.read_text(encoding="utf-8"))
    assert len(named) > 60
    missing = [f"{file}::{name}" for file, name in named
               if not (ROOT / file).exists() or name not in defined_tests(ROOT / file)]
    assert not missing, f"docs/compliance.md names tests that do not exist: {missing}"


def test_every_safeguard_and_article_is_mapped() -> None:
    text = MAP.read_text(encoding="utf-8")
    for heading in HIPAA + GDPR:
        assert heading in text, heading
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| ---", "| requirement",
                                                          "| article")):
            assert NAME.search(line), f"a mapped row names no test: {line[:80]}"
