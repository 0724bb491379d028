"""`AsyncPhivaultClient` against a live `phivault serve` over TLS: the same basics as the
synchronous client, and one refresh, under its lock, for many concurrent requests."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from phivault.client import (
    AsyncPhivaultClient,
    Forbidden,
    NoCareRelationship,
    NotFound,
    NotSignedIn,
    SessionRevoked,
    Tokens,
    ValidationFailed,
)
from tests.client.conftest import ACCESS_TOKEN_TTL, Account, Clinic, MiB, tampered


async def signed_in(clinic: Clinic, who: Account, **options: object) -> AsyncPhivaultClient:
    client = clinic.server.async_client(**options)
    await client.login(who.email, who.password)
    return client


async def test_concurrent_requests_share_one_refresh(clinic: Clinic) -> None:
    told: list[Tokens | None] = []
    shift = [0.0]
    async with await signed_in(clinic, clinic.patient, on_tokens=told.append,
                               clock=lambda: time.time() + shift[0]) as client:
        assert str((await client.me()).id) == clinic.patient.id
        # Every task finds the token expired at once; one refreshes, the others wait for it.
        shift[0] = ACCESS_TOKEN_TTL + 1
        answers = await asyncio.gather(*(client.me() for _ in range(10)))
        assert {str(me.id) for me in answers} == {clinic.patient.id}
        assert len(told) == 2  # the login and one refresh
        current = client.tokens
        assert current is not None

    # Every task's token refused at once (a broken signature): still one refresh.
    refreshed: list[Tokens | None] = []
    restored = Tokens.restored(tampered(current.access_token), current.refresh_token,
                               time.time() + 600)
    async with clinic.server.async_client(tokens=restored,
                                          on_tokens=refreshed.append) as client:
        pages = await asyncio.gather(*(client.list_doctors() for _ in range(6)))
        assert all(len(page) >= 2 for page in pages)
        assert len(refreshed) == 1


async def test_reuse_and_logout_end_the_session(clinic: Clinic) -> None:
    async with await signed_in(clinic, clinic.doctor) as genuine:
        stolen = genuine.tokens
        assert stolen is not None
        await genuine.refresh()
        async with clinic.server.async_client(tokens=stolen) as thief:
            with pytest.raises(SessionRevoked) as caught:
                await thief.refresh()
        assert (caught.value.status, caught.value.code) == (401, "invalid_token")
        with pytest.raises(SessionRevoked):
            await genuine.my_patients()
        with pytest.raises(NotSignedIn):
            await genuine.my_patients()

    async with await signed_in(clinic, clinic.doctor) as client:
        kept = client.tokens
        patients = await client.my_patients()
        assert {clinic.patient.id, clinic.private_patient.id} <= {str(p.id) for p in patients}
        await client.logout()
        assert client.tokens is None
    async with clinic.server.async_client(tokens=kept) as after:
        with pytest.raises(SessionRevoked):
            await after.me()


async def test_a_10_mib_attachment_streams_up_and_down(clinic: Clinic, tmp_path: Path) -> None:
    digest = hashlib.sha256()

    async def pieces() -> AsyncIterator[bytes]:
        head = b"%PDF-1.7\n"
        digest.update(head)
        yield head
        left = 10 * MiB - len(head)
        while left:
            piece = os.urandom(min(MiB, left))
            digest.update(piece)
            left -= len(piece)
            yield piece

    async with await signed_in(clinic, clinic.patient) as patient, \
            await signed_in(clinic, clinic.doctor) as doctor:
        stored = await patient.upload_attachment(clinic.patient.id, pieces(),
                                                 filename="report.pdf", size=10 * MiB)
        assert (stored.size, stored.content_type) == (10 * MiB, "application/pdf")
        received = hashlib.sha256()
        async with doctor.open_attachment(stored.id) as download:
            assert download.size == 10 * MiB
            async for chunk in download.aiter_bytes():
                received.update(chunk)
        assert received.hexdigest() == digest.hexdigest()
        target = tmp_path / "report.pdf"
        written = await patient.download_attachment(stored.id, target)
        assert written.size == 10 * MiB
        assert hashlib.sha256(target.read_bytes()).hexdigest() == digest.hexdigest()


async def test_refusals_are_typed(clinic: Clinic) -> None:
    async with await signed_in(clinic, clinic.admin) as admin, \
            await signed_in(clinic, clinic.stranger) as stranger, \
            await signed_in(clinic, clinic.patient) as patient:
        with pytest.raises(Forbidden) as forbidden:
            await admin.list_prescriptions(clinic.patient.id)
        assert type(forbidden.value) is Forbidden
        with pytest.raises(NoCareRelationship):
            await stranger.list_attachments(clinic.patient.id)
        with pytest.raises(NotFound):
            await patient.record_versions(uuid.uuid4())
        with pytest.raises(ValidationFailed) as invalid:
            await patient.set_consents(marketing=False, data_sharing="yes",  # type: ignore[arg-type]
                                       analytics=False)
        assert [p.field for p in invalid.value.fields] == ["body.data_sharing"]

