"""`phivault research export`: a de-identified data set (HIPAA Safe Harbor, SPEC §9)."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Annotated

import typer

from phivault.audit import service
from phivault.audit.actions import Action, Outcome
from phivault.audit.export import ExportWriteError
from phivault.cli.common import command_group, fail, progress, run_writing, settings_or_exit
from phivault.crypto import IntegrityError
from phivault.db.base import utcnow
from phivault.privacy.research import (
    ResearchExportChanged,
    ResearchPseudonyms,
    ResearchSummary,
    count_candidates,
    count_groups,
    write_research_export,
)
from phivault.runtime import Runtime

app = command_group("De-identified research exports (SPEC §9).")


@app.command()
def export(
    out: Annotated[Path, typer.Option(
        "--out", dir_okay=False,
        help="The JSON-lines file to write, mode 0600; written aside and renamed at the end.")],
    k: Annotated[int, typer.Option(
        "--k", min=1, help="k-anonymity: leave out each patient whose birth year (or 90+) and "
                           "sex are shared by fewer than K exported patients.")] = 1,
    study: Annotated[str | None, typer.Option(
        help="Give this study pseudonyms of its own (a-z 0-9 . _ -), so that its data set "
             "cannot be joined with another study's.")] = None,
) -> None:
    """Write the de-identified data of the patients whose current analytics consent is true.

    One JSON object a line, per patient: {patient, birth_year, age, sex, records: [{record,
    year, versions, diagnosis}], prescriptions: [{year, medication, dosage}], consultations:
    [{year, status}]}. HIPAA Safe Harbor: no names, contacts, addresses or real ids; ids are
    keyed pseudonyms (HMAC-SHA256 under a key derived from PHIVAULT_INDEX_KEY: the same on
    every run, changed by rotating that key); dates are years; from age 90, age is "90+" and
    the birth year is left out; free text (notes, reasons, instructions) is never read.
    Diagnoses, medications and dosages are kept as the research payload; one that names the
    patient or looks like an identifier is withheld (null). Erased patients never appear.

    Ends with a summary line (patients, records, suppressed, withheld) and records a
    RESEARCH_EXPORT audit event with those counts.
    """
    settings = settings_or_exit()
    try:
        pseudonyms = ResearchPseudonyms.from_index_key(settings.index_key_bytes, study)
    except ValueError as exc:
        fail(f"--study: {exc}", 2)
    year = utcnow().year

    async def work(runtime: Runtime, sink: IO[bytes]) -> ResearchSummary:
        try:
            candidates = await count_candidates(runtime.sessions)
            # Two passes over the same patients: counting the groups, then writing.
            with progress("research export", 2 * candidates) as bar:
                bar.advance(0)
                groups = await count_groups(runtime.sessions, runtime.envelope, year,
                                            advance=bar.advance)
                summary = await write_research_export(
                    runtime.sessions, runtime.envelope, pseudonyms, groups, sink, year=year,
                    k=k, advance=bar.advance)
        except IntegrityError:
            async with runtime.unit_of_work() as session:
                service.record(session, Action.INTEGRITY_FAILURE, outcome=Outcome.ERROR,
                               resource_type="research_export")
            raise
        async with runtime.unit_of_work() as session:
            # Counts only, no PHI.
            service.record(session, Action.RESEARCH_EXPORT, resource_type="research_export",
                           metadata={"kind": "research", "format": "jsonl",
                                     "patients": summary.patients, "records": summary.records,
                                     "suppressed": summary.suppressed})
        return summary

    try:
        summary = run_writing("research-export", out, work)
    except ExportWriteError as exc:
        fail(str(exc))
    except ResearchExportChanged:
        fail("consents or profiles changed during the export, so a group fell below --k; "
             "nothing was written: run it again")
    except IntegrityError:
        fail("a stored value failed authentication (integrity failure, audited); "
             "nothing was written")
    typer.echo(f"research export: {summary.patients} patients, {summary.records} records, "
               f"{summary.suppressed} suppressed (k={k}), {summary.withheld} values withheld; "
               f"written to {out}")
