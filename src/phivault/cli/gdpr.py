"""`phivault gdpr`: the data-subject rights of SPEC §9 for requests that arrive by post or to
the data-protection officer: export, erasure, proof of consent."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated

import typer

from phivault.audit.export import ExportWriteError
from phivault.cli.common import command_group, fail, progress, run_with_runtime, run_writing
from phivault.crypto import IntegrityError
from phivault.errors import NotFound, PhivaultError
from phivault.privacy import consents, erasure, export
from phivault.privacy.export import ExportFormat, NoSuchPatient
from phivault.privacy.fhir import FhirExportError
from phivault.runtime import Runtime

app = command_group("Data-subject rights: export, erase, proof of consent (SPEC §9).")


def _user_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        fail("USER_ID must be a user's id (a UUID)", 2)


@app.command("export")
def export_data(
    user_id: Annotated[str, typer.Argument(help="The patient's id.", show_default=False)],
    out: Annotated[Path, typer.Option(
        "--out", dir_okay=False,
        help="The file to write, mode 0600; written aside and renamed at the end.")],
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", help="json: one JSON document of every section; fhir: a FHIR R4 Bundle "
                         "(type collection).")] = ExportFormat.JSON,
) -> None:
    """Export everything phivault holds about a patient, decrypted, as `GET /api/v1/me/export`
    does (GDPR articles 15 and 20), for a request that arrives by post. An erased patient's
    medical history is exported under the pseudonymous id, without identity data.

    Streams page by page in bounded memory, with a progress bar. Audited as `DATA_EXPORT`
    (actor: the CLI) before it starts. The file holds PHI: it is created 0600; hand it over
    securely and delete it."""
    patient = _user_id(user_id)

    async def work(runtime: Runtime, sink: IO[bytes]) -> int:
        async with runtime.unit_of_work() as session:
            await export.require_patient(session, patient)
            export.record(session, patient, fmt, via="cli")
        try:
            start = await export.begin(runtime, patient)
        except IntegrityError:
            await export.integrity_failure(runtime, patient)  # `write` records its own
            raise
        with progress("gdpr export", await export.size(runtime, start, fmt)) as bar:
            bar.advance(0)
            return await export.write(runtime, start, fmt, sink, bar.advance)

    try:
        count = run_writing("gdpr-export", out, work)
    except NoSuchPatient:
        fail(f"no patient has the id {patient}")
    except IntegrityError:
        fail("stored data failed its integrity check; the export stopped and the failure was "
             "audited (INTEGRITY_FAILURE)")
    except (ExportWriteError, FhirExportError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or type(exc).__name__}")
    typer.echo(f"exported {count} items of patient {patient} ({fmt}) to {out}")


@app.command()
def erase(
    user_id: Annotated[str, typer.Argument(help="The patient's id.", show_default=False)],
) -> None:
    """Erase a patient's account, as `DELETE /api/v1/me` does (GDPR article 17), for a request
    that arrives by post. In one transaction: identity destroyed with the data keys that sealed
    it (the birth date cut to its year), every session ended, notifications deleted, consents
    withdrawn, open future consultations cancelled, status `deleted`. Medical records,
    prescriptions, consultations, payments and the audit trail stay under the pseudonymous
    id. Idempotent: erasing an erased account changes nothing and exits 0. Audited as
    `ACCOUNT_ERASED`."""
    patient = _user_id(user_id)

    async def work(runtime: Runtime) -> erasure.Erasure:
        async with runtime.unit_of_work() as session:
            done = await erasure.erase(session, runtime.envelope, patient)
        await erasure.forget_on_disk(runtime.engine)
        return done

    try:
        done = run_with_runtime("gdpr-erase", work)
    except PhivaultError as exc:
        fail("no such user" if exc.code == "not_found" else exc.detail)
    if done.already_erased:
        typer.echo(f"patient {patient} was already erased; nothing more to do")
    else:
        typer.echo(f"patient {patient} erased: {done.sessions_revoked} sessions ended, "
                   f"{done.notifications_deleted} notifications deleted, "
                   f"{done.consultations_cancelled} consultations cancelled, "
                   f"{done.data_keys_destroyed} data keys destroyed")


@app.command("consents")
def consent_proof(
    user_id: Annotated[str, typer.Argument(help="The patient's id.", show_default=False)],
    at: Annotated[str | None, typer.Option(
        help="An ISO 8601 time with an offset, e.g. 2026-03-01T09:00:00+00:00: print the "
             "consents in force at that instant.")] = None,
    history: Annotated[bool, typer.Option(
        "--history", help="Print every version, oldest first.")] = False,
) -> None:
    """Proof of consent (GDPR article 7(1)) for the data-protection officer: a patient's
    current consents as JSON, those in force at a past instant (`--at`), or the whole
    history (`--history`). Exit 1 when no consent was recorded at that instant. Audited as
    `VIEW_CONSENT`."""
    patient = _user_id(user_id)
    if at is not None and history:
        fail("give --at or --history, not both", 2)
    instant = _instant(at) if at is not None else None

    async def work(runtime: Runtime) -> object:
        async with runtime.unit_of_work() as session:
            if history:
                versions = await consents.history(session, patient)
                if not versions:
                    raise NotFound()
                return [view.model_dump(mode="json") for view in versions]
            view = (await consents.at(session, patient, instant) if instant is not None
                    else await consents.current(session, patient))
            return view.model_dump(mode="json")

    try:
        answer = run_with_runtime("gdpr-consents", work)
    except PhivaultError as exc:
        fail(exc.detail if exc.code == "not_found" and instant is not None
             else "no such patient" if exc.code == "not_found" else exc.detail)
    typer.echo(json.dumps(answer, indent=2))


def _instant(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        fail("--at must be an ISO 8601 time, e.g. 2026-03-01T09:00:00+00:00", 2)
    if when.tzinfo is None:
        fail("--at needs an offset (+00:00 or Z): a time without one is ambiguous", 2)
    return when
