"""The HMAC chain: canonical form of an event, its hash, and verification of a run of events.

`hash = HMAC-SHA256(audit_key, prev_hash || canonical_json(event))`, where the canonical JSON
holds every field of the event except the two hashes, with sorted keys and no spaces. Because the
`seq` is inside the MAC and each event names its predecessor's hash, editing, removing,
inserting or reordering any event breaks the chain at that event's `seq`, and nobody without the
audit key can forge a replacement.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

GENESIS_HASH = bytes(32)


@dataclass(frozen=True, slots=True)
class ChainedEvent:
    """The fields of one event that the chain covers, plus its two hashes."""

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
    """The one textual form of an event time: UTC, microseconds, `Z`."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(event: ChainedEvent) -> bytes:
    body = {
        "seq": event.seq,
        "at": format_time(event.at),
        "actor_id": str(event.actor_id) if event.actor_id else None,
        "actor_role": event.actor_role,
        "action": event.action,
        "resource_type": event.resource_type,
        "resource_id": event.resource_id,
        "patient_id": str(event.patient_id) if event.patient_id else None,
        "outcome": event.outcome,
        "ip": event.ip,
        "user_agent": event.user_agent,
        "request_id": event.request_id,
        "metadata": dict(event.metadata),
    }
    # orjson with sorted keys gives the same bytes as json.dumps(sort_keys=True, separators=
    # (",", ":"), ensure_ascii=False) (a test pins it), about ten times faster: verification is
    # a hot loop (SPEC §14).
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def chain_hash(key: bytes, prev_hash: bytes, canonical: bytes) -> bytes:
    return hmac.new(key, prev_hash + canonical, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    events: int
    first_bad_seq: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "events": self.events, "first_bad_seq": self.first_bad_seq}


class ChainVerifier:
    """Checks events fed in `seq` order, in constant memory, and remembers the first bad `seq`.

    Feed batches with `feed()`, then call `finish(head_seq, head_hash)` with the stored head, which
    also catches events cut off the end of the chain.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._expected_seq = 1
        self._prev_hash = GENESIS_HASH
        self.events = 0
        self.first_bad_seq: int | None = None

    def feed(self, events: Iterable[ChainedEvent]) -> None:
        key = self._key
        for event in events:
            self.events += 1
            if self.first_bad_seq is not None:
                continue
            if event.seq != self._expected_seq:
                # A gap (an event removed) or a duplicate/out-of-order seq (one inserted or
                # moved): the chain breaks at the first seq that is not what it should be.
                self.first_bad_seq = min(event.seq, self._expected_seq)
                continue
            expected = chain_hash(key, self._prev_hash, canonical_json(event))
            if not (hmac.compare_digest(event.prev_hash, self._prev_hash)
                    and hmac.compare_digest(event.hash, expected)):
                self.first_bad_seq = event.seq
                continue
            self._prev_hash = event.hash
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
