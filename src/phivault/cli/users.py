"""`phivault users create|list|disable|import`: accounts from the command line."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Annotated

import typer

from phivault.access.permissions import Role
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.auth.accounts import ImportReport
from phivault.auth.models import AuthSession, User
from phivault.auth.schemas import UserView
from phivault.auth.service import revoke_sessions
from phivault.cli.common import command_group, fail, run_with_runtime
from phivault.errors import PhivaultError
from phivault.runtime import Runtime

app = command_group("Create, list, disable and import user accounts.")


@app.command()
def create(
    email: Annotated[str, typer.Argument(help="The new user's email.")],
    role: Annotated[Role, typer.Option(help="patient, doctor, admin or auditor.")],
    full_name: Annotated[str, typer.Option("--full-name", help="Their full name.")],
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from standard input (required).")] = False,
    specialty: Annotated[str | None, typer.Option(help="A doctor's specialty.")] = None,
) -> None:
    """Create a user with a password read from standard input; prints the new user's id.

    For the first admin: `printf %s "$PASSWORD" | phivault users create admin@clinic.example
    --role admin --full-name "Ada Admin" --password-stdin`. The password is never an argument,
    so it stays out of shell history and process lists.
    """
    if not password_stdin:
        fail("pass --password-stdin and the password on standard input", 2)
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        fail("no password on standard input", 2)
    if specialty and role != Role.DOCTOR:
        fail("--specialty is for doctors only", 2)
    if not 1 <= len(full_name.strip()) <= 200 or "@" not in email or len(email) > 254:
        fail("bad email or --full-name", 2)

    async def work(runtime: Runtime) -> uuid.UUID:
        async with runtime.unit_of_work() as session:
            user = await runtime.accounts.create_with_password(
                session, email.strip(), role.value, full_name.strip(), specialty, password)
            return user.id

    try:
        typer.echo(str(run_with_runtime("users-create", work)))
    except PhivaultError as exc:
        fail(exc.detail)


@app.command("list")
def list_users(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Every account: id, email, role, status (no PHI beyond the email). Audited."""

    async def work(runtime: Runtime) -> list[UserView]:
        views: list[UserView] = []
        async with runtime.unit_of_work() as session:
            while True:
                page, total = await runtime.accounts.list_users(session, 500, len(views))
                views += page
                if not page or len(views) >= total:
                    return views

    for view in run_with_runtime("users-list", work):
        if as_json:
            typer.echo(view.model_dump_json())
        else:
            typer.echo(f"{view.id}  {view.role:<8} {view.status:<8} {view.email or '-'}")


@app.command()
def disable(
    user_id: Annotated[uuid.UUID, typer.Argument(help="The user's id.")],
) -> None:
    """Disable an account and end every session of it at once."""

    async def work(runtime: Runtime) -> bool:
        async with runtime.unit_of_work() as session:
            user = await session.get(User, user_id)
            if user is None or user.status == "deleted":
                return False
            user.status = "disabled"
            revoked = await revoke_sessions(session, AuthSession.user_id == user_id)
            audit.record(session, Action.UPDATE_USER, resource_type="user", resource_id=user_id,
                         metadata={"status": "disabled", "sessions_revoked": revoked,
                                   "via": "cli"})
            return True

    if not run_with_runtime("users-disable", work):
        fail(f"no active or disabled user {user_id}")
    typer.echo(f"disabled {user_id}")


@app.command("import")
def import_users(
    file: Annotated[Path, typer.Argument(help="A .jsonl file: one user per line.",
                                         exists=True, dir_okay=False, readable=True)],
) -> None:
    """Import users from another system: one JSON object a line with `email`, `role`,
    `full_name` and a bcrypt `password_hash`. They sign in with their old password, which is
    then re-hashed with argon2id. Prints how many were imported and skipped; taken emails and
    bad lines are skipped and listed on stderr (by line number, never their content)."""
    lines = file.read_text(encoding="utf-8").splitlines()

    async def work(runtime: Runtime) -> ImportReport:
        async with runtime.unit_of_work() as session:
            return await runtime.accounts.import_users(session, lines)

    report = run_with_runtime("users-import", work)
    for problem in report.problems:
        typer.echo(f"skipped {problem}", err=True)
    typer.echo(f"imported {report.imported}, skipped {report.skipped}")
