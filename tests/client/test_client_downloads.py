"""Attachment downloads on a fake server (`fakes.py`), for both clients: a link planted at the
destination is never followed, a failed download leaves no file, and a download stops at 25
MiB (and a margin) or at its own `Content-Length`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from phivault.client import AnswerTooLarge, ConnectionFailed
from phivault.client.answers import MAX_DOWNLOAD_BYTES
from tests.client.fakes import ATTACHMENT_ID, SESSION, Body, Fake, endless, streamed

FakeServer = Callable[..., Fake]
PDF = b"%PDF-1.7\n" + b"x" * 100_000


def attachment(body: httpx.SyncByteStream | bytes, **headers: str) -> httpx.Response:
    headers = {"Content-Type": "application/pdf",
               "Content-Disposition": 'attachment; filename="../../x"', **headers}
    if isinstance(body, bytes):
        return streamed(200, body, **headers)
    return httpx.Response(200, stream=body, headers=headers)


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


async def test_a_download_never_follows_a_link_planted_at_its_destination(
        fake_server: FakeServer, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    victim.chmod(0o644)
    destination = tmp_path / "scan.pdf"
    destination.symlink_to(victim)
    fake = fake_server(lambda request: attachment(PDF), tokens=SESSION)

    written = await fake.call("download_attachment", ATTACHMENT_ID, destination)

    assert victim.read_bytes() == b"precious" and victim.stat().st_mode & 0o777 == 0o644
    assert not destination.is_symlink() and destination.read_bytes() == PDF
    assert destination.stat().st_mode & 0o777 == 0o600
    assert (written.size, written.filename) == (len(PDF), "../../x")  # reported, never used
    assert files_in(tmp_path) == ["scan.pdf", "victim.txt"]


async def test_a_failed_download_leaves_no_file(fake_server: FakeServer, tmp_path: Path
                                                ) -> None:
    def breaks() -> Iterator[bytes]:
        yield PDF
        raise httpx.ReadError("connection reset")

    fake = fake_server(lambda request: attachment(Body(breaks())), tokens=SESSION)
    with pytest.raises(ConnectionFailed):
        await fake.call("download_attachment", ATTACHMENT_ID, tmp_path / "scan.pdf")
    assert files_in(tmp_path) == []

    # An earlier copy at the destination stays as it was.
    (tmp_path / "scan.pdf").write_bytes(b"the earlier copy")
    with pytest.raises(ConnectionFailed):
        await fake.call("download_attachment", ATTACHMENT_ID, tmp_path / "scan.pdf")
    assert files_in(tmp_path) == ["scan.pdf"]
    assert (tmp_path / "scan.pdf").read_bytes() == b"the earlier copy"


async def test_a_download_stops_at_25_mib_and_at_its_content_length(
        fake_server: FakeServer, tmp_path: Path) -> None:
    endless_body = Body(endless())
    fake = fake_server(lambda request: attachment(endless_body), tokens=SESSION)
    with pytest.raises(AnswerTooLarge) as cut:
        await fake.call("download_attachment", ATTACHMENT_ID, tmp_path / "endless.pdf")
    assert cut.value.limit == MAX_DOWNLOAD_BYTES
    assert endless_body.pulled <= MAX_DOWNLOAD_BYTES + 65536
    assert files_in(tmp_path) == []

    declared = Body(endless())
    fake = fake_server(lambda request: attachment(
        declared, **{"Content-Length": str(MAX_DOWNLOAD_BYTES + 1)}), tokens=SESSION)
    with pytest.raises(AnswerTooLarge):  # on its headers, before a byte is read
        await fake.call("download_attachment", ATTACHMENT_ID, tmp_path / "declared.pdf")
    assert declared.pulled == 0

    longer = Body([PDF, b"and then some"])
    fake = fake_server(lambda request: attachment(
        longer, **{"Content-Length": str(len(PDF))}), tokens=SESSION)
    with pytest.raises(AnswerTooLarge):
        await fake.call("download_attachment", ATTACHMENT_ID, tmp_path / "longer.pdf")
    assert files_in(tmp_path) == []
