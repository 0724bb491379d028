"""`phivault audit verify`: check the tamper-evident chain."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from phivault.audit import service
from phivault.audit.actions import Action
from phivault.audit.chain import VerifyResult
from phivault.cli.common import run_with_runtime
from phivault.runtime import Runtime

app = typer.Typer(help="Verify the audit trail.", no_args_is_help=True)


@app.command()
def verify(
    as_json: Annotated[bool, typer.Option("--json", help="Print {ok, events, first_bad_seq}.")]
    = False,
) -> None:
    """Recompute the HMAC chain. Exit 0 when it holds, 1 when it does not."""

    async def work(runtime: Runtime) -> VerifyResult:
        result = await service.verify_snapshot(runtime.sessions, runtime.audit_key)
        async with runtime.unit_of_work() as session:
            service.record(session, Action.VERIFY_AUDIT_CHAIN,
                           metadata={"ok": result.ok, "events": result.events,
                                     "first_bad_seq": result.first_bad_seq})
        return result

    result = run_with_runtime("audit-verify", work)
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
    elif result.ok:
        typer.echo(f"audit chain holds: {result.events} events")
    else:
        typer.echo(f"audit chain BROKEN at seq {result.first_bad_seq} "
                   f"({result.events} events read)")
    raise typer.Exit(0 if result.ok else 1)
