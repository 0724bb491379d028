"""`phivault research export`: a de-identified data set (HIPAA Safe Harbor, SPEC §9)."""

from __future__ import annotations

import typer

app = typer.Typer(help="De-identified research exports (SPEC §9).", no_args_is_help=True)
