"""`phivault audit verify`: check the tamper-evident chain."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated

import typer

from phivault.audit import service
from phivault.audit.actions import Action, Outcome
from phivault.audit.chain import VerifyResult
from phivault.audit.checkpoint import (
    ChainBroken,
    Checkpoint,
    CheckpointFormatError,
    check_signature,
    parse_checkpoint,
    take_checkpoint,
)
from phivault.audit.export import (
    ExportFormat,
    ExportWindow,
    ExportWindowError,
    ExportWriteError,
    plan_export,
    write_export,
)
from phivault.audit.fhir import FhirMappingError
from phivault.audit.verify import Anchor
from phivault.cli.common import (
    command_group,
    fail,
    progress,
    run_with_runtime,
    run_writing,
    settings_or_exit,
)
from phivault.config import ConfigError, Settings
from phivault.crypto.audit_signing import CheckpointSignatureError
from phivault.runtime import Runtime

app = command_group("Verify the audit trail.")


@app.command()
def verify(
    as_json: Annotated[bool, typer.Option("--json", help="Print {ok, events, first_bad_seq}.")]
    = False,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", exists=True, dir_okay=False, readable=True,
        help="A file from `phivault audit checkpoint`: prove its head unchanged, then verify "
             "only the events after it (events counts those).")] = None,
) -> None:
    """Recompute the HMAC chain. Exit 0 when it holds, 1 when it does not.

    With --checkpoint, the checkpoint's signature must verify with PHIVAULT_AUDIT_SIGNING_KEY;
    then the event at its seq must still have its hash (so a tail cut off below it is found),
    and only the events after it are read. A bad or foreign checkpoint exits 1.
    """
    settings = settings_or_exit()
    anchor = _checked_anchor(checkpoint, settings) if checkpoint is not None else None

    async def work(runtime: Runtime) -> VerifyResult:
        result = await service.verify_snapshot(runtime.sessions, runtime.audit_key,
                                               runtime.sequencer, runtime.queue_key,
                                               checkpoint=anchor)
        async with runtime.unit_of_work() as session:
            service.record(session, Action.VERIFY_AUDIT_CHAIN,
                           resource_type="audit_checkpoint" if anchor else None,
                           resource_id=str(anchor.seq) if anchor else None,
                           metadata={"ok": result.ok, "events": result.events,
                                     "first_bad_seq": result.first_bad_seq})
        return result

    result = run_with_runtime("audit-verify", work, settings)
    since = f" after the checkpoint at seq {anchor.seq}" if anchor else ""
    if as_json:
        # SPEC §12's three fields, and what was found in the queue.
        typer.echo(json.dumps(result.report()))
    elif result.ok:
        held = f"checkpoint at seq {anchor.seq} holds; " if anchor else ""
        typer.echo(f"{held}audit chain holds: {result.events} events{since}")
    elif result.first_bad_seq is not None:
        typer.echo(f"audit chain BROKEN at seq {result.first_bad_seq} "
                   f"({result.events} events read{since})")
    else:
        typer.echo(f"audit chain holds ({result.events} events{since}), but queued events "
                   "were tampered with (rejected, never chained): queue ids "
                   + ", ".join(map(str, result.queue_tampered)))
    if result.queue_stale:
        typer.echo(f"warning: {result.queue_stale} queued events had waited longer than the "
                   "merge delay (is a server's sequencer running?)", err=True)
    raise typer.Exit(0 if result.ok else 1)


def _checked_anchor(path: Path, settings: Settings) -> Anchor:
    """The head a checkpoint file proves, once its signature is ours; else one line and exit
    1 (2 when no checkpoint key is configured)."""
    try:
        signer = settings.require_checkpoint_signer()
    except ConfigError as exc:
        fail(str(exc), 2)
    try:
        return check_signature(parse_checkpoint(path.read_bytes()), signer)
    except (CheckpointFormatError, CheckpointSignatureError) as exc:
        fail(f"checkpoint {path}: {exc}")
    except OSError as exc:
        fail(f"checkpoint {path}: cannot read the file ({exc.strerror or type(exc).__name__})")


@app.command()
def checkpoint(
    out: Annotated[Path | None, typer.Option(
        "--out", dir_okay=False, help="Write the checkpoint to this file instead of printing "
                                      "it.")] = None,
    after: Annotated[Path | None, typer.Option(
        "--after", exists=True, dir_okay=False, readable=True,
        help="The previous checkpoint file: verify only the events after its head (which it "
             "proves unchanged) instead of the whole chain.")] = None,
) -> None:
    """Verify the chain, then sign its head with PHIVAULT_AUDIT_SIGNING_KEY (Ed25519).

    Chains every committed event first and verifies the chain (the whole of it, or with
    --after only what follows the previous checkpoint); a broken chain is never signed: it
    exits 1 naming the first bad seq. Then prints (or writes) JSON {seq, hash, at, key_id,
    signature}: hash in hex, at the UTC time the checkpoint was taken, signature base64url
    over the other four fields as canonical JSON. Keep it outside the database: `phivault
    audit verify --checkpoint FILE` then proves that head unchanged and verifies only the
    events after it. Records an AUDIT_CHECKPOINT event.
    """
    settings = settings_or_exit()
    try:
        signer = settings.require_checkpoint_signer()
    except ConfigError as exc:
        fail(str(exc), 2)
    anchor = _checked_anchor(after, settings) if after is not None else None

    async def work(runtime: Runtime) -> Checkpoint | VerifyResult:
        try:
            signed, result = await take_checkpoint(runtime.sessions, signer, runtime.audit_key,
                                                   runtime.sequencer, after=anchor)
        except ChainBroken as broken:
            signed, result = None, broken.result
        async with runtime.unit_of_work() as session:
            service.record(session, Action.AUDIT_CHECKPOINT,
                           outcome=Outcome.SUCCESS if signed else Outcome.ERROR,
                           resource_type="audit_chain", resource_id=str(result.head_seq),
                           metadata={"ok": result.ok, "events": result.events,
                                     "first_bad_seq": result.first_bad_seq})
        return signed or result

    made = run_with_runtime("audit-checkpoint", work, settings)
    if isinstance(made, VerifyResult):
        fail(f"audit chain BROKEN at seq {made.first_bad_seq}: no checkpoint signed "
             "(run `phivault audit verify` for the details)")
    if out is None:
        typer.echo(made.dumps(), nl=False)
        return
    try:
        out.write_text(made.dumps(), encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {out} ({exc.strerror or type(exc).__name__})")
    typer.echo(f"checkpoint of the head at seq {made.seq} written to {out}")


def _aware_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option} must be an ISO 8601 time with a zone, e.g. 2025-01-31T00:00:00Z", 2)
    if parsed.utcoffset() is None:
        fail(f"{option} needs a time zone, e.g. 2025-01-31T00:00:00Z or ...T00:00:00+01:00", 2)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        fail(f"{option} must be a time between 0001-01-01 and 9999-12-31 in UTC", 2)


@app.command()
def export(
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", help="jsonl: every field, hashes in hex (re-verifiable with the audit key); "
                         "fhir: FHIR R4 AuditEvent resources, one per line (NDJSON).")],
    out: Annotated[Path, typer.Option(
        "--out", help="The file to write, mode 0600; written aside and renamed at the end.")],
    since: Annotated[str | None, typer.Option(
        help="Only events at or after this ISO 8601 time (with a zone).")] = None,
    until: Annotated[str | None, typer.Option(
        help="Only events before this ISO 8601 time (with a zone).")] = None,
) -> None:
    """Stream the audit trail to a file in seq order, in constant memory, with a progress bar.

    Chains every committed event first, exports up to the head it then finds, and records an
    EXPORT_AUDIT_TRAIL event. The file holds no PHI, but it is sensitive: it is created 0600.
    """
    try:
        window = ExportWindow(_aware_time(since, "--since"), _aware_time(until, "--until"))
    except ExportWindowError:
        fail("--since must be before --until", 2)

    async def work(runtime: Runtime, sink: IO[bytes]) -> int:
        await runtime.sequencer.drain()
        plan = await plan_export(runtime.sessions, window)
        with progress("audit export", plan.count) as bar:
            bar.advance(0)
            count = await write_export(runtime.sessions, plan, fmt, sink, bar.advance)
        async with runtime.unit_of_work() as session:
            service.record(session, Action.EXPORT_AUDIT_TRAIL, resource_type="audit_trail",
                           metadata={"count": count, "format": str(fmt),
                                     "since": window.since and window.since.isoformat(),
                                     "until": window.until and window.until.isoformat()})
        return count

    try:
        count = run_writing("audit-export", out, work)
    except (ExportWriteError, FhirMappingError) as exc:
        fail(str(exc))
    typer.echo(f"exported {count} audit events ({fmt}) to {out}")
