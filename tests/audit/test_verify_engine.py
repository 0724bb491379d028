"""The verification engine (audit/verify.py, audit/verify_range.py): PostgreSQL's COPY text read
on a fast path that is exactly `canonical_fields`, ranges joined at the exact seq, worker
processes, and memory that stays flat however long the chain."""

from __future__ import annotations

import asyncio
import gc
import hmac
import tracemalloc
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phivault.audit import service, verify, verify_range
from phivault.audit.actions import Action
from phivault.audit.chain import (
    GENESIS_HASH,
    ChainedEvent,
    canonical_json,
    chain_hash,
)
from phivault.audit.verify import Anchor, join_ranges
from phivault.audit.verify_range import ChainMac, RangeCheck, RangeResult, decode_line
from phivault.request_context import RequestContext, reset_request, set_request
from phivault.runtime import Runtime
from tests.audit.factories import tamper, write_chain

KEY = bytes(range(7, 39))


# The fast path against a faithful rendering of PostgreSQL's COPY text.

def _copy_text(value: str | None) -> bytes:
    """A text value as COPY TO writes it (copyto.c, CopyAttributeOutText)."""
    if value is None:
        return b"\\N"
    out = bytearray()
    for byte in value.encode():
        if byte == 0x5C:
            out += b"\\\\"
        elif byte in _COPY_ESCAPES:
            out += b"\\" + _COPY_ESCAPES[byte]
        else:
            out.append(byte)
    return bytes(out)


_COPY_ESCAPES = {0x08: b"b", 0x09: b"t", 0x0A: b"n", 0x0B: b"v", 0x0C: b"f", 0x0D: b"r"}


def _copy_time(at: datetime) -> bytes:
    """A timestamptz as PostgreSQL writes it with TimeZone UTC and DateStyle ISO: the
    fraction's trailing zeros dropped."""
    at = at.astimezone(UTC)
    fraction = f"{at.microsecond:06d}".rstrip("0")
    return (f"{at.year:04d}-{at:%m-%d %H:%M:%S}" + (f".{fraction}" if fraction else "")
            + "+00").encode()


def copy_line(event: ChainedEvent, metadata_text: bytes | None = None) -> bytes:
    """The event as one line of `verify_range.COPY_COLUMNS`; its metadata as the engine
    stores it (orjson, in the dict's own order) unless given."""
    stored = metadata_text if metadata_text is not None else orjson.dumps(event.metadata)
    fields = [
        _copy_text(stored.decode()), event.prev_hash.hex().encode(), event.hash.hex().encode(),
        str(event.seq).encode(), _copy_time(event.at), _copy_text(event.action),
        _copy_text(str(event.actor_id) if event.actor_id else None),
        _copy_text(event.actor_role), _copy_text(event.ip), _copy_text(event.outcome),
        _copy_text(str(event.patient_id) if event.patient_id else None),
        _copy_text(event.request_id), _copy_text(event.resource_id),
        _copy_text(event.resource_type), _copy_text(event.user_agent),
    ]
    return b"\t".join(fields) + b"\n"


def chained(events: list[ChainedEvent]) -> list[ChainedEvent]:
    out, prev = [], GENESIS_HASH
    for event in events:
        event = event._replace(prev_hash=prev)
        event = event._replace(hash=chain_hash(KEY, prev, canonical_json(event)))
        out.append(event)
        prev = event.hash
    return out


def check(lines: list[bytes], chunk: int = 7) -> RangeResult:
    """Feed COPY lines to a range check in awkward chunks (lines split across them)."""
    data = b"".join(lines)
    range_check = RangeCheck(KEY, 1, None)
    for start in range(0, len(data), chunk):
        range_check.feed(data[start:start + chunk])
    return range_check.result()


def event(seq: int, **fields: Any) -> ChainedEvent:
    base: dict[str, Any] = dict(
        seq=seq, at=datetime(2026, 12, 3, 9, 15, 30, 120000 + seq, tzinfo=UTC),
        actor_id=uuid.UUID(int=seq), actor_role="doctor", action="VIEW_MEDICAL_RECORD",
        resource_type="medical_record", resource_id=f"r-{seq}", patient_id=None,
        outcome="success", ip="203.0.113.7", user_agent="app/1", request_id="q" * 32,
        metadata={"version": seq}, prev_hash=b"", hash=b"")
    base.update(fields)
    return ChainedEvent(**base)


texts = st.one_of(st.none(), st.text(max_size=40),
                  st.text(alphabet='"\\\t\n\r\b\f\v\x01\x1f\x7fN é🙂,:{}', max_size=12))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), texts)
events = st.builds(
    dict, actor_role=texts, action=st.text(min_size=1, max_size=20), resource_type=texts,
    resource_id=texts, ip=texts, user_agent=texts, request_id=texts,
    outcome=st.sampled_from(["success", "denied", "error"]),
    at=st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1),
                    timezones=st.just(UTC)),
    metadata=st.dictionaries(st.text(min_size=1, max_size=8), scalars, max_size=4),
    actor_id=st.one_of(st.none(), st.uuids()), patient_id=st.one_of(st.none(), st.uuids()))


@given(st.lists(events, min_size=1, max_size=6))
def test_any_chain_verifies_through_copy_text(fields: list[dict[str, Any]]) -> None:
    """Whatever the values (quotes, backslashes, control characters, NULLs, empty strings,
    unsorted metadata, times with trailing zeros), a genuine chain never fails."""
    chain = chained([event(i + 1, **f) for i, f in enumerate(fields)])
    result = check([copy_line(e) for e in chain])
    assert (result.first_bad_seq, result.events, result.last_seq) == (None, len(chain),
                                                                       len(chain))
    assert result.last_hash == chain[-1].hash


@given(st.lists(events, min_size=2, max_size=5), st.data())
def test_any_changed_value_is_found_at_its_seq(fields: list[dict[str, Any]],
                                               data: st.DataObject) -> None:
    """Store one event with one field changed to any other value: found at that seq."""
    chain = chained([event(i + 1, **f) for i, f in enumerate(fields)])
    victim = data.draw(st.integers(0, len(chain) - 1))
    name = data.draw(st.sampled_from(sorted(fields[0])))
    new = data.draw(events)[name]
    original = chain[victim]
    changed = original._replace(**{name: new})
    if canonical_json(changed) == canonical_json(original):
        return  # the same value (or the same time in another zone)
    lines = [copy_line(changed if i == victim else e) for i, e in enumerate(chain)]
    assert check(lines).first_bad_seq == victim + 1


@pytest.mark.parametrize("original, stored", [
    # COPY doubles the backslash of a JSON escape: read as JSON as it comes, the stored
    # newline would pass for the original backslash-n.
    ({"reason": "a\\nb"}, {"reason": "a\nb"}),
    ({"reason": 'say "x"'}, {"reason": "say 'x'"}),
    ({"reason": "a\\\\"}, {"reason": "a\\"}),
])
def test_metadata_escapes_are_not_confused(original: dict[str, Any],
                                           stored: dict[str, Any]) -> None:
    chain = chained([event(1), event(2, metadata=original), event(3)])
    lines = [copy_line(e) for e in chain]
    lines[1] = copy_line(chain[1], orjson.dumps(stored))
    assert check(lines).first_bad_seq == 2


def test_a_value_cannot_spill_into_the_next_field() -> None:
    """Quotes in a stored value never let it stand for two fields of the original."""
    chain = chained([event(1, resource_id="abc", resource_type="medical_record")])
    spilled = chain[0]._replace(resource_id='abc","resource_type":"medical_record',
                                resource_type=None)
    assert check([copy_line(spilled)]).first_bad_seq == 1


def test_plain_lines_never_leave_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Speed: only a range's first event, and lines the template cannot hold, are decoded
    field by field."""
    decoded: list[bytes] = []
    real = verify_range.decode_line

    def counting(line: bytes) -> tuple[int, bytes, bytes, bytes | None]:
        decoded.append(line)
        return real(line)

    monkeypatch.setattr(verify_range, "decode_line", counting)
    chain = chained([event(i, patient_id=uuid.uuid4() if i % 2 else None,
                           metadata={"ok": True, "count": i} if i % 3 else {"version": i},
                           at=datetime(2026, 12, 3, 9, 0, i % 60, (i % 3) * 100000,
                                       tzinfo=UTC))
                     for i in range(1, 201)])
    assert check([copy_line(e) for e in chain], chunk=4096).first_bad_seq is None
    assert len(decoded) == 1


def test_the_exact_path_is_canonical_fields() -> None:
    original = event(5, user_agent="a\tb\\c\"d\x01", metadata={"reason": "x\ny"})
    line = copy_line(original)[:-1]
    assert decode_line(line) == (5, b"", b"", canonical_json(original))
    # A value no event can hold (an impossible date) has no canonical form.
    impossible = line.replace(b"2026-12-03", b"2026-13-03")
    assert decode_line(impossible)[3] is None


@given(st.binary(max_size=100), st.binary(max_size=3000), st.binary(max_size=40))
def test_chain_mac_is_hmac_sha256(key: bytes, message: bytes, more: bytes) -> None:
    """RFC 2104 over hashlib (keys longer than SHA-256's block are hashed first), whole or in
    parts."""
    mac = ChainMac(key)
    assert mac.digest(message) == hmac.digest(key, message, "sha256")
    assert mac.digest(more, message) == hmac.digest(key, more + message, "sha256")


# Joining ranges.

def _range(lo: int, hi: int | None, **fields: Any) -> RangeResult:
    base: dict[str, Any] = dict(lo=lo, hi=hi, events=0, first_seq=None, first_prev=None,
                                first_hash=None, last_seq=lo - 1, last_hash=None,
                                first_bad_seq=None)
    base.update(fields)
    return RangeResult(**base)


def test_join_needs_each_range_to_start_where_the_last_ended() -> None:
    a, b, c = (bytes([n]) * 32 for n in (1, 2, 3))
    good = [_range(1, 2, events=2, first_seq=1, first_prev=GENESIS_HASH, first_hash=a,
                   last_seq=2, last_hash=b),
            _range(3, None, events=1, first_seq=3, first_prev=b, first_hash=c, last_seq=3,
                   last_hash=c)]
    assert join_ranges(good, 3, c).as_dict() == {"ok": True, "events": 3,
                                                  "first_bad_seq": None}
    broken = [good[0], _range(3, None, events=1, first_seq=3, first_prev=a, first_hash=c,
                              last_seq=3, last_hash=c)]
    assert join_ranges(broken, 3, c).first_bad_seq == 3
    assert join_ranges(good, 4, c).first_bad_seq == 4  # the head is ahead: events cut off
    assert join_ranges(good, 3, a).first_bad_seq == 3  # the head's hash disagrees
    assert join_ranges(good[1:], 3, c, Anchor(3, c)).as_dict() == {
        "ok": True, "events": 0, "first_bad_seq": None}
    assert join_ranges(good[1:], 3, c, Anchor(3, a)).first_bad_seq == 3


# The engine on the database.

@pytest.fixture
async def chain_of_30(fresh_runtime: Callable[..., Any]) -> Runtime:
    rt: Runtime = await fresh_runtime()
    await write_chain(rt, 30)
    return rt


async def _verify(rt: Runtime, **options: Any) -> tuple[bool, int, int | None]:
    result = await service.verify_snapshot(rt.sessions, rt.audit_key, **options)
    return result.ok, result.events, result.first_bad_seq


# With 30 events in 4 ranges, the ranges are 1-7, 8-15, 16-22 and 23 on.
JOIN_TAMPERS = [
    ("UPDATE audit_events SET ip = '198.51.100.9' WHERE seq = 7", 7),
    ("UPDATE audit_events SET ip = '198.51.100.9' WHERE seq = 8", 8),
    ("UPDATE audit_events SET prev_hash = :zero WHERE seq = 16", 16),
    ("UPDATE audit_events SET hash = :zero WHERE seq = 15", 15),
    ("DELETE FROM audit_events WHERE seq = 22", 22),
    ("DELETE FROM audit_events WHERE seq = 23", 23),
    ("DELETE FROM audit_events WHERE seq >= 16", 16),
    ("DELETE FROM audit_events WHERE seq BETWEEN 8 AND 15", 8),
    ("UPDATE audit_events SET seq = seq + 1000 WHERE seq IN (7, 8);"
     "UPDATE audit_events SET seq = 8 WHERE seq = 1007;"
     "UPDATE audit_events SET seq = 7 WHERE seq = 1008", 7),
    ("INSERT INTO audit_events (seq, at, action, outcome, metadata, prev_hash, hash) "
     "SELECT 31, at, action, outcome, metadata, hash, hash FROM audit_events WHERE seq = 30",
     31),
    ("UPDATE audit_head SET seq = 29", 30),
]


@pytest.mark.tampers
@pytest.mark.parametrize("sql, first_bad", JOIN_TAMPERS)
async def test_tampers_are_found_at_the_exact_seq_in_any_range(
        chain_of_30: Runtime, backend: Any, sql: str, first_bad: int) -> None:
    rt = chain_of_30
    assert await _verify(rt) == (True, 30, None)
    for statement in sql.split(";"):
        await tamper(rt, statement, **({"zero": bytes(32)} if ":zero" in statement else {}))
    whole = await _verify(rt)
    assert (whole[0], whole[2]) == (False, first_bad)
    if backend.name == "postgres":
        assert await _verify(rt, ranges=4, processes=1) == whole


@pytest.mark.tampers
async def test_an_event_below_seq_1_is_found(chain_of_30: Runtime, backend: Any) -> None:
    if backend.name != "postgres":
        pytest.skip("SQLite cannot drop the seq >= 1 constraint")
    rt = chain_of_30
    await tamper(rt, "ALTER TABLE audit_events DROP CONSTRAINT ck_audit_events_seq_positive")
    await tamper(rt, "INSERT INTO audit_events (seq, at, action, outcome, metadata, prev_hash, "
                 "hash) SELECT -1, at, action, outcome, metadata, prev_hash, hash "
                 "FROM audit_events WHERE seq = 1")
    assert await _verify(rt) == (False, 31, -1)
    assert await _verify(rt, ranges=4, processes=1) == (False, 31, -1)


@pytest.fixture
def leave_ranges_to_other_processes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """In each verification, this process starts its first range only once the other
    processes have taken all the others (or given up), so that a short test chain exercises
    them; returns the first seq of each range this process checked."""
    state: dict[str, Any] = {}
    here: list[int] = []
    coordinate, elsewhere, check_range = (verify._verify_postgres, verify._check_elsewhere,
                                          verify.check_range)

    async def verification(*args: Any) -> Any:
        state.clear()
        state.update(first=True, open=0, pending=None)
        return await coordinate(*args)

    async def watched_elsewhere(header: dict[str, Any], pending: Any,
                                results: dict[int, Any]) -> None:
        state.update(pending=pending, open=state["open"] + 1)
        try:
            await elsewhere(header, pending, results)
        finally:
            state["open"] -= 1

    async def check_last(driver: Any, key: bytes, lo: int, hi: int | None,
                         **options: Any) -> Any:
        here.append(lo)
        for _ in range(600):
            if not state["first"] or (state["pending"] is not None
                                      and (not state["pending"] or not state["open"])):
                break
            await asyncio.sleep(0.05)
        state["first"] = False
        return await check_range(driver, key, lo, hi, **options)

    monkeypatch.setattr(verify, "_verify_postgres", verification)
    monkeypatch.setattr(verify, "_check_elsewhere", watched_elsewhere)
    monkeypatch.setattr(verify, "check_range", check_last)
    return here


async def test_ranges_in_processes_of_their_own(chain_of_30: Runtime, backend: Any,
                                                leave_ranges_to_other_processes: list[int]
                                                ) -> None:
    if backend.name != "postgres":
        pytest.skip("ranges are PostgreSQL's")
    assert await _verify(chain_of_30, ranges=5, processes=3) == (True, 30, None)
    assert leave_ranges_to_other_processes == [1]  # the 4 others: in the 2 other processes


@pytest.mark.parametrize("executable", ["/nonexistent/python", "/bin/false"])
async def test_ranges_of_a_failed_process_are_checked_here(
        chain_of_30: Runtime, backend: Any, monkeypatch: pytest.MonkeyPatch,
        leave_ranges_to_other_processes: list[int], executable: str) -> None:
    if backend.name != "postgres":
        pytest.skip("ranges are PostgreSQL's")
    monkeypatch.setattr(verify.sys, "executable", executable)
    assert await _verify(chain_of_30, ranges=4, processes=2) == (True, 30, None)
    assert leave_ranges_to_other_processes == [1, 8, 16, 23]


@pytest.mark.tampers
async def test_tampers_found_by_other_processes(chain_of_30: Runtime, backend: Any,
                                               leave_ranges_to_other_processes: list[int]
                                               ) -> None:
    if backend.name != "postgres":
        pytest.skip("ranges are PostgreSQL's")
    rt = chain_of_30
    await tamper(rt, "UPDATE audit_events SET ip = '198.51.100.1' WHERE seq = 27")
    assert await _verify(rt, ranges=3, processes=3) == (False, 30, 27)
    await tamper(rt, "DELETE FROM audit_events WHERE seq = 16")  # the first of range 2 of 4
    assert await _verify(rt, ranges=4, processes=2) == (False, 30 - 1, 16)
    assert leave_ranges_to_other_processes == [1, 1]


async def test_values_with_every_awkward_character_verify(
        fresh_runtime: Callable[..., Any]) -> None:
    """Through the real sequencer and COPY: quotes, backslashes, tabs, newlines, control
    characters, non-ASCII, empty strings and NULLs."""
    rt = await fresh_runtime()
    awkward = ['say "hi"', "back\\slash", "tab\there", "new\nline", "bell\x07", "vt\x0b",
               "é 🙂 \u2028", "", "\\N", "null"]
    for value in awkward:
        token = set_request(RequestContext(request_id=uuid.uuid4().hex, ip="::1",
                                           user_agent=value or None))
        try:
            async with rt.unit_of_work() as session:
                service.record(session, Action.VIEW_MEDICAL_RECORD, resource_id=value,
                               resource_type="medical_record",
                               metadata={"reason": value, "count": 1, "ok": None})
        finally:
            reset_request(token)
    assert await _verify(rt) == (True, len(awkward), None)


@pytest.mark.tampers
async def test_a_newline_stored_for_a_backslash_n_is_found(
        fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    for reason in ("one", "line\\nbreak", "three"):
        async with rt.unit_of_work() as session:
            service.record(session, Action.VIEW_PROFILE, metadata={"reason": reason})
    await tamper(rt, "UPDATE audit_events SET metadata = '{\"reason\":\"line\\nbreak\"}' "
                 "WHERE seq = 2")
    assert await _verify(rt) == (False, 3, 2)


async def _peak(rt: Runtime, *, tries: int = 3, enough: float = 0) -> int:
    """The least of up to `tries` peaks (the first at or under `enough` ends it): tracemalloc
    sees the whole process, and a task of the shared event loop that allocates during one
    measurement (a pool's connection, a fixture's clean-up) must not be taken for the
    verifier's own memory."""
    peaks = []
    for _ in range(tries):
        gc.collect()
        tracemalloc.start()
        try:
            result = await service.verify_snapshot(rt.sessions, rt.audit_key)
            assert result.ok
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        if peaks[-1] <= enough:
            break
    return min(peaks)


async def test_memory_stays_flat_as_the_chain_grows(fresh_runtime: Callable[..., Any]) -> None:
    """Verifying 64,000 events takes no more memory than verifying 16,000: events stream
    through (COPY chunks on PostgreSQL, batches of rows on SQLite), nothing is kept per
    event. On PostgreSQL the peak is what arrives in one read once the socket's buffer is full
    (asyncpg pauses reading while a chunk is checked): measured 6.5 MB at 4,000 events, 12 MB
    at 8,000, then 18.5 MB flat at 16,000, 40,000 and 80,000, hence the sizes here. The large
    chain is verified again only while its peak is over the bound."""
    rt = await fresh_runtime()
    await write_chain(rt, 16_000)
    small = await _peak(rt)
    bound = small * 1.5 + 256 * 1024
    await write_chain(rt, 48_000)
    large = await _peak(rt, enough=bound)
    assert large < bound, (small, large)


async def test_the_rendering_is_postgresqls(backend: Any) -> None:
    """The tests above read `copy_line`'s text: it must be what PostgreSQL's COPY writes."""
    if backend.name != "postgres":
        pytest.skip("COPY is PostgreSQL's")
    values = [None, "", "plain", 'a "quoted" \\ back\\slash', "\t\n\r\b\f\v\x01\x1f\x7f",
              "\\N", "N", "é 🙂 \u2028"]
    times = [datetime(2026, 12, 3, 9, 15, 30, micro, tzinfo=UTC)
             for micro in (0, 100000, 120000, 123450, 123456, 1)]
    connection = await asyncpg.connect(backend.url.replace("postgresql+asyncpg", "postgresql"))
    chunks: list[bytes] = []

    async def sink(chunk: bytes) -> None:
        chunks.append(chunk)

    try:
        async with connection.transaction():
            await connection.execute("CREATE TEMP TABLE rendering (i int, v text, at "
                                     "timestamptz) ON COMMIT DROP")
            await connection.copy_records_to_table("rendering", records=[
                (i, values[i % len(values)], times[i % len(times)]) for i in range(48)])
            for statement in verify_range.SESSION_SETTINGS:
                await connection.execute(statement)
            await connection.copy_from_query("SELECT v, at FROM rendering ORDER BY i",
                                             output=sink)
    finally:
        await connection.close()
    assert b"".join(chunks).split(b"\n")[:-1] == [
        _copy_text(values[i % len(values)]) + b"\t" + _copy_time(times[i % len(times)])
        for i in range(48)]


def test_copy_time_rendering_drops_trailing_zeros() -> None:
    at = datetime(2026, 12, 3, 9, 15, 30, 120000, tzinfo=UTC)
    assert _copy_time(at) == b"2026-12-03 09:15:30.12+00"
    assert _copy_time(at.replace(microsecond=0)) == b"2026-12-03 09:15:30+00"
    assert _copy_time(at + timedelta(microseconds=1)) == b"2026-12-03 09:15:30.120001+00"
