"""`--help` of every command reads as help: flags shown as flags (`--dev`, never `<bool>`),
and each paragraph of a docstring wrapped as a whole, not broken where the source broke it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from phivault.cli.main import app

WIDTH = 80


def _command_paths(command: Any, path: list[str]) -> Iterator[list[str]]:
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _command_paths(sub, [*path, name])


PATHS = list(_command_paths(typer.main.get_command(app), []))


def _help(path: list[str]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="phivault",
                                terminal_width=WIDTH, env={"COLUMNS": str(WIDTH)})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_enumerated() -> None:
    names = {" ".join(path) for path in PATHS}
    assert {"", "init", "serve", "version", "users create", "keys rewrap", "audit verify",
            "gdpr erase", "research export"} <= names


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "phivault")
def test_help_shows_flags_as_flags(path: list[str]) -> None:
    text = _help(path)
    assert text.startswith("Usage: phivault")
    assert "<bool>" not in text
    assert "--help" in text


def test_boolean_options_are_bare_flags() -> None:
    assert "  --dev   Create a development instance" in _help(["init"])
    assert "<bool>" not in _help(["users", "create"])
    assert "--password-stdin  " in _help(["users", "create"])


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "phivault")
def test_help_paragraphs_are_wrapped_whole(path: list[str]) -> None:
    """Within a paragraph of the description, every line but the last runs near the width: a
    short line in the middle is a line break of the docstring's source leaking through."""
    text = _help(path)
    description = text.split("\n\n", 1)[1]
    for heading in ("\nArguments:", "\nOptions:", "\nCommands:"):
        description = description.split(heading, 1)[0]
    for paragraph in description.strip("\n").split("\n\n"):
        lines = paragraph.splitlines()
        assert all(len(line) <= WIDTH for line in lines), paragraph
        for line, following in zip(lines, lines[1:], strict=False):
            # The next word would not have fitted on this line: greedy wrapping.
            next_word = following.split()[0]
            assert len(line) + 1 + len(next_word) > WIDTH, (line, following)
