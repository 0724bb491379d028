"""The `phivault` entry point: the command tree, and one-line failures instead of tracebacks."""

from __future__ import annotations

import sys

import typer

from phivault import __version__
from phivault.cli import audit, demo, gdpr, instance, keys, research, users
from phivault.cli.common import command_group

app = command_group(
    "phivault keeps medical data safe. Every command reads the PHIVAULT_* environment (a .env "
    "file works too; in a development instance's directory, ./var/phivault.env under them); "
    "see the README for each variable.",
    name="phivault", pretty_exceptions_enable=False, add_completion=False,
)
app.command()(instance.init)
app.command()(instance.migrate)
app.command()(instance.serve)
app.command()(demo.demo)
app.add_typer(users.app, name="users")
app.add_typer(keys.app, name="keys")
app.add_typer(audit.app, name="audit")
app.add_typer(gdpr.app, name="gdpr")
app.add_typer(research.app, name="research")


@app.command()
def version() -> None:
    """Print phivault's version."""
    typer.echo(__version__)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("phivault: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        # Only the type: a message could carry a bound value from the database.
        print(f"phivault: unexpected error ({type(exc).__name__})",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
