"""How both clients take answers no honest server gives, on a fake server (`fakes.py`): bodies
that never end, inflate or drip are cut off at a limit, a redirect is an error, and an answer
that does not fit its model raises an error that quotes none of it."""

from __future__ import annotations

import gzip
import time
import uuid
from collections.abc import Callable

import httpx
import pytest

from phivault.client import (
    AnswerTimedOut,
    AnswerTooLarge,
    InvalidAnswer,
    PhivaultClientError,
    ServerError,
    UnexpectedRedirect,
)
from phivault.client.answers import MAX_ANSWER_BYTES
from tests.client.fakes import SESSION, Body, Fake, answer, endless, shown, streamed

FakeServer = Callable[..., Fake]
MiB = 1024 * 1024


async def test_answers_are_asked_for_uncompressed_and_a_compressed_one_is_refused(
        fake_server: FakeServer) -> None:
    # 64 KiB of gzip that inflate to 64 MiB: a bomb in small.
    bomb = gzip.compress(b"[" + b" " * (64 * MiB) + b"]", 9)
    fake = fake_server(lambda request: streamed(200, bomb, **{
        "Content-Encoding": "gzip", "Content-Type": "application/json"}), tokens=SESSION)
    with pytest.raises(InvalidAnswer) as refused:
        await fake.call("my_sessions")
    assert refused.value.status == 200 and "compressed" in refused.value.detail
    assert fake.requests[0].headers["accept-encoding"] == "identity"


async def test_an_endless_answer_is_cut_off_at_the_clients_limit(fake_server: FakeServer
                                                                  ) -> None:
    body = Body(endless())
    fake = fake_server(lambda request: httpx.Response(200, stream=body), tokens=SESSION)
    with pytest.raises(AnswerTooLarge) as cut:
        await fake.call("my_sessions")
    assert cut.value.limit == MAX_ANSWER_BYTES and isinstance(cut.value, InvalidAnswer)
    assert body.pulled <= MAX_ANSWER_BYTES + 65536  # it stopped reading at the limit

    # An error answer has a small limit of its own, and its status still says what it is.
    errors = Body(endless())
    fake = fake_server(lambda request: httpx.Response(500, stream=errors), tokens=SESSION)
    with pytest.raises(ServerError) as failed:
        await fake.call("me")
    assert failed.value.status == 500 and errors.pulled <= 128 * 1024


async def test_the_export_has_a_limit_of_its_own(fake_server: FakeServer) -> None:
    big = {"notes": "x" * (2 * MiB)}
    fake = fake_server(lambda request: answer(200, big), tokens=SESSION,
                       max_answer_bytes=MiB, max_export_bytes=4 * MiB)
    assert await fake.call("export_my_data") == big
    with pytest.raises(AnswerTooLarge):
        await fake.call("jwks")
    small = fake_server(lambda request: answer(200, big), tokens=SESSION,
                        max_export_bytes=MiB)
    with pytest.raises(AnswerTooLarge) as cut:
        await small.call("export_my_data")
    assert cut.value.limit == MiB
    with pytest.raises(ValueError, match="positive"):
        fake_server(lambda request: answer(200, {}), max_answer_bytes=0)


async def test_a_body_longer_than_its_content_length_is_refused(fake_server: FakeServer
                                                                ) -> None:
    fake = fake_server(lambda request: httpx.Response(
        200, headers={"Content-Length": "2"}, stream=Body([b"[]", b"[]"])), tokens=SESSION)
    with pytest.raises(AnswerTooLarge):
        await fake.call("my_sessions")
    declared = fake_server(lambda request: httpx.Response(
        200, headers={"Content-Length": str(64 * MiB)}, stream=Body(endless())),
        tokens=SESSION)
    with pytest.raises(AnswerTooLarge):  # refused on its headers, before a byte is read
        await declared.call("my_sessions")


async def test_a_dripping_answer_meets_the_deadline(fake_server: FakeServer) -> None:
    fake = fake_server(lambda request: httpx.Response(
        200, stream=Body(endless(b" ", every=0.02))), tokens=SESSION, deadline=0.2)
    started = time.monotonic()
    with pytest.raises(AnswerTimedOut):
        await fake.call("my_sessions")
    assert time.monotonic() - started < 2


async def test_a_redirect_is_an_error_and_never_ends_the_session(fake_server: FakeServer
                                                                 ) -> None:
    fake = fake_server(lambda request: streamed(
        307, b"", Location="https://evil.example/steal"), tokens=SESSION)
    with pytest.raises(UnexpectedRedirect) as redirected:
        await fake.call("erase_me", "password")
    error = redirected.value
    assert (error.status, error.code, error.location) == (
        307, "unexpected_redirect", "https://evil.example/steal")
    assert fake.client.tokens is SESSION  # erasure did not happen: the session stays
    with pytest.raises(UnexpectedRedirect):
        await fake.call("me")
    assert [r.url.host for r in fake.requests] == ["phivault.test"] * 2  # never followed


async def test_an_answer_that_does_not_fit_quotes_none_of_it(fake_server: FakeServer) -> None:
    fake = fake_server(lambda request: answer(200, {
        "id": "not-a-uuid", "diagnosis": "HIV positive", "notes": "PHI-NOTES"}),
        tokens=SESSION)
    with pytest.raises(InvalidAnswer) as invalid:
        await fake.call("read_record", uuid.uuid4())
    error = invalid.value
    assert isinstance(error, PhivaultClientError) and error.status == 200
    assert {"id", "patient_id"} <= {problem.field for problem in error.fields}
    assert "HIV" not in shown(error) and "not-a-uuid" not in shown(error)

    # A token answer that does not fit: its refresh token stays out of the error.
    login = fake_server(lambda request: answer(200, {
        "access_token": "a.b.c", "refresh_token": "REFRESH-SECRET", "token_type": "bearer"}))
    with pytest.raises(InvalidAnswer) as no_expiry:
        await login.call("login", "a@clinic.example", "password")
    assert [p.field for p in no_expiry.value.fields] == ["expires_in"]
    assert "REFRESH-SECRET" not in shown(no_expiry.value)

    not_json = fake_server(lambda request: streamed(200, b"<html>PHI</html>"))
    with pytest.raises(InvalidAnswer):
        await not_json.call("jwks")
