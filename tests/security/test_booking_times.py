"""Review findings (issue 10, LOW): a consultation could be booked or moved into the past, and
`"scheduled_at": "1700000000"` was read as a Unix timestamp, against SPEC §11's rule of no
coercion. A time in a request is an ISO 8601 string with an offset (phivault.schemas.Instant);
a booking's time is not in the past (one minute of grace for clock skew)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter, ValidationError

from phivault.runtime import Runtime
from phivault.schemas import BOOKING_GRACE, Instant, Upcoming
from tests.clinical.world import API, book, expect
from tests.factories import TestUser, signed_in

URL = f"{API}/consultations"


def at(delta: timedelta) -> str:
    """Now plus `delta`, as ISO 8601 with an offset."""
    return (datetime.now(UTC) + delta).isoformat()


def refused_fields(response: httpx.Response) -> list[str]:
    body = expect(response, 422, "validation_error")
    return [f["field"] for f in body["fields"] if f["field"].endswith("scheduled_at")]


async def booking(client: httpx.AsyncClient, patient: TestUser, doctor: TestUser,
                  when: Any) -> httpx.Response:
    return await client.post(URL, headers=patient.headers, json={
        "doctor_id": str(doctor.id), "scheduled_at": when, "reason": "Check-up"})


@pytest.mark.parametrize("ago", [timedelta(hours=1), timedelta(days=400),
                                 BOOKING_GRACE + timedelta(seconds=30)])
async def test_a_booking_in_the_past_is_a_422(client: httpx.AsyncClient, runtime: Runtime,
                                              ago: timedelta) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    when = at(-ago)
    response = await booking(client, patient, doctor, when)
    assert refused_fields(response)
    assert when not in response.text
    proposal = await client.post(URL, headers=doctor.headers, json={
        "patient_id": str(patient.id), "scheduled_at": when, "reason": "Follow-up"})
    assert refused_fields(proposal)
    assert expect(await client.get(URL, headers=patient.headers), 200) == []


async def test_a_booking_within_the_grace_or_later_is_taken(client: httpx.AsyncClient,
                                                            runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    # A client whose clock is a few seconds ahead books "now": that is not refused.
    expect(await booking(client, patient, doctor, at(-timedelta(seconds=10))), 201)
    later = expect(await booking(client, patient, doctor, at(timedelta(days=30))), 201)
    assert datetime.fromisoformat(later["scheduled_at"]) > datetime.now(UTC)


async def test_rescheduling_into_the_past_is_a_422(client: httpx.AsyncClient,
                                                   runtime: Runtime) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    consultation = await book(client, patient, doctor)
    url = f"{URL}/{consultation['id']}"
    for user in (patient, doctor):
        response = await client.patch(url, headers=user.headers,
                                      json={"scheduled_at": at(-timedelta(hours=2))})
        assert refused_fields(response)
    # Unchanged; and moving it to a future time still works.
    (listed,) = expect(await client.get(URL, headers=patient.headers), 200)
    assert listed["scheduled_at"] == consultation["scheduled_at"]
    moved = expect(await client.patch(url, headers=doctor.headers,
                                      json={"scheduled_at": "2032-02-03T09:15:00+01:00"}), 200)
    assert datetime.fromisoformat(moved["scheduled_at"]) == datetime(2032, 2, 3, 8, 15,
                                                                     tzinfo=UTC)


@pytest.mark.parametrize("when", [
    "1700000000", 1700000000, 1.9e9, "1900000000.5", "2033-07-08", "2033-07-08T10:00:00",
    "2033-07-08 10:00:00Z", "20310504T100000Z", "2033-07-08T10:00:00 01:00", "tomorrow", "",
    True, None, ["2033-07-08T10:00:00Z"], {"at": "2033-07-08T10:00:00Z"},
    "2033-07-08T10:00:00+0100", "2033-07-08T10:00:00Z\n", "2033-02-30T10:00:00Z",
])
async def test_only_iso_8601_with_an_offset_is_a_time(client: httpx.AsyncClient,
                                                      runtime: Runtime, when: Any) -> None:
    patient, doctor = await signed_in(runtime, "patient"), await signed_in(runtime, "doctor")
    response = await booking(client, patient, doctor, when)
    assert refused_fields(response), response.text
    if isinstance(when, str) and when:
        assert when.strip() not in response.text


@pytest.mark.parametrize(("text", "expected"), [
    ("2031-05-04T10:00:00Z", datetime(2031, 5, 4, 10, tzinfo=UTC)),
    ("2031-05-04T10:00Z", datetime(2031, 5, 4, 10, tzinfo=UTC)),
    ("2031-05-04T12:00:00.250+02:00", datetime(2031, 5, 4, 10, 0, 0, 250_000, tzinfo=UTC)),
    ("2031-05-04T05:30:00-04:30", datetime(2031, 5, 4, 10, tzinfo=UTC)),
])
def test_upcoming_times_are_kept_in_utc(text: str, expected: datetime) -> None:
    value = TypeAdapter(Upcoming).validate_python(text)
    assert value == expected and value.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["1700000000", "2031-05-04", "2031-05-04T10:00:00",
                                  "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-23:59"])
def test_instant_refuses_what_is_not_an_aware_iso_time(text: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(Instant).validate_python(text)


def test_instant_takes_the_past_upcoming_does_not() -> None:
    past = "2001-01-01T00:00:00Z"
    assert TypeAdapter(Instant).validate_python(past).year == 2001
    with pytest.raises(ValidationError, match="must not be in the past"):
        TypeAdapter(Upcoming).validate_python(past)
    with pytest.raises(ValidationError, match="2200"):
        TypeAdapter(Upcoming).validate_python("2201-01-01T00:00:00Z")
