"""The canonical JSON of an event: the same bytes as the standard library's sorted, compact,
non-ASCII-preserving form, whatever the text (orjson computes it, for speed)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from phivault.audit.chain import (
    ChainedEvent,
    canonical_fields,
    canonical_json,
    chain_hash,
    format_time,
)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text())


@given(action=st.text(min_size=1), user_agent=st.one_of(st.none(), st.text()),
       metadata=st.dictionaries(st.text(min_size=1), scalars, max_size=6))
def test_canonical_json_is_the_standard_librarys(action: str, user_agent: str | None,
                                                 metadata: dict[str, object]) -> None:
    event = ChainedEvent(7, datetime(2026, 11, 23, 18, 30, 0, 12, tzinfo=UTC), uuid.uuid4(),
                         "doctor", action, "medical_record", str(uuid.uuid4()), None, "success",
                         "203.0.113.7", user_agent, "r" * 32, metadata, bytes(32), bytes(32))
    produced = canonical_json(event)
    expected = json.dumps(json.loads(produced), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()
    assert produced == expected
    assert json.loads(produced)["at"] == "2026-11-23T18:30:00.000012Z"


def test_known_answer_pins_the_stored_chain_format() -> None:
    """The bytes and the hash of one event, fixed: a chain written by one release must verify
    under the next, so any change to the canonical form or the MAC fails here."""
    event = ChainedEvent(
        42, datetime(2026, 12, 3, 9, 15, 30, 0, tzinfo=timezone(timedelta(hours=2))),
        uuid.UUID("11111111-2222-4333-8444-555555555555"), "doctor", "VIEW_MEDICAL_RECORD",
        "medical_record", "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee",
        uuid.UUID("99999999-8888-4777-8666-555555555555"), "success", "203.0.113.7",
        "Mozilla/5.0 é", "f" * 32, {"version": 3, "basis": "care", "break_glass": False},
        bytes(range(32)), b"")
    canonical = canonical_json(event)
    assert canonical.decode() == (
        '{"action":"VIEW_MEDICAL_RECORD","actor_id":"11111111-2222-4333-8444-555555555555",'
        '"actor_role":"doctor","at":"2026-12-03T07:15:30.000000Z","ip":"203.0.113.7",'
        '"metadata":{"basis":"care","break_glass":false,"version":3},"outcome":"success",'
        '"patient_id":"99999999-8888-4777-8666-555555555555",'
        '"request_id":"ffffffffffffffffffffffffffffffff",'
        '"resource_id":"aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee","resource_type":"medical_record",'
        '"seq":42,"user_agent":"Mozilla/5.0 é"}')
    assert chain_hash(bytes(range(100, 132)), event.prev_hash, canonical).hex() == (
        "6b14f0357e52c413b110610844686838fcf1b8078cca7c4f96a96abc761f0a90")


@given(at=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30),
                       timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                                  timezone(timedelta(hours=-11))])))
def test_event_time_has_one_form(at: datetime) -> None:
    expected = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert format_time(at) == expected
    for given_at in (at, at.astimezone(UTC), at.replace(microsecond=0)):
        canonical = canonical_fields(1, given_at, None, None, "X", None, None, None, "success",
                                     None, None, None, {})
        assert json.loads(canonical)["at"] == format_time(given_at)
    assert json.loads(canonical_fields(1, at, None, None, "X", None, None, None, "success",
                                       None, None, None, {}))["at"] == expected
