"""`phivault audit export` (SPEC §8, §12): JSON lines that re-verify with the audit key, FHIR R4
AuditEvent NDJSON that `fhir.resources` validates, time windows, constant memory, no PHI, and
the command's file (0600, renamed whole), progress, event and one-line errors."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import stat
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from pydantic import ValidationError
from sqlalchemy import select

from phivault.audit import export, service
from phivault.audit.actions import Action, Outcome
from phivault.audit.chain import ChainVerifier, canonical_json, chain_hash
from phivault.audit.export import (
    ExportFormat,
    ExportPlan,
    ExportWindow,
    ExportWindowError,
    ExportWriteError,
    chained_event,
    plan_export,
    private_output,
    write_export,
)
from phivault.audit.fhir import (
    FhirMappingError,
    action_code,
    audit_event_resource,
    event_type,
    validate_resource,
)
from phivault.audit.models import AuditEvent
from phivault.db.base import utcnow
from phivault.request_context import Actor, RequestContext, reset_request, set_request
from phivault.runtime import Runtime
from tests.conftest import generate_keys
from tests.helpers import cli_env, run_cli

IP = "198.51.100.23"
USER_AGENT = "ExportTests/1.0 (secret-agent-string)"
LEGACY_REASON = "unconscious after fall, suspected bleed"  # PHI, as old events held it


@pytest.fixture
def request_context() -> Iterator[None]:
    token = set_request(RequestContext(request_id=uuid.uuid4().hex, ip=IP,
                                       user_agent=USER_AGENT))
    yield
    reset_request(token)


class Scene(SimpleNamespace):
    doctor: uuid.UUID
    patient: uuid.UUID
    record: uuid.UUID


async def _scene(rt: Runtime) -> Scene:
    """A doctor reads a patient's record, a stranger is refused, the system verifies, an
    integrity failure, an anonymous refusal, a break-glass event as old ones were written."""
    s = Scene(doctor=uuid.uuid4(), patient=uuid.uuid4(), record=uuid.uuid4())
    doctor = Actor(s.doctor, "doctor")
    async with rt.unit_of_work() as session:
        service.record(session, Action.VIEW_MEDICAL_RECORD, actor=doctor,
                       resource_type="medical_record", resource_id=s.record,
                       patient_id=s.patient, metadata={"version": 2})
        service.record(session, Action.UPDATE_PROFILE, actor=Actor(s.patient, "patient"),
                       resource_type="patient_profile", resource_id=s.patient,
                       patient_id=s.patient)
        service.record(session, Action.ACCESS_DENIED, actor=Actor(uuid.uuid4(), "doctor"),
                       outcome=Outcome.DENIED, resource_type="medical_record",
                       resource_id=s.record, patient_id=s.patient,
                       metadata={"reason": "no_care_relationship"})
        service.record(session, Action.INTEGRITY_FAILURE, outcome=Outcome.ERROR)
        service.record(session, Action.INVALID_TOKEN, actor=Actor(None, None),
                       outcome=Outcome.DENIED)
        service.record(session, Action.BREAK_GLASS, actor=doctor, resource_type="break_glass",
                       resource_id=uuid.uuid4(), patient_id=s.patient,
                       metadata={"reason": LEGACY_REASON, "expires_at": "2030-01-01T00:00Z"})
        service.record(session, Action.VIEW_MEDICAL_RECORD, actor=doctor,
                       resource_type="medical_record", resource_id=s.record,
                       patient_id=s.patient, metadata={"break_glass": True})
        service.record(session, Action.VERIFY_AUDIT_CHAIN,
                       metadata={"ok": True, "events": 3, "first_bad_seq": None})
    return s


async def _export(rt: Runtime, fmt: ExportFormat, path: Path,
                  window: ExportWindow | None = None, batch_size: int = 1000) -> int:
    await rt.sequencer.drain()
    plan = await plan_export(rt.sessions, window or ExportWindow())
    with private_output(path) as sink:
        written = await write_export(rt.sessions, plan, fmt, sink, batch_size=batch_size)
    assert written == plan.count
    return written


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def _rows(rt: Runtime) -> list[AuditEvent]:
    async with rt.sessions() as session:
        return list((await session.execute(select(AuditEvent).order_by(AuditEvent.seq)))
                    .scalars())


# JSON lines.

@pytest.mark.usefixtures("request_context")
async def test_jsonl_holds_every_field_and_reverifies_with_the_audit_key(
        fresh_runtime: Callable[..., Any], tmp_path: Path) -> None:
    rt = await fresh_runtime()
    await _scene(rt)
    path = tmp_path / "trail.jsonl"
    assert await _export(rt, ExportFormat.JSONL, path) == 8
    lines = _lines(path)
    rows = await _rows(rt)
    assert len(lines) == len(rows) == 8

    for line, row in zip(lines, rows, strict=True):
        assert set(line) - {"redacted"} == {
            "seq", "event_id", "at", "actor_id", "actor_role", "action", "resource_type",
            "resource_id", "patient_id", "outcome", "ip", "user_agent", "request_id",
            "metadata", "prev_hash", "hash"}
        assert line["seq"] == row.seq and line["event_id"] == str(row.event_id)
        assert datetime.fromisoformat(line["at"]) == row.at
        assert line["actor_id"] == (str(row.actor_id) if row.actor_id else None)
        assert line["patient_id"] == (str(row.patient_id) if row.patient_id else None)
        for name in ("actor_role", "action", "resource_type", "resource_id", "outcome", "ip",
                     "user_agent", "request_id"):
            assert line[name] == getattr(row, name), name
        assert (line["prev_hash"], line["hash"]) == (row.prev_hash.hex(), row.hash.hex())
        assert line["ip"] == IP and line["user_agent"] == USER_AGENT
        if row.action != Action.BREAK_GLASS:
            assert line["metadata"] == row.event_metadata and "redacted" not in line

    # An external party with the key recomputes the chain from the file alone: every event
    # that was not redacted by its own hash, and every link by the next prev_hash.
    glass = next(line for line in lines if line["action"] == Action.BREAK_GLASS)
    assert glass["redacted"] == ["metadata.reason"]
    assert glass["metadata"] == {"expires_at": "2030-01-01T00:00Z"}
    events = [chained_event(line) for line in lines]
    for event, line in zip(events, lines, strict=True):
        if "redacted" not in line:
            assert chain_hash(rt.audit_key, event.prev_hash, canonical_json(event)) == event.hash
    assert all(after.prev_hash == before.hash
               for before, after in zip(events, events[1:], strict=False))

    # Without a redacted event, ChainVerifier checks the whole file as it checks the database.
    rt2 = await fresh_runtime()
    await _scene_without_legacy_reason(rt2)
    whole = tmp_path / "whole.jsonl"
    count = await _export(rt2, ExportFormat.JSONL, whole)
    parsed = [chained_event(line) for line in _lines(whole)]
    verifier = ChainVerifier(rt2.audit_key)
    verifier.feed(parsed)
    result = verifier.finish(parsed[-1].seq, parsed[-1].hash)
    assert (result.ok, result.events) == (True, count)

    # An edit of the file is found at its seq by the same check.
    edited = [dict(line) for line in _lines(whole)]
    edited[2]["actor_role"] = "admin"
    verifier = ChainVerifier(rt2.audit_key)
    verifier.feed(chained_event(line) for line in edited)
    assert verifier.finish(parsed[-1].seq, parsed[-1].hash).first_bad_seq == 3


async def _scene_without_legacy_reason(rt: Runtime) -> None:
    async with rt.unit_of_work() as session:
        for i in range(5):
            service.record(session, Action.VIEW_CONSULTATION,
                           actor=Actor(uuid.uuid4(), "doctor"), resource_type="consultation",
                           resource_id=uuid.uuid4(), patient_id=uuid.uuid4(),
                           metadata={"count": i, "ok": i % 2 == 0})
    async with rt.unit_of_work() as session:
        service.record(session, Action.LOGIN_FAILURE, outcome=Outcome.DENIED,
                       metadata={"reason": "bad_password"})


# FHIR.

@pytest.mark.usefixtures("request_context")
async def test_fhir_lines_are_valid_r4_audit_events_with_documented_references(
        fresh_runtime: Callable[..., Any], tmp_path: Path) -> None:
    rt = await fresh_runtime()
    s = await _scene(rt)
    path = tmp_path / "trail.ndjson"
    assert await _export(rt, ExportFormat.FHIR, path) == 8
    text = path.read_text(encoding="utf-8")
    assert LEGACY_REASON not in text and USER_AGENT not in text
    raw = text.splitlines()
    for line in raw:
        validate_resource(json.loads(line))
    resources = [FhirAuditEvent.model_validate_json(line) for line in raw]
    rows = await _rows(rt)
    by_action: dict[str, list[Any]] = {}
    for resource, row in zip(resources, rows, strict=True):
        assert resource.id == str(row.event_id)
        assert resource.subtype[0].code == row.action
        assert resource.recorded == row.at
        assert resource.source.observer.reference == "Device/phivault"
        assert resource.agent[0].requestor is True
        assert resource.agent[0].network.address == IP
        by_action.setdefault(row.action, []).append(resource)

    read, glass_read = by_action[Action.VIEW_MEDICAL_RECORD]
    assert (read.action, read.outcome, read.type.code) == ("R", "0", "110110")
    assert read.agent[0].who.reference == f"Practitioner/{s.doctor}"
    assert read.agent[0].role[0].coding[0].code == "doctor"
    assert read.agent[0].purposeOfUse is None
    subject, patient = read.entity
    assert subject.what.identifier.value == str(s.record)
    assert subject.type.code == "medical_record"
    assert {(d.type, d.valueString) for d in subject.detail} == {
        ("version", "2"), ("request_id", rows[0].request_id)}
    assert patient.what.reference == f"Patient/{s.patient}" and patient.role.code == "1"
    assert glass_read.agent[0].purposeOfUse[0].coding[0].code == "ETREAT"

    (profile,) = by_action[Action.UPDATE_PROFILE]
    assert (profile.action, profile.agent[0].who.reference) == ("U", f"Patient/{s.patient}")
    (denied,) = by_action[Action.ACCESS_DENIED]
    assert (denied.outcome, denied.type.code, denied.action) == ("4", "110113", "E")
    (failure,) = by_action[Action.INTEGRITY_FAILURE]
    assert failure.outcome == "8"
    assert failure.agent[0].who.reference == "Device/phivault"
    (anonymous,) = by_action[Action.INVALID_TOKEN]
    assert anonymous.agent[0].who is None and anonymous.agent[0].role is None
    (glass,) = by_action[Action.BREAK_GLASS]
    assert {d.type for d in glass.entity[0].detail} == {"expires_at", "request_id"}
    assert glass.agent[0].purposeOfUse[0].coding[0].code == "ETREAT"
    (verified,) = by_action[Action.VERIFY_AUDIT_CHAIN]
    assert (verified.type.code, verified.action) == ("110101", "R")
    assert {(d.type, d.valueString) for d in verified.entity[0].detail} >= {
        ("ok", "true"), ("events", "3")}


def test_every_action_has_a_type_and_a_crude_code() -> None:
    for action in Action:
        assert action_code(action) in {"C", "R", "U", "D", "E"}
        assert event_type(action)[0].startswith("1101")
    assert action_code("CREATE_SOMETHING_NEW") == "C" and action_code("SOMETHING") == "E"


def _row(**overrides: Any) -> SimpleNamespace:
    fields: dict[str, Any] = {
        "seq": 7, "event_id": None, "at": datetime(2025, 1, 31, 12, tzinfo=UTC),
        "actor_id": None, "actor_role": "system", "action": "VIEW_USERS",
        "resource_type": None, "resource_id": None, "patient_id": None, "outcome": "success",
        "ip": None, "request_id": None}
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_a_bad_resource_raises() -> None:
    resource = audit_event_resource(_row(), {})
    assert resource["id"] == "seq-7" and "entity" not in resource
    validate_resource(resource)
    with pytest.raises(ValidationError):
        validate_resource({k: v for k, v in resource.items() if k != "source"})
    with pytest.raises(ValidationError):
        validate_resource({**resource, "recorded": "yesterday"})
    with pytest.raises(FhirMappingError):
        validate_resource({**resource, "action": "X"})
    with pytest.raises(FhirMappingError):
        validate_resource({**resource, "outcome": "3"})
    # The mapping raises, naming only the seq, on an event it cannot make valid.
    with pytest.raises(FhirMappingError, match=r"^audit event seq 7 .*outcome"):
        audit_event_resource(_row(outcome="maybe"), {})
    with pytest.raises(FhirMappingError, match=r"^audit event seq 7 does not map") as caught:
        audit_event_resource(_row(action="BAD CODE "), {})
    assert isinstance(caught.value.__cause__, ValidationError)


# Windows and memory.

async def test_since_and_until_filter_on_the_event_time(fresh_runtime: Callable[..., Any],
                                                        tmp_path: Path) -> None:
    rt = await fresh_runtime()
    marks = []
    for phase in range(3):
        if phase:
            await asyncio.sleep(0.01)
            marks.append(utcnow())
            await asyncio.sleep(0.01)
        async with rt.unit_of_work() as session:
            for i in range(3):
                service.record(session, Action.VIEW_PROFILE, metadata={"count": phase * 10 + i})
    t1, t2 = marks

    async def counts(window: ExportWindow) -> list[int]:
        path = tmp_path / f"{uuid.uuid4().hex}.jsonl"
        await _export(rt, ExportFormat.JSONL, path, window, batch_size=2)
        return [line["metadata"]["count"] for line in _lines(path)]

    assert await counts(ExportWindow(since=t1, until=t2)) == [10, 11, 12]
    assert await counts(ExportWindow(since=t1)) == [10, 11, 12, 20, 21, 22]
    assert await counts(ExportWindow(until=t1)) == [0, 1, 2]
    assert await counts(ExportWindow(until=t1 - timedelta(days=1))) == []
    plan = await plan_export(rt.sessions, ExportWindow(since=t1, until=t2))
    assert (plan.count, plan.first_seq, plan.last_seq) == (3, 4, 6)

    with pytest.raises(ExportWindowError):
        ExportWindow(since=datetime(2025, 1, 1))  # noqa: DTZ001 - naive on purpose
    with pytest.raises(ExportWindowError):
        ExportWindow(since=t2, until=t1)


async def _add_events(rt: Runtime, n: int) -> None:
    async with rt.unit_of_work() as session:
        for i in range(n):
            service.record(session, Action.VIEW_MEDICAL_RECORD,
                           actor=Actor(uuid.uuid4(), "doctor"), resource_type="medical_record",
                           resource_id=uuid.uuid4(), patient_id=uuid.uuid4(),
                           metadata={"count": i})
    await rt.sequencer.drain()


async def test_the_export_streams_in_constant_memory(fresh_runtime: Callable[..., Any],
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rt = await fresh_runtime()
    batch = 250
    sizes: list[int] = []
    original = export.event_batches

    async def spied(*args: Any, **kwargs: Any) -> Any:
        async for rows in original(*args, **kwargs):
            sizes.append(len(rows))
            yield rows

    monkeypatch.setattr(export, "event_batches", spied)

    async def peak(fmt: ExportFormat, n: int) -> int:
        plan = await plan_export(rt.sessions, ExportWindow())
        assert plan.count == n
        gc.collect()
        tracemalloc.start()
        try:
            with private_output(tmp_path / f"{fmt}-{n}") as sink:
                assert await write_export(rt.sessions, plan, fmt, sink,
                                          batch_size=batch) == n
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    await _add_events(rt, 1000)
    small = await peak(ExportFormat.JSONL, 1000)
    await _add_events(rt, 9000)
    sizes.clear()
    large = await peak(ExportFormat.JSONL, 10_000)
    # Ten times the events, the same memory (a batch's worth), give or take noise.
    assert large < small * 1.5 + 256 * 1024, (small, large)
    assert len(sizes) == 40 and max(sizes) == batch
    assert (tmp_path / "jsonl-10000").stat().st_size > 10_000 * 300

    # FHIR goes through the same batches (a smaller window: building a resource costs ~0.5 ms).
    sizes.clear()
    plan = await plan_export(rt.sessions, ExportWindow())
    short = ExportPlan(plan.window, 600, 1, 600)
    with private_output(tmp_path / "fhir") as sink:
        assert await write_export(rt.sessions, short, ExportFormat.FHIR, sink,
                                  batch_size=batch) == 600
    assert sizes == [250, 250, 100]


def test_private_output_is_0600_and_appears_whole(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        target = tmp_path / "out.jsonl"
        target.write_text("old")
        target.chmod(0o644)
        with private_output(target) as sink:
            sink.write(b"new\n")
            assert target.read_text() == "old"  # in place only at the end
        assert target.read_text() == "new\n"
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        with pytest.raises(RuntimeError), private_output(target) as sink:
            sink.write(b"partial")
            raise RuntimeError("boom")
        assert target.read_text() == "new\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    finally:
        os.umask(old)
    with pytest.raises(ExportWriteError, match="cannot write"), \
            private_output(tmp_path / "missing" / "x.jsonl"):
        pass
    with pytest.raises(ExportWriteError, match="is a directory"), private_output(tmp_path):
        pass


# The command.

async def test_the_cli_writes_a_0600_file_with_progress_and_records_the_export(
        fresh_runtime: Callable[..., Any], tmp_path: Path) -> None:
    rt = await fresh_runtime()
    await _scene_without_legacy_reason(rt)
    env = cli_env(rt)
    outputs = tmp_path / "exports"
    outputs.mkdir()
    out = outputs / "audit.jsonl"
    result = run_cli("audit", "export", "--format", "jsonl", "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"exported 6 audit events (jsonl) to {out}"
    assert "audit export: 6/6 (100%)" in result.stderr  # plain lines: stderr is no terminal
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(p.name for p in outputs.iterdir()) == ["audit.jsonl"]
    assert [line["seq"] for line in _lines(out)] == [1, 2, 3, 4, 5, 6]

    since = "2000-01-01T00:00:00+01:00"
    ndjson = outputs / "audit.ndjson"
    result = run_cli("audit", "export", "--format", "fhir", "--since", since,
                     "--out", str(ndjson), env=env)
    assert result.returncode == 0, result.stderr
    # The first export's own event is part of the second.
    resources = [FhirAuditEvent.model_validate_json(line)
                 for line in ndjson.read_text().splitlines()]
    assert len(resources) == 7 and resources[-1].subtype[0].code == "EXPORT_AUDIT_TRAIL"

    rows = await _rows(rt)
    exports = [row for row in rows if row.action == Action.EXPORT_AUDIT_TRAIL]
    assert [(e.actor_role, e.resource_type, e.event_metadata) for e in exports] == [
        ("system", "audit_trail", {"count": 6, "format": "jsonl", "since": None,
                                   "until": None}),
        ("system", "audit_trail", {"count": 7, "format": "fhir",
                                   "since": "1999-12-31T23:00:00+00:00", "until": None}),
    ]
    assert exports[0].user_agent == "phivault-cli/audit-export"
    assert (await service.verify_snapshot(rt.sessions, rt.audit_key)).ok


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "yesterday"], "phivault: --since must be an ISO 8601 time with a zone"),
    (["--until", "2025-01-31T00:00:00"], "phivault: --until needs a time zone"),
    (["--since", "2025-02-01T00:00:00Z", "--until", "2025-01-01T00:00:00Z"],
     "phivault: --since must be before --until"),
    (["--since", "0001-01-01T00:00:00+14:00"],
     "phivault: --since must be a time between 0001-01-01 and 9999-12-31 in UTC"),
    (["--until", "9999-12-31T23:59:59-23:59"],
     "phivault: --until must be a time between 0001-01-01 and 9999-12-31 in UTC"),
    (["--out-missing-dir"], "phivault: cannot write "),
    (["--out-directory"], "phivault: cannot write "),
])
def test_cli_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
    env.update(generate_keys())
    env["PHIVAULT_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path}/never.db"
    out = str(tmp_path / "out.jsonl")
    if args == ["--out-missing-dir"]:
        args, out = [], str(tmp_path / "missing" / "out.jsonl")
    elif args == ["--out-directory"]:
        args, out = [], str(tmp_path)
    result = run_cli("audit", "export", "--format", "jsonl", *args, "--out", out, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert not (tmp_path / "never.db").exists()  # refused before touching the database


def test_cli_help() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
    result = run_cli("audit", "export", "--help", env=env)
    assert result.returncode == 0
    assert all(option in result.stdout for option in ("--format", "--since", "--until", "--out"))
