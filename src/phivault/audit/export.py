"""Exporting the audit trail (SPEC §8, `phivault audit export`): the chained events between
optional times, in `seq` order and constant memory, as JSON lines or FHIR R4 NDJSON.

- JSON lines (`jsonl`): one object per event with every field, the hashes in hex, so a party
  holding the audit key can recompute the chain from the file alone (`chained_event` reads a
  line back into the form `ChainVerifier` checks).
- FHIR (`fhir`): one R4 `AuditEvent` resource per line (NDJSON, the FHIR bulk-data format),
  mapped and validated by `audit/fhir.py`. NDJSON rather than a Bundle: it streams, each line
  stands alone, and bulk-data clients read it as it is.

The export reads the events up to the head it found when it began (callers drain the queue
first, so it holds everything committed), in batches by `seq` (keyset pagination), each batch a
short read-only transaction of its own: memory and transaction length do not grow with the
trail. Chained events are immutable, so the batches agree with one another.

Nothing leaves that could be PHI: metadata keys outside `METADATA_KEYS`, and the clear-text
reason that `BREAK_GLASS` events held before reasons were sealed, are left out of both formats
and named in the JSON line's `redacted`; such an event's own hash cannot be recomputed from the
file (its successor's `prev_hash` still links to it).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import ColumnElement, Row, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from phivault.audit.actions import Action
from phivault.audit.chain import ChainedEvent, format_time
from phivault.audit.fhir import audit_event_resource
from phivault.audit.models import AuditEvent, AuditHead
from phivault.audit.service import METADATA_KEYS
from phivault.db.base import core_table
from phivault.db.engine import READ_ONLY

EXPORT_BATCH = 1000

_EVENTS, _HEAD = core_table(AuditEvent), core_table(AuditHead)
_COLUMNS = (_EVENTS.c.seq, _EVENTS.c.event_id, _EVENTS.c.at, _EVENTS.c.actor_id,
            _EVENTS.c.actor_role, _EVENTS.c.action, _EVENTS.c.resource_type,
            _EVENTS.c.resource_id, _EVENTS.c.patient_id, _EVENTS.c.outcome, _EVENTS.c.ip,
            _EVENTS.c.user_agent, _EVENTS.c.request_id, _EVENTS.c.metadata,
            _EVENTS.c.prev_hash, _EVENTS.c.hash)


class ExportFormat(StrEnum):
    JSONL = "jsonl"
    FHIR = "fhir"


class ExportWriteError(Exception):
    """The export file could not be created, written or put in place (the message names the
    path and the system's reason, nothing read from the trail)."""


class ExportWindowError(ValueError):
    """A `since`/`until` that is naive, or a window that ends before it begins."""


@dataclass(frozen=True, slots=True)
class ExportWindow:
    """Events with `since <= at < until` (either bound optional; aware datetimes)."""

    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for name, value in (("since", self.since), ("until", self.until)):
            if value is not None and value.utcoffset() is None:
                raise ExportWindowError(f"{name} needs a time zone")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ExportWindowError("since must be before until")

    def conditions(self) -> list[ColumnElement[bool]]:
        found: list[ColumnElement[bool]] = []
        if self.since is not None:
            found.append(_EVENTS.c.at >= self.since)
        if self.until is not None:
            found.append(_EVENTS.c.at < self.until)
        return found


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """What an export will write: `count` events, all with `first_seq <= seq <= last_seq`,
    fixed when the export began (events chained later are not part of it)."""

    window: ExportWindow
    count: int
    first_seq: int
    last_seq: int


async def _read_only(session: AsyncSession) -> None:
    await session.connection(execution_options={READ_ONLY: True})


async def plan_export(sessions: async_sessionmaker[AsyncSession],
                      window: ExportWindow) -> ExportPlan:
    """Count the events in `window` up to the current head, and their `seq` bounds, so the
    export reads only that range (the time index finds it: `at` follows `seq` closely)."""
    async with sessions() as session:
        await _read_only(session)
        head = (await session.execute(select(_HEAD.c.seq).where(_HEAD.c.id == 1))
                ).scalar_one_or_none() or 0
        row = (await session.execute(
            select(func.count(), func.min(_EVENTS.c.seq), func.max(_EVENTS.c.seq))
            .where(_EVENTS.c.seq <= head, *window.conditions()))).one()
        await session.rollback()
    count, first, last = row
    return ExportPlan(window, int(count), int(first or 1), int(last or 0))


async def event_batches(sessions: async_sessionmaker[AsyncSession], plan: ExportPlan,
                        batch_size: int = EXPORT_BATCH) -> AsyncIterator[Sequence[Any]]:
    """The planned events in `seq` order, `batch_size` at a time, each batch read in a short
    read-only transaction of its own (keyset pagination on `seq`)."""
    after = plan.first_seq - 1
    while after < plan.last_seq:
        query = (select(*_COLUMNS)
                 .where(_EVENTS.c.seq > after, _EVENTS.c.seq <= plan.last_seq,
                        *plan.window.conditions())
                 .order_by(_EVENTS.c.seq).limit(batch_size))
        async with sessions() as session:
            await _read_only(session)
            rows = (await session.execute(query)).all()
            await session.rollback()
        if not rows:
            return
        yield rows
        after = rows[-1].seq


def exportable_metadata(action: str, metadata: Mapping[str, Any] | None
                        ) -> tuple[dict[str, Any], list[str]]:
    """The metadata that may leave in an export, and the keys held back: keys outside the
    allowlist, and a `BREAK_GLASS` event's clear-text `reason` (PHI, from before reasons were
    sealed; auditors read it through the audit API)."""
    kept: dict[str, Any] = {}
    held: list[str] = []
    for key, value in (metadata or {}).items():
        if key not in METADATA_KEYS or (action == Action.BREAK_GLASS and key == "reason"):
            held.append(key)
        else:
            kept[key] = value
    return kept, sorted(held)


def _uuid(value: uuid.UUID | None) -> str | None:
    return str(value) if value is not None else None


def jsonl_object(row: Row[Any]) -> dict[str, Any]:
    """Every field of one event as JSON (hashes in hex, times in the chain's own form)."""
    metadata, held = exportable_metadata(row.action, row.metadata)
    line: dict[str, Any] = {
        "seq": row.seq, "event_id": _uuid(row.event_id), "at": format_time(row.at),
        "actor_id": _uuid(row.actor_id), "actor_role": row.actor_role, "action": row.action,
        "resource_type": row.resource_type, "resource_id": row.resource_id,
        "patient_id": _uuid(row.patient_id), "outcome": row.outcome, "ip": row.ip,
        "user_agent": row.user_agent, "request_id": row.request_id, "metadata": metadata,
        "prev_hash": bytes(row.prev_hash).hex(), "hash": bytes(row.hash).hex(),
    }
    if held:
        line["redacted"] = [f"metadata.{key}" for key in held]
    return line


def fhir_object(row: Row[Any]) -> dict[str, Any]:
    """The event as a validated FHIR R4 AuditEvent (`FhirMappingError` if it cannot be)."""
    return audit_event_resource(row, exportable_metadata(row.action, row.metadata)[0])


_RENDER: dict[ExportFormat, Callable[[Row[Any]], dict[str, Any]]] = {
    ExportFormat.JSONL: jsonl_object, ExportFormat.FHIR: fhir_object}


def render_lines(rows: Sequence[Row[Any]], fmt: ExportFormat) -> bytes:
    """One batch of events in `fmt`, one JSON object per line."""
    render = _RENDER[fmt]
    return b"".join(orjson.dumps(render(row)) + b"\n" for row in rows)


async def write_export(sessions: async_sessionmaker[AsyncSession], plan: ExportPlan,
                       fmt: ExportFormat, sink: IO[bytes],
                       advance: Callable[[int], None] | None = None,
                       batch_size: int = EXPORT_BATCH) -> int:
    """Write the planned events to `sink` in `fmt`, batch by batch; returns how many.
    `advance(n)` is called after each batch (a progress bar)."""
    written = 0
    async for rows in event_batches(sessions, plan, batch_size):
        try:
            sink.write(render_lines(rows, fmt))
        except OSError as exc:
            raise ExportWriteError(f"cannot write the export: {exc.strerror or exc}") from exc
        written += len(rows)
        if advance is not None:
            advance(len(rows))
    return written


def chained_event(line: Mapping[str, Any]) -> ChainedEvent:
    """A JSON-lines export's event back in the form `ChainVerifier` checks: an external party
    with the audit key recomputes the chain from the file (redacted events excepted)."""

    def optional_uuid(value: str | None) -> uuid.UUID | None:
        return uuid.UUID(value) if value is not None else None

    return ChainedEvent(
        seq=line["seq"], at=datetime.fromisoformat(line["at"]).astimezone(UTC),
        actor_id=optional_uuid(line["actor_id"]), actor_role=line["actor_role"],
        action=line["action"], resource_type=line["resource_type"],
        resource_id=line["resource_id"], patient_id=optional_uuid(line["patient_id"]),
        outcome=line["outcome"], ip=line["ip"], user_agent=line["user_agent"],
        request_id=line["request_id"], metadata=line["metadata"],
        prev_hash=bytes.fromhex(line["prev_hash"]), hash=bytes.fromhex(line["hash"]))


@contextmanager
def private_output(path: Path) -> Iterator[IO[bytes]]:
    """A file readable by its owner only (0600), written beside `path` under a temporary name
    and renamed onto `path` when the block ends without error (removed otherwise), so `path`
    is never a partial export. `ExportWriteError` at once if `path` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ExportWriteError(f"cannot write {path}: it is a directory")
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".part")
    except OSError as exc:
        raise ExportWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as sink:
            os.fchmod(sink.fileno(), 0o600)  # mkstemp's mode already, whatever the umask
            yield sink
            try:
                sink.flush()
                os.fsync(sink.fileno())
            except OSError as exc:
                raise ExportWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
        try:
            os.replace(temporary, path)
        except OSError as exc:
            raise ExportWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
