"""`phivault gdpr`: the data-subject rights of SPEC §9 for requests that arrive by post or to
the data-protection officer: export, erasure, proof of consent."""

from __future__ import annotations

import typer

app = typer.Typer(help="Data-subject rights: export, erase, proof of consent (SPEC §9).",
                  no_args_is_help=True)
