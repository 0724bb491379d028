"""The canonical JSON of an event: the same bytes as the standard library's sorted, compact,
non-ASCII-preserving form, whatever the text (orjson computes it, for speed)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from phivault.audit.chain import ChainedEvent, canonical_json

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
