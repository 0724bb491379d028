"""`phivault keys generate|status|rewrap|reindex`: key material, master-key rotation and
index-key rotation."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Annotated

import typer
from sqlalchemy import func, select

from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.auth.models import User
from phivault.auth.reindex import reindex_batch
from phivault.cli.common import command_group, fail, progress, run_with_runtime
from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.keys import service
from phivault.runtime import Runtime

app = command_group("Generate keys, count data keys per master key, re-wrap after a master "
                    "key rotation, re-index after an index key rotation.")


@app.command()
def generate(
    kind: Annotated[KeyKind, typer.Option(help="Which variable the key is for.")] = KeyKind.MASTER,
) -> None:
    """Print one new key in the form its variable takes.

    master, jwt and audit-signing: `id:base64url`; index and audit: bare base64url. Keys are 32
    random bytes (jwt and audit-signing: Ed25519 seeds).
    To rotate the master key, put the new line FIRST in PHIVAULT_MASTER_KEYS (keep the old ones
    after it), restart, then run `phivault keys rewrap`.
    """
    typer.echo(generate_key_line(kind))


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Count the data keys each master key wraps."""

    async def work(runtime: Runtime) -> service.KeyStatus:
        async with runtime.sessions() as session:
            return await service.key_status(session, runtime.envelope)

    result = run_with_runtime("keys-status", work)
    if as_json:
        typer.echo(json.dumps({"active": result.active, "deks": result.deks}))
    else:
        typer.echo(f"active master key: {result.active}")
        for kek_id, count in result.deks.items():
            marker = " (active)" if kek_id == result.active else ""
            missing = " (NOT IN PHIVAULT_MASTER_KEYS)" if kek_id in result.unknown else ""
            typer.echo(f"  {kek_id}: {count} data keys{marker}{missing}")
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)


@app.command()
def rewrap(
    batch_size: Annotated[int, typer.Option(min=1, max=100_000,
                                            help="Data keys per transaction.")] = 5000,
) -> None:
    """Re-wrap every data key under the active master key, without decrypting any PHI.

    Batched, resumable after a crash (each batch commits on its own), idempotent, and safe
    while the server serves. Exits 0 when every data key is under the active master key.
    """

    async def work(runtime: Runtime) -> tuple[int, int]:
        async with runtime.sessions() as session:
            total = await service.count_to_rewrap(session, runtime.envelope)
        done, failed = 0, set[uuid.UUID]()
        after: uuid.UUID | None = None  # passes over the table by id; see `rewrap_batch`
        with progress("rewrap", total) as report:
            while True:
                async with runtime.unit_of_work() as session:
                    batch = await service.rewrap_batch(session, runtime.envelope, batch_size,
                                                       failed, after=after)
                failed.update(batch.failed)
                done += batch.rewritten
                report.advance(batch.rewritten + len(batch.failed))
                if batch.last_id is not None:
                    after = batch.last_id
                elif after is not None:
                    # The end of a pass: one more from the start, for rows another rewrap held
                    # or a server not yet restarted wrapped under an old key meanwhile.
                    after = None
                elif batch.locked:
                    await asyncio.sleep(0.2)  # another rewrap holds rows; wait for it
                else:
                    break
        async with runtime.unit_of_work() as session:
            audit.record(session, Action.KEY_REWRAP,
                         metadata={"rewrapped": done, "failed": len(failed),
                                   "active": runtime.envelope.ring.active_id})
        async with runtime.sessions() as session:
            return await service.count_to_rewrap(session, runtime.envelope), len(failed)

    left, failed = run_with_runtime("keys-rewrap", work)
    if failed:
        fail(f"{failed} data keys failed their integrity check and were left as they are "
             "(their data cannot be read); the others are re-wrapped")
    if left:
        fail(f"{left} data keys are still under a master key that is not in "
             "PHIVAULT_MASTER_KEYS; see `phivault keys status`")
    typer.echo("every data key is wrapped by the active master key")


@app.command()
def reindex(
    batch_size: Annotated[int, typer.Option(min=1, max=100_000,
                                            help="Accounts per transaction.")] = 2000,
) -> None:
    """Make every account's email blind index again under the current PHIVAULT_INDEX_KEY.

    To rotate the index key: put the new key in PHIVAULT_INDEX_KEY and the old one in
    PHIVAULT_INDEX_KEY_PREVIOUS, restart the servers (logins then match either), run this, and
    once it reports every index current, remove PHIVAULT_INDEX_KEY_PREVIOUS and restart.
    Batched, resumable after a crash, idempotent, and safe while the server serves. Exits 1
    when some account's email failed its integrity check (left as it is).
    """

    async def work(runtime: Runtime) -> tuple[int, int, int, int]:
        async with runtime.sessions() as session:
            total = int((await session.execute(
                select(func.count()).select_from(User).where(User.email_index.is_not(None)))
            ).scalar_one())
        seen = changed = 0
        failed: list[uuid.UUID] = []
        conflicts: list[uuid.UUID] = []
        after: uuid.UUID | None = None
        with progress("reindex", total) as report:
            while True:
                async with runtime.unit_of_work() as session:
                    batch = await reindex_batch(session, runtime.envelope,
                                                runtime.blind_index, after, batch_size)
                if batch.last_id is None:
                    break
                after = batch.last_id
                seen, changed = seen + batch.seen, changed + batch.changed
                failed += batch.failed
                conflicts += batch.conflicts
                report.advance(batch.seen)
        async with runtime.unit_of_work() as session:
            audit.record(session, Action.KEY_REINDEX,
                         metadata={"accounts": seen, "reindexed": changed,
                                   "failed": len(failed) + len(conflicts)})
        return seen, changed, len(failed), len(conflicts)

    seen, changed, failed, conflicts = run_with_runtime("keys-reindex", work)
    if conflicts:
        fail(f"{conflicts} accounts share an email with another account (registered while a "
             "server ran the new index key without PHIVAULT_INDEX_KEY_PREVIOUS); they kept "
             "their index: see the README's index-key rotation")
    if failed:
        fail(f"{failed} accounts' emails failed their integrity check and kept their index "
             f"(the other {seen - failed} are current; {changed} were made again)")
    typer.echo(f"every email index is under the current PHIVAULT_INDEX_KEY ({seen} accounts, "
               f"{changed} made again)")
