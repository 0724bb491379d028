"""Checking one `seq` range of the audit chain from PostgreSQL's COPY text, fast and exact.

COPY gives each event as one line of text fields, and COPY's text escapes are JSON's own for a
backslash, tab, newline, carriage return, backspace and form feed. So on the fast path one bytes
template rearranges the line into the canonical JSON, with no Python object made per field, and
the MAC over it is compared with the stored hash. That is sound, not just fast: the template's
bytes are either exactly `canonical_fields` of the stored values, or not JSON that orjson could
ever have written (a vertical tab's `\v`, a raw control character), so they cannot match an
event's MAC. Two things would break that, and send a line to the exact path instead: a quote in
a text value (it could pass for a field boundary), and a backslash in the metadata (COPY doubles
the backslash of a JSON escape, so its text is no longer the stored JSON).

The exact path decodes the line into the fields' Python values and checks them through
`canonical_fields` itself. It takes every line the fast path passes over or fails, so a verdict
of tampering never rests on the template (tests/audit/test_verify_engine.py checks both paths
against a faithful rendering of COPY, with hypothesis).

Run as `python -m phivault.audit.verify_range`, it checks ranges in a process of its own (a job
as JSON on standard input, the results as JSON on standard output), inside the snapshot that
the coordinating process exported: `verify.py` checks the ranges of a long chain in parallel.
This module imports neither SQLAlchemy nor the app, so such a process starts in a fraction of a
second.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import re
import sys
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from phivault.audit.chain import GENESIS_HASH, canonical_fields
from phivault.db.tls import asyncpg_options

# The columns, in the order the fast path reads them: the metadata, the two hashes, then the
# fields in the canonical JSON's (sorted) key order.
COPY_COLUMNS = ("metadata, encode(prev_hash, 'hex'), encode(hash, 'hex'), seq, at, action, "
                "actor_id, actor_role, ip, outcome, patient_id, request_id, resource_id, "
                "resource_type, user_agent")
_FIELDS = 15
# The canonical JSON of a line: a NULL field comes out as "\N", which one `replace` turns into
# null (COPY writes a data backslash as two, so "\N" is never a value's).
_TEMPLATE = (b'{"action":"%b","actor_id":"%b","actor_role":"%b","at":"%bT%bZ","ip":"%b",'
             b'"metadata":%b,"outcome":"%b","patient_id":"%b","request_id":"%b",'
             b'"resource_id":"%b","resource_type":"%b","seq":%b,"user_agent":"%b"}')
_QUOTED_NULL = b'"\\N"'
_PG_TIME = re.compile(rb"(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d)(?:\.(\d{1,6}))?\+00")
_PG_TIME_FIELDS = re.compile(
    rb"(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?\+00")
_COPY_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)
_COPY_SIMPLE = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
# Distinct metadata texts remembered (most events repeat a few shapes); cleared when full.
_METADATA_CACHE = 4096
# Session settings the text forms depend on, local to the verifying transaction.
SESSION_SETTINGS = ("SET LOCAL TimeZone = 'UTC'", "SET LOCAL DateStyle = 'ISO, YMD'")


class ChainMac:
    """HMAC-SHA256 under one key for many messages: the standard library's HMAC keyed once and
    copied per message (the padded key's work is not repeated). CPython's `hmac.HMAC` wraps
    OpenSSL's HMAC object (`_hmac`); that object, used directly, has the same `copy`, `update`
    and `digest` without a Python method around each, which a per-event loop feels (0.88 µs
    against 1.16 µs for a 480-byte message here). Where it is missing, the wrapper itself
    serves. A test pins it to `hmac.digest`."""

    def __init__(self, key: bytes) -> None:
        keyed = hmac.new(key, digestmod=hashlib.sha256)
        self.keyed: Any = getattr(keyed, "_hmac", None) or keyed

    def digest(self, *parts: bytes) -> bytes:
        """The MAC of the concatenation of `parts`."""
        mac = self.keyed.copy()
        for part in parts:
            mac.update(part)
        digest: bytes = mac.digest()
        return digest


_HASH_FIELDS = ("first_prev", "first_hash", "last_hash")


@dataclass(frozen=True, slots=True)
class RangeResult:
    """What one range held. `first_prev` (the first event's stored `prev_hash`) and `last_hash`
    (the last good event's stored `hash`) let the coordinator check the joins between ranges,
    and `first_hash` (the first event's, when good) a checkpoint's head; `first_bad_seq` is the
    range's own first bad `seq`, assuming all before it was good."""

    lo: int
    hi: int | None
    events: int
    first_seq: int | None
    first_prev: bytes | None
    first_hash: bytes | None
    last_seq: int
    last_hash: bytes | None
    first_bad_seq: int | None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in _HASH_FIELDS:
            data[name] = data[name].hex() if data[name] is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RangeResult:
        for name in _HASH_FIELDS:
            data[name] = bytes.fromhex(data[name]) if data[name] is not None else None
        return cls(**data)


def range_query(lo: int | None, hi: int | None) -> tuple[str, list[int]]:
    """The SELECT whose COPY text `RangeCheck` reads: events with `lo <= seq <= hi` (a bound
    left out is open, so that no event below 1 or above the head escapes the check)."""
    where, args = [], []
    if lo is not None:
        args.append(lo)
        where.append(f"seq >= ${len(args)}")
    if hi is not None:
        args.append(hi)
        where.append(f"seq <= ${len(args)}")
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT {COPY_COLUMNS} FROM audit_events{condition} ORDER BY seq", args  # noqa: S608


def _time_parts(text: bytes) -> tuple[bytes, bytes]:
    """PostgreSQL's `at` (UTC, ISO) as the canonical form's date and time parts; PostgreSQL
    drops the fraction's trailing zeros, the canonical form keeps six digits."""
    match = _PG_TIME.fullmatch(text)
    if match is None:
        return b"?", b"?"  # no canonical form can match: the exact path decides
    return match[1], match[2] + b"." + (match[3] or b"").ljust(6, b"0")


def _unescape(field: bytes) -> bytes:
    def one(match: re.Match[bytes]) -> bytes:
        if match[1] is not None:
            return bytes([int(match[1], 8) & 0xFF])
        if match[2] is not None:
            return bytes([int(match[2], 16)])
        return _COPY_SIMPLE.get(match[3], match[3])

    return _COPY_ESCAPE.sub(one, field) if b"\\" in field else field


def _text(field: bytes) -> str | None:
    return None if field == b"\\N" else _unescape(field).decode("utf-8")


def _uuid(field: bytes) -> uuid.UUID | None:
    return None if field == b"\\N" else uuid.UUID(field.decode("ascii"))


def _time(field: bytes) -> datetime:
    match = _PG_TIME_FIELDS.fullmatch(field)
    if match is None:
        raise ValueError("not a time the chain can hold")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    micro = int((match[7] or b"").ljust(6, b"0"))
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def decode_line(line: bytes) -> tuple[int, bytes, bytes, bytes | None]:
    """One COPY line as `(seq, prev_hash hex, hash hex, canonical JSON)`, through the fields'
    Python values and `canonical_fields`, as the sequencer computed it. The canonical JSON is
    None when the stored values cannot be an event's (a tampered row)."""
    fields = line.split(b"\t")
    if len(fields) != _FIELDS:
        raise ValueError("a COPY line of the wrong shape")
    (metadata, prev_hex, digest_hex, seq, at, action, actor_id, actor_role, ip, outcome,
     patient_id, request_id, resource_id, resource_type, user_agent) = fields
    try:
        canonical = canonical_fields(
            int(seq), _time(at), _uuid(actor_id), _text(actor_role), _text(action) or "",
            _text(resource_type), _text(resource_id), _uuid(patient_id), _text(outcome) or "",
            _text(ip), _text(user_agent), _text(request_id),
            orjson.loads(_unescape(metadata)))
    except (ValueError, TypeError, OverflowError):  # orjson's errors are ValueErrors
        return int(seq), prev_hex, digest_hex, None
    return int(seq), prev_hex, digest_hex, canonical


class RangeCheck:
    """Checks the events of the range `lo..hi` (`hi` None: up to the last), fed as COPY text.

    Each event's `seq` must follow its predecessor's, its `prev_hash` must be its predecessor's
    stored `hash`, and its `hash` the MAC of that and its canonical JSON. The first event of the
    range is checked against its own stored `prev_hash`; the coordinator joins the ranges.
    Memory stays constant: a partial line and a bounded cache of metadata texts.
    """

    def __init__(self, key: bytes, lo: int, hi: int | None) -> None:
        self._mac = ChainMac(key)
        self.lo, self.hi = lo, hi
        self.expected = lo
        self.events = 0
        self.first_seq: int | None = None
        self.first_prev: bytes | None = None
        self.first_hash: bytes | None = None
        self.first_bad_seq: int | None = None
        self._last_hex: bytes | None = None
        self._last_raw = GENESIS_HASH
        self._tail = b""
        self._metadata: dict[bytes, bytes] = {}

    async def sink(self, chunk: bytes) -> None:
        """asyncpg's `copy_from_query` output callback."""
        self.feed(chunk)

    def feed(self, chunk: bytes) -> None:
        """Check the complete lines in `chunk` (and the partial line left from the last)."""
        data = self._tail + chunk
        lines = data.split(b"\n")
        self._tail = lines.pop()
        if not lines:
            return
        self.events += len(lines)
        if self.first_bad_seq is not None:
            return  # still counted, as a whole-chain verification counts every event
        if self._last_hex is None:  # the range's first event: no predecessor in this range
            self._check_exact(lines.pop(0))
            if not lines or self.first_bad_seq is not None:
                return
        index = 0
        while index < len(lines):
            index = self._check_fast(lines, index)
            if index < len(lines):
                # This line failed the fast path (or is not for it): the exact path decides.
                self._check_exact(lines[index])
                if self.first_bad_seq is not None:
                    return
                index += 1

    def result(self) -> RangeResult:
        if self._tail:
            raise ValueError("the COPY stream ended inside a line")
        if self.first_bad_seq is None and self.hi is not None and self.expected != self.hi + 1:
            # Events missing at the end of the range (or the range holds none at all).
            self.first_bad_seq = self.expected
        return RangeResult(
            lo=self.lo, hi=self.hi, events=self.events, first_seq=self.first_seq,
            first_prev=self.first_prev, first_hash=self.first_hash, last_seq=self.expected - 1,
            last_hash=binascii.unhexlify(self._last_hex) if self._last_hex else None,
            first_bad_seq=self.first_bad_seq)

    def _check_fast(self, lines: list[bytes], start: int) -> int:
        """Check `lines[start:]` on the fast path, each following a checked line; return the
        index of the first line that failed or is not for the fast path (`len(lines)` when
        none), with the state of the lines before it.

        The hot loop (SPEC §14): locals only, one template, no object per field, and the MAC
        in four calls into OpenSSL's HMAC object (`ChainMac`, unrolled). Each line's `seq` is
        not parsed: an event whose `prev_hash` is its predecessor's hash and whose MAC (over its
        `seq`) holds is its predecessor's successor, so the `seq`s of lines that pass are
        consecutive; the last one's is compared all the same.
        """
        template, quoted_null, metadata_cache = _TEMPLATE, _QUOTED_NULL, self._metadata
        keyed_copy = self._mac.keyed.copy
        hexlify, same = binascii.hexlify, hmac.compare_digest
        last_hex, last_raw = self._last_hex, self._last_raw
        index = start
        for index in range(start, len(lines)):
            line = lines[index]
            try:
                (metadata, prev_hex, digest_hex, seq, at, action, actor_id, actor_role, ip,
                 outcome, patient_id, request_id, resource_id, resource_type,
                 user_agent) = line.split(b"\t")
            except ValueError:
                break
            if prev_hex != last_hex or line.find(b'"', len(metadata)) >= 0:
                break
            # A backslash in the line: NULL markers to turn into null, and perhaps metadata
            # that only the exact path reads right.
            escapes = b"\\" in line
            if escapes and b"\\" in metadata:
                break
            # Metadata of one key (or none) is stored as its canonical JSON already (orjson,
            # compact); other metadata is put in canonical order once per distinct text.
            canonical_metadata = (metadata if b"," not in metadata
                                  else metadata_cache.get(metadata)
                                  or self._canonical_metadata(metadata))
            if len(at) == 29:
                date, time = at[:10], at[11:26]
            else:
                date, time = _time_parts(at)
            canonical = template % (
                action, actor_id, actor_role, date, time, ip, canonical_metadata, outcome,
                patient_id, request_id, resource_id, resource_type, seq, user_agent)
            if escapes:
                canonical = canonical.replace(quoted_null, b"null")
            mac = keyed_copy()
            mac.update(last_raw)
            mac.update(canonical)
            digest = mac.digest()
            if not same(hexlify(digest), digest_hex):
                break
            last_hex, last_raw = digest_hex, digest
        else:
            index = len(lines)
        if index > start:
            expected = self.expected + index - start
            if int(lines[index - 1].split(b"\t", 4)[3]) != expected - 1:
                return start  # impossible without a forged MAC; the exact path decides
            self.expected, self._last_hex, self._last_raw = expected, last_hex, last_raw
        return index

    def _canonical_metadata(self, metadata: bytes) -> bytes:
        try:
            canonical = orjson.dumps(orjson.loads(metadata), option=orjson.OPT_SORT_KEYS)
        except (ValueError, TypeError):
            canonical = b"?"  # not what the sequencer wrote: the exact path decides
        if len(self._metadata) >= _METADATA_CACHE:
            self._metadata.clear()
        self._metadata[metadata] = canonical
        return canonical

    def _check_exact(self, line: bytes) -> None:
        """Check one line through `decode_line` (the sequencer's own canonical form)."""
        if self.first_bad_seq is not None:
            return
        seq, prev_hex, digest_hex, canonical = decode_line(line)
        if self._last_hex is None:
            self.first_seq = seq
        if seq != self.expected:
            # A gap (an event removed) or a repeated or out-of-order seq (one inserted or
            # moved): the chain breaks at the first seq that is not what it should be.
            self.first_bad_seq = min(seq, self.expected)
            return
        if self._last_hex is None:
            self.first_prev = prev_raw = binascii.unhexlify(prev_hex)
        elif prev_hex != self._last_hex:
            self.first_bad_seq = seq
            return
        else:
            prev_raw = self._last_raw
        digest = self._mac.digest(prev_raw, canonical) if canonical is not None else b""
        if canonical is None or not hmac.compare_digest(binascii.hexlify(digest), digest_hex):
            self.first_bad_seq = seq
            return
        if self._last_hex is None:
            self.first_hash = digest
        self.expected += 1
        self._last_hex, self._last_raw = digest_hex, digest


async def check_range(connection: asyncpg.Connection, key: bytes, lo: int, hi: int | None,
                      *, open_below: bool = False) -> RangeResult:
    """Check `lo..hi` over `connection`, inside its transaction (the caller's snapshot), and
    with `open_below` also any event below `lo` (the first range: a seq below 1 is tampering)."""
    for statement in SESSION_SETTINGS:
        await connection.execute(statement)
    check = RangeCheck(key, lo, hi)
    query, args = range_query(None if open_below else lo, hi)
    await connection.copy_from_query(query, *args, output=check.sink)
    return check.result()


async def _serve(header: dict[str, Any]) -> None:
    if not re.fullmatch(r"[0-9A-F]+-[0-9A-F]+(-[0-9]+)?", header["snapshot"]):
        raise ValueError("not a snapshot id")
    key = base64.b64decode(header["key"])
    connection = await asyncpg.connect(**asyncpg_options(header["connect"]))
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            await connection.execute(f"SET TRANSACTION SNAPSHOT '{header['snapshot']}'")
            # One range a line; waiting for the next blocks this process's only task.
            for line in sys.stdin.buffer:
                lo, hi, open_below = json.loads(line)
                result = await check_range(connection, key, lo, hi, open_below=open_below)
                sys.stdout.write(json.dumps(result.to_json()) + "\n")
                sys.stdout.flush()
    finally:
        await connection.close()


def main() -> None:
    """Read a header line (connection, snapshot, key) on standard input, then check one range
    per line, `[lo, hi, open_below]`, printing each `RangeResult` as a JSON line, until the
    input ends."""
    asyncio.run(_serve(json.loads(sys.stdin.buffer.readline())))


if __name__ == "__main__":
    main()
