"""`PhivaultClient` against a live `phivault serve` over TLS: sessions and their refresh,
refresh-token reuse, 10 MiB attachments streamed both ways, and typed refusals."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from phivault.client import (
    ConnectionFailed,
    EmailTaken,
    Forbidden,
    InvalidCredentials,
    InvalidToken,
    NoCareRelationship,
    NoConsent,
    NotFound,
    NotSignedIn,
    PhivaultClient,
    SessionRevoked,
    TokenReuseDetected,
    Tokens,
    ValidationFailed,
    WeakPassword,
)
from phivault.client.errors import FieldProblem
from phivault.client.models import Me
from tests.client.conftest import ACCESS_TOKEN_TTL, Clinic, MiB, new_password, tampered
from tests.helpers import free_port

SignIn = NewClient = Callable[..., PhivaultClient]


def test_login_then_refresh_before_expiry_and_after_a_refused_token(
        clinic: Clinic, sign_in: SignIn, new_client: NewClient) -> None:
    told: list[Tokens | None] = []
    shift = [0.0]
    client = sign_in(clinic.patient, on_tokens=told.append,
                     clock=lambda: time.time() + shift[0])
    first = client.tokens
    assert first is not None and first.lifetime == ACCESS_TOKEN_TTL
    me = client.me()
    assert isinstance(me, Me) and str(me.id) == clinic.patient.id and me.role == "patient"
    assert len(told) == 1  # the login; a fresh token is not refreshed

    # Past the token's expiry by this client's clock: it refreshes before sending, and keeps
    # the rotated refresh token.
    shift[0] = ACCESS_TOKEN_TTL + 1
    assert str(client.me().id) == clinic.patient.id
    second = client.tokens
    assert second is not None and len(told) == 2 and told[-1] is second
    assert second.refresh_token != first.refresh_token
    assert second.access_token != first.access_token
    client.list_doctors()
    assert len(told) == 2  # the new token is fresh

    # A token the server refuses (here: its signature broken) is refreshed once, and the
    # request sent again.
    restored = new_client(tokens=Tokens.restored(
        tampered(second.access_token), second.refresh_token, time.time() + 600))
    assert str(restored.me().id) == clinic.patient.id
    assert restored.tokens is not None
    assert restored.tokens.refresh_token != second.refresh_token


def test_threads_sharing_a_client_refresh_once(clinic: Clinic, sign_in: SignIn) -> None:
    told: list[Tokens | None] = []
    shift = [0.0]
    client = sign_in(clinic.doctor, on_tokens=told.append,
                     clock=lambda: time.time() + shift[0])
    shift[0] = ACCESS_TOKEN_TTL + 1
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.me().id, range(8)))
    assert {str(a) for a in answers} == {clinic.doctor.id}
    assert len(told) == 2  # the login and one refresh


def test_a_reused_refresh_token_revokes_the_session(clinic: Clinic, sign_in: SignIn,
                                                     new_client: NewClient) -> None:
    genuine = sign_in(clinic.patient)
    stolen = genuine.tokens
    assert stolen is not None
    genuine.refresh()  # the stolen refresh token is now used up

    thief = new_client(tokens=stolen)
    with pytest.raises(TokenReuseDetected) as caught:
        thief.refresh()
    error = caught.value
    assert isinstance(error, SessionRevoked) and isinstance(error, InvalidToken)
    assert (error.status, error.code) == (401, "invalid_token")
    assert error.request_id
    assert thief.tokens is None

    # The whole family is revoked: the genuine client's token is refused, its refresh too.
    with pytest.raises(SessionRevoked):
        genuine.me()
    assert genuine.tokens is None
    with pytest.raises(NotSignedIn):
        genuine.me()

    auditor = sign_in(clinic.auditor)
    reuses = auditor.search_audit(action="REFRESH_TOKEN_REUSE", actor_id=clinic.patient.id)
    assert reuses.total is not None and reuses.total >= 1
    assert all(event.outcome == "denied" for event in reuses)


def _pdf_file(path: Path, size: int) -> str:
    """A file of `size` bytes that sniffs as a PDF; answers its SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as file:
        head = b"%PDF-1.7\n"
        file.write(head)
        digest.update(head)
        left = size - len(head)
        while left:
            piece = os.urandom(min(MiB, left))
            file.write(piece)
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


def test_a_10_mib_attachment_streams_up_and_down(clinic: Clinic, sign_in: SignIn,
                                                 tmp_path: Path) -> None:
    source = tmp_path / "scan.pdf"
    expected = _pdf_file(source, 10 * MiB)
    patient = sign_in(clinic.patient)
    doctor = sign_in(clinic.doctor)

    tracemalloc.start()
    try:
        with source.open("rb") as file:
            stored = patient.upload_attachment(clinic.patient.id, file, filename="scan.pdf")
        upload_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        digest = hashlib.sha256()
        with doctor.open_attachment(stored.id) as download:
            assert (download.content_type, download.size) == ("application/pdf", 10 * MiB)
            for chunk in download.iter_bytes():
                digest.update(chunk)
        download_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (stored.size, stored.content_type, stored.filename) == (
        10 * MiB, "application/pdf", "scan.pdf")
    assert digest.hexdigest() == expected
    # Streamed: never the whole file in memory, either way.
    assert upload_peak < 2 * MiB and download_peak < 2 * MiB, (upload_peak, download_peak)

    # From an iterator of unknown length (sent chunked), then to a file on disk.
    def pieces() -> Iterator[bytes]:
        with source.open("rb") as file:
            while piece := file.read(MiB):
                yield piece

    again = doctor.upload_attachment(clinic.patient.id, pieces(), filename="copy.pdf",
                                     content_type="application/pdf")
    target = tmp_path / "downloaded.pdf"
    written = patient.download_attachment(again.id, target)
    assert (written.size, written.content_type) == (10 * MiB, "application/pdf")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == expected
    assert target.stat().st_mode & 0o777 == 0o600
    listed = {a.id for a in doctor.list_attachments(clinic.patient.id)}
    assert {stored.id, again.id} <= listed


def test_refusals_are_typed(clinic: Clinic, sign_in: SignIn, new_client: NewClient) -> None:
    admin, stranger = sign_in(clinic.admin), sign_in(clinic.stranger)
    doctor, patient = sign_in(clinic.doctor), sign_in(clinic.patient)

    with pytest.raises(Forbidden) as forbidden:  # an admin never reads a chart
        admin.list_records(clinic.patient.id)
    assert type(forbidden.value) is Forbidden and forbidden.value.status == 403
    with pytest.raises(NoCareRelationship) as no_care:
        stranger.list_records(clinic.patient.id)
    assert (no_care.value.status, no_care.value.code) == (403, "no_care_relationship")
    with pytest.raises(NoConsent):
        doctor.create_record(clinic.private_patient.id, "Bronchitis", [])
    with pytest.raises(NotFound) as not_found:
        patient.read_record(uuid.uuid4())
    assert (not_found.value.status, not_found.value.code) == (404, "not_found")
    assert not_found.value.request_id

    with pytest.raises(ValidationFailed) as invalid:
        patient.list_doctors(limit=0)
    assert invalid.value.status == 422 and invalid.value.code == "validation_error"
    assert [p.field for p in invalid.value.fields] == ["query.limit"]
    assert isinstance(invalid.value.fields[0], FieldProblem)
    with pytest.raises(WeakPassword):
        new_client().register(f"weak.{uuid.uuid4().hex[:8]}@clinic.example",
                                        "a" * 16, "Wendy Weak")
    with pytest.raises(EmailTaken) as taken:
        new_client().register(clinic.patient.email, new_password(), "Pat Again")
    assert (taken.value.status, taken.value.code) == (409, "email_taken")
    with pytest.raises(InvalidCredentials):
        new_client().login(clinic.stranger.email, new_password())
    with pytest.raises(NotSignedIn):
        new_client().me()
    with pytest.raises(ConnectionFailed) as unreachable, \
            PhivaultClient(f"https://127.0.0.1:{free_port()}") as nobody:
        nobody.healthz()
    assert unreachable.value.status is None


def test_public_routes_and_administration(clinic: Clinic, sign_in: SignIn,
                                         new_client: NewClient) -> None:
    public = new_client()
    assert public.healthz().status == "ok" and public.readyz().status == "ready"
    assert public.jwks()["keys"]
    assert "/api/v1/me" in public.openapi()["paths"]
    assert "phivault" in public.metrics()  # from this host, as the server's own
    admin = sign_in(clinic.admin)
    users = admin.list_users(limit=2)
    assert len(users) == 2 and users.total is not None and users.total >= 6
    doctors = admin.list_doctors()
    assert {clinic.doctor.id, clinic.stranger.id} <= {str(d.id) for d in doctors}
    assert sign_in(clinic.auditor).verify_audit().ok
