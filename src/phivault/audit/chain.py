"""The HMAC chain: canonical form of an event, its hash, and verification of a run of events.

`hash = HMAC-SHA256(audit_key, prev_hash || canonical_json(event))`, where the canonical JSON
holds every field of the event except the two hashes, with sorted keys and no spaces. Because the
`seq` is inside the MAC and each event names its predecessor's hash, editing, removing,
inserting or reordering any event breaks the chain at that event's `seq`, and nobody without the
audit key can forge a replacement.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

GENESIS_HASH = bytes(32)


class ChainedEvent(NamedTuple):
    """The fields of one event that the chain covers, plus its two hashes. A tuple: a database
    row of the same columns in this order is verified as it is, unpacked, never copied."""

    seq: int
    at: datetime
    actor_id: uuid.UUID | None
    actor_role: str | None
    action: str
    resource_type: str | None
    resource_id: str | None
    patient_id: uuid.UUID | None
    outcome: str
    ip: str | None
    user_agent: str | None
    request_id: str | None
    metadata: Mapping[str, Any]
    prev_hash: bytes
    hash: bytes


def format_time(at: datetime) -> str:
    """The one textual form of an event time: UTC, microseconds, `Z` (as `strftime` would write
    it, a test pins that, without its cost: verification formats every event's time)."""
    if at.tzinfo is not UTC:
        at = at.astimezone(UTC)
    return (f"{at.year:04d}-{at.month:02d}-{at.day:02d}T{at.hour:02d}:{at.minute:02d}:"
            f"{at.second:02d}.{at.microsecond:06d}Z")


def canonical_json(event: ChainedEvent) -> bytes:
    return canonical_fields(*event[:-2])  # every field but the two hashes


def canonical_fields(seq: int, at: datetime, actor_id: uuid.UUID | None, actor_role: str | None,
                     action: str, resource_type: str | None, resource_id: str | None,
                     patient_id: uuid.UUID | None, outcome: str, ip: str | None,
                     user_agent: str | None, request_id: str | None,
                     metadata: Mapping[str, Any]) -> bytes:
    """The canonical JSON of an event's fields (all but the two hashes)."""
    body = {
        "seq": seq,
        # orjson writes an aware UTC time with microseconds in exactly `format_time`'s form, in
        # C; it drops a zero fraction, so that case takes the string (a test pins both).
        "at": at if at.tzinfo is UTC and at.microsecond else format_time(at),
        "actor_id": str(actor_id) if actor_id else None,
        "actor_role": actor_role,
        "action": action,
        "resource_type": resource_type,
        "resource_id": resource_id,
        "patient_id": str(patient_id) if patient_id else None,
        "outcome": outcome,
        "ip": ip,
        "user_agent": user_agent,
        "request_id": request_id,
        "metadata": dict(metadata),
    }
    # orjson with sorted keys gives the same bytes as json.dumps(sort_keys=True, separators=
    # (",", ":"), ensure_ascii=False) (a test pins it), about ten times faster: verification is
    # a hot loop (SPEC §14).
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z)


def chain_hash(key: bytes, prev_hash: bytes, canonical: bytes) -> bytes:
    return hmac.digest(key, prev_hash + canonical, "sha256")


def queue_mac(key: bytes, event_id: uuid.UUID, canonical: bytes) -> bytes:
    """The MAC a queued event carries before it has a `seq`: HMAC-SHA256 under the queue's own
    key (derived from the audit key) of its id and its canonical JSON with `seq` 0. A queued
    row that is edited, or copied under another id, no longer matches it."""
    return hmac.digest(key, event_id.bytes + canonical, "sha256")


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What a verification found. `ok` is false when the chain breaks (`first_bad_seq`) or a
    queued event no longer matches its MAC (`queue_tampered`, their queue ids).
    `queue_stale` counts events that had waited in the queue longer than the maximum merge
    delay when verification began: a sequencer that is not running, not tampering."""

    ok: bool
    events: int
    first_bad_seq: int | None
    queue_tampered: tuple[int, ...] = ()
    queue_stale: int = 0
    # The stored head the chain was checked against (what a checkpoint signs).
    head_seq: int = 0
    head_hash: bytes = GENESIS_HASH

    def as_dict(self) -> dict[str, Any]:
        """The three fields of SPEC §12's `--json` answer."""
        return {"ok": self.ok, "events": self.events, "first_bad_seq": self.first_bad_seq}

    def report(self) -> dict[str, Any]:
        """`as_dict` and what was found in the queue."""
        return {**self.as_dict(), "queue_tampered": list(self.queue_tampered),
                "queue_stale": self.queue_stale}


class ChainVerifier:
    """Checks events fed in `seq` order, in constant memory, and remembers the first bad `seq`.

    Feed batches with `feed()`, then call `finish(head_seq, head_hash)` with the stored head, which
    also catches events cut off the end of the chain.
    """

    def __init__(self, key: bytes, *, start_seq: int = 1, prev_hash: bytes = GENESIS_HASH
                 ) -> None:
        """Expect `start_seq` first, chained to `prev_hash`: the genesis, or the head of a
        checkpoint already proven (then only the events after it are fed)."""
        self._key = key
        self._expected_seq = start_seq
        self._prev_hash = prev_hash
        self.events = 0
        self.first_bad_seq: int | None = None

    def feed(self, events: Iterable[Sequence[Any]]) -> None:
        """Check `ChainedEvent`s, or database rows of the same fields in the same order."""
        key = self._key
        for event in events:
            self.events += 1
            if self.first_bad_seq is not None:
                continue
            *fields, prev_hash, digest = event
            seq = fields[0]
            if seq != self._expected_seq:
                # A gap (an event removed) or a duplicate/out-of-order seq (one inserted or
                # moved): the chain breaks at the first seq that is not what it should be.
                self.first_bad_seq = min(seq, self._expected_seq)
                continue
            expected = chain_hash(key, self._prev_hash, canonical_fields(*fields))
            if not (hmac.compare_digest(prev_hash, self._prev_hash)
                    and hmac.compare_digest(digest, expected)):
                self.first_bad_seq = seq
                continue
            self._prev_hash = digest
            self._expected_seq += 1

    def finish(self, head_seq: int, head_hash: bytes) -> VerifyResult:
        last = self._expected_seq - 1
        if self.first_bad_seq is None:
            if head_seq != last:
                # Events cut off the end (head ahead) or appended around the head (head behind):
                # the chain is bad from the first seq the two disagree on.
                self.first_bad_seq = min(head_seq, last) + 1
            elif not hmac.compare_digest(head_hash, self._prev_hash):
                self.first_bad_seq = max(last, 1)
        return VerifyResult(self.first_bad_seq is None, self.events, self.first_bad_seq)
