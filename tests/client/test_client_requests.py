"""What both clients refuse to send, on a fake server (`fakes.py`): a token that cannot be a
header value (and the error never quotes it), and an id that is not a UUID (which could change
the path a request goes to)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import pytest

from phivault.client import ConnectionFailed, MalformedToken, PhivaultClient, Tokens
from tests.client.fakes import SESSION, Fake, answer, shown

FakeServer = Callable[..., Fake]


async def test_a_token_that_cannot_be_a_header_is_neither_sent_nor_quoted(
        fake_server: FakeServer) -> None:
    restored = Tokens.restored("eyJSECRET.payload.signature\n", "refresh", 4102444800)
    fake = fake_server(lambda request: answer(200, {}), tokens=restored)
    with pytest.raises(MalformedToken) as refused:
        await fake.call("me")
    assert "SECRET" not in shown(refused.value)
    with pytest.raises(MalformedToken) as metrics:
        await fake.call("metrics", "SECRET-METRICS-TOKEN with a space")
    assert "SECRET" not in shown(metrics.value)
    assert fake.requests == []


async def test_a_failed_request_never_quotes_httpx(fake_server: FakeServer) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        # What h11 says of a header value it refuses: it quotes the value, token included.
        raise httpx.LocalProtocolError("Illegal header value b'Bearer eyJSECRET'")

    fake = fake_server(refuse, tokens=SESSION)
    with pytest.raises(ConnectionFailed) as failed:
        await fake.call("me")
    assert failed.value.status is None and "LocalProtocolError" in str(failed.value)
    assert "SECRET" not in shown(failed.value)


@pytest.mark.parametrize("value", ["..", ".", "../users", "", "a/b", "%2e%2e"])
def test_ids_must_be_uuids_so_no_path_can_collapse(value: str) -> None:
    with pytest.raises(ValueError, match="session_id must be a UUID"):
        PhivaultClient.end_my_session.call(value)


async def test_an_id_is_sent_in_its_canonical_form(fake_server: FakeServer) -> None:
    session_id = uuid.uuid4()
    fake = fake_server(lambda request: answer(204), tokens=SESSION)
    await fake.call("end_my_session", str(session_id).upper())
    await fake.call("end_my_session", session_id)
    with pytest.raises(ValueError, match="UUID"):
        await fake.call("end_my_session", "..")
    assert [r.url.path for r in fake.requests] == [f"/api/v1/me/sessions/{session_id}"] * 2
