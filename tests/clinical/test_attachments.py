"""Attachments (SPEC §5, §10): multipart uploads of at most 25 MiB, typed by their magic bytes,
encrypted in 64 KiB segments, streamed back byte for byte; a truncated, reordered or edited
stored attachment is a 500 `integrity_failure`, audited, and yields no byte."""

from __future__ import annotations

import io
import json
import uuid
from urllib.parse import unquote

import httpx
import pytest
from sqlalchemy import delete, func, select, update

from phivault.audit.models import AuditEvent
from phivault.clinical.models import Attachment, AttachmentSegment
from phivault.runtime import Runtime
from tests.clinical.world import API, BOUNDARY, MAGIC, events_of, expect, file_of, multipart, upload
from tests.factories import TestUser, signed_in

KIB, MIB = 1024, 1024 * 1024
MAX_FILE = 25 * MIB


async def download(client: httpx.AsyncClient, user: TestUser,
                   attachment_id: object) -> httpx.Response:
    return await client.get(f"{API}/attachments/{attachment_id}", headers=user.headers)


async def stored_count(rt: Runtime, patient_id: uuid.UUID) -> tuple[int, int]:
    """(attachments, segments) stored for the patient, complete or not."""
    async with rt.sessions() as session:
        files = (await session.execute(select(func.count()).select_from(Attachment).where(
            Attachment.patient_id == patient_id))).scalar_one()
        segments = (await session.execute(
            select(func.count()).select_from(AttachmentSegment).join(
                Attachment, Attachment.id == AttachmentSegment.attachment_id)
            .where(Attachment.patient_id == patient_id))).scalar_one()
    return int(files), int(segments)


ROUND_TRIPS = [
    # (type, size, request body sent in pieces of this many bytes; None: whole)
    ("image/png", len(MAGIC["image/png"]), None),  # the magic bytes alone
    ("image/jpeg", 5, 1),
    ("application/pdf", 40, None),
    ("application/dicom", 132, 7),  # preamble + DICM, nothing else
    ("application/dicom", 64 * KIB, None),
    ("application/pdf", 64 * KIB, 1000),
    ("image/png", 64 * KIB + 1, None),
    ("image/jpeg", 64 * KIB + 1, 64 * KIB),
    ("application/pdf", 3 * MIB + 12_345, None),
    ("application/dicom", 3 * MIB - 7, 64 * KIB),
    ("image/png", 3 * MIB, 100_000),
]


@pytest.mark.parametrize(("content_type", "size", "chunk"), ROUND_TRIPS,
                         ids=[f"{t.split('/')[1]}-{s}-{c or 'whole'}"
                              for t, s, c in ROUND_TRIPS])
async def test_upload_then_download_gives_back_the_same_bytes(
        client: httpx.AsyncClient, runtime: Runtime, content_type: str, size: int,
        chunk: int | None) -> None:
    patient = await signed_in(runtime, "patient")
    data = file_of(content_type, size, seed=size)
    created = expect(await upload(client, patient, patient.id, data, filename="scan.bin",
                                  content_type=content_type, chunk=chunk), 201)
    assert created["size"] == size and created["content_type"] == content_type
    assert created["filename"] == "scan.bin" and created["patient_id"] == str(patient.id)
    assert created["uploader_id"] == str(patient.id)
    got = await download(client, patient, created["id"])
    assert got.status_code == 200
    assert got.content == data  # byte for byte
    assert got.headers["content-type"] == content_type
    assert got.headers["content-length"] == str(size)
    assert got.headers["cache-control"] == "no-store"
    assert got.headers["content-disposition"] == (
        "attachment; filename=\"scan.bin\"; filename*=UTF-8''scan.bin")
    # Nothing of the file is stored in clear: every segment row is ciphertext.
    async with runtime.sessions() as session:
        rows = (await session.execute(select(AttachmentSegment.data).join(
            Attachment, Attachment.id == AttachmentSegment.attachment_id)
            .where(Attachment.id == uuid.UUID(created["id"])))).scalars().all()
    stored = b"".join(rows)
    assert len(stored) > size  # header and one 16-byte tag per segment
    probe = data[len(MAGIC[content_type]):][:64]
    assert len(probe) < 16 or probe not in stored


async def test_a_file_of_exactly_25_mib_is_accepted(client: httpx.AsyncClient,
                                                    runtime: Runtime) -> None:
    """'max 25 MiB' (SPEC §10) is the file's size: the multipart envelope around it does not
    count against it."""
    patient = await signed_in(runtime, "patient")
    data = file_of("application/pdf", MAX_FILE)
    response = await upload(client, patient, patient.id, data, content_type="application/pdf")
    created = expect(response, 201)
    assert created["size"] == MAX_FILE
    got = await download(client, patient, created["id"])
    assert got.status_code == 200 and got.content == data


@pytest.mark.parametrize("chunk", [None, 256 * KIB], ids=["content-length", "chunked"])
async def test_a_file_over_25_mib_is_413_and_leaves_nothing(
        client: httpx.AsyncClient, runtime: Runtime, chunk: int | None) -> None:
    patient = await signed_in(runtime, "patient")
    data = file_of("application/pdf", MAX_FILE + 1)
    response = await upload(client, patient, patient.id, data, content_type="application/pdf",
                            chunk=chunk)
    expect(response, 413, "payload_too_large")
    assert await stored_count(runtime, patient.id) == (0, 0)


MISMATCHES = [
    # (declared part type, actual content)
    ("image/png", file_of("application/pdf", 500)),
    ("application/pdf", file_of("image/png", 500)),
    ("image/jpeg", file_of("image/png", 500)),
    ("application/pdf", file_of("application/dicom", 500)),
    ("application/dicom", file_of("application/pdf", 500)),
    ("application/dicom", bytes(127) + b"DICM" + bytes(100)),  # DICM one byte early
    ("application/dicom", bytes(128) + b"DIC"),  # too short to hold the magic
    ("image/gif", b"GIF89a" + bytes(200)),  # a real type, but not an allowed one
    ("image/gif", file_of("image/png", 200)),  # allowed content, other declared type
    ("text/plain", b"hello, this is not a scan" * 10),
    ("application/octet-stream", file_of("application/pdf", 300)),
    ("application/pdf", b""),  # empty
    ("application/pdf", b"%PD"),  # a prefix of the magic
    ("image/jpeg", b"\xff\xd8"),
]


async def test_type_is_decided_by_magic_bytes_and_must_match(client: httpx.AsyncClient,
                                                              runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient")
    wrong = []
    for number, (declared, data) in enumerate(MISMATCHES):
        response = await upload(client, patient, patient.id, data, content_type=declared)
        answer = (response.status_code, response.json().get("error"))
        if answer != (415, "unsupported_media_type"):
            wrong.append(f"case {number} ({declared}, {data[:12]!r}): {answer}")
    assert wrong == []
    assert await stored_count(runtime, patient.id) == (0, 0)


async def test_a_big_mismatched_file_is_refused_too(client: httpx.AsyncClient,
                                                    runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient")
    data = b"MZ" + bytes(2 * MIB)  # an executable's magic, declared a PDF
    response = await upload(client, patient, patient.id, data, content_type="application/pdf",
                            chunk=64 * KIB)
    expect(response, 415, "unsupported_media_type")
    assert await stored_count(runtime, patient.id) == (0, 0)


async def test_the_body_must_be_multipart(client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient")
    url = f"{API}/patients/{patient.id}/attachments"
    raw = await client.post(url, headers={**patient.headers, "Content-Type": "application/pdf"},
                            content=file_of("application/pdf", 100))
    expect(raw, 415, "unsupported_media_type")
    kind, body = multipart(file_of("image/png", 100), name="document")
    wrong_field = await client.post(url, headers={**patient.headers, "Content-Type": kind},
                                    content=body)
    expect(wrong_field, 422)
    kind, one = multipart(file_of("image/png", 100))
    closing = f"\r\n--{BOUNDARY}--\r\n".encode()
    part = one.removesuffix(closing)
    two_files = part + b"\r\n" + part + closing
    expect(await client.post(url, headers={**patient.headers, "Content-Type": kind},
                             content=two_files), 422)
    _kind, nameless = multipart(file_of("image/png", 100), filename="")
    expect(await client.post(url, headers={**patient.headers, "Content-Type": kind},
                             content=nameless), 422)
    # A name is text like any other: no controls, no line breaks (listings, exports and
    # terminals show it), and more than dots.
    for name in ("scan\x1b[2J.png", "a\x00b.png", "two\nlines.png", "tab\there.png", ".."):
        _kind, named = multipart(file_of("image/png", 100), filename=name)
        expect(await client.post(url, headers={**patient.headers, "Content-Type": kind},
                                 content=named), 422, "invalid_request")
    assert await stored_count(runtime, patient.id) == (0, 0)


async def test_listing_shows_metadata_only(client: httpx.AsyncClient, runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient")
    first = expect(await upload(client, patient, patient.id, file_of("image/png", 100),
                                filename="C:\\scans\\knee.png"), 201)
    assert first["filename"] == "knee.png"  # no client path is kept
    expect(await upload(client, patient, patient.id, file_of("application/pdf", 100),
                        filename="letter.pdf", content_type="application/pdf"), 201)
    listing = await client.get(f"{API}/patients/{patient.id}/attachments",
                               headers=patient.headers)
    rows = expect(listing, 200)
    assert listing.headers["x-total-count"] == "2"
    assert {r["filename"] for r in rows} == {"knee.png", "letter.pdf"}
    assert all(set(r) == {"id", "patient_id", "uploader_id", "filename", "content_type",
                          "size", "created_at"} for r in rows)


# Tampering with the stored segments.

async def stored_segments(rt: Runtime, attachment_id: str) -> list[tuple[int, bytes]]:
    async with rt.sessions() as session:
        return [(int(i), bytes(d)) for i, d in (await session.execute(
            select(AttachmentSegment.index, AttachmentSegment.data)
            .where(AttachmentSegment.attachment_id == uuid.UUID(attachment_id))
            .order_by(AttachmentSegment.index))).all()]


async def set_segment(rt: Runtime, attachment_id: str, index: int, data: bytes) -> None:
    async with rt.sessions() as session:
        await session.execute(update(AttachmentSegment).where(
            AttachmentSegment.attachment_id == uuid.UUID(attachment_id),
            AttachmentSegment.index == index).values(data=data))
        await session.commit()


async def truncate(rt: Runtime, attachment_id: str, rows: list[tuple[int, bytes]]) -> None:
    async with rt.sessions() as session:
        await session.execute(delete(AttachmentSegment).where(
            AttachmentSegment.attachment_id == uuid.UUID(attachment_id),
            AttachmentSegment.index == rows[-1][0]))
        await session.commit()


async def reorder(rt: Runtime, attachment_id: str, rows: list[tuple[int, bytes]]) -> None:
    # Two full middle segments of the same length: a pure reordering.
    (i, a), (j, b) = rows[1], rows[2]
    assert len(a) == len(b)
    await set_segment(rt, attachment_id, i, b)
    await set_segment(rt, attachment_id, j, a)


async def flip_header(rt: Runtime, attachment_id: str, rows: list[tuple[int, bytes]]) -> None:
    index, data = rows[0]
    await set_segment(rt, attachment_id, index, data[:5] + bytes([data[5] ^ 1]) + data[6:])


async def flip_middle(rt: Runtime, attachment_id: str, rows: list[tuple[int, bytes]]) -> None:
    index, data = rows[2]
    middle = len(data) // 2
    await set_segment(rt, attachment_id, index,
                      data[:middle] + bytes([data[middle] ^ 0x80]) + data[middle + 1:])


async def flip_last_tag(rt: Runtime, attachment_id: str, rows: list[tuple[int, bytes]]) -> None:
    index, data = rows[-1]
    await set_segment(rt, attachment_id, index, data[:-1] + bytes([data[-1] ^ 1]))


async def drop_middle(rt: Runtime, attachment_id: str, rows: list[tuple[int, bytes]]) -> None:
    async with rt.sessions() as session:
        await session.execute(delete(AttachmentSegment).where(
            AttachmentSegment.attachment_id == uuid.UUID(attachment_id),
            AttachmentSegment.index == rows[2][0]))
        await session.commit()


async def append_extra(rt: Runtime, attachment_id: str, rows: list[tuple[int, bytes]]) -> None:
    index, data = rows[-1]
    async with rt.sessions() as session:
        session.add(AttachmentSegment(attachment_id=uuid.UUID(attachment_id), index=index + 1,
                                      data=rows[1][1]))
        await session.commit()


TAMPERING = {"truncated": truncate, "reordered": reorder, "edited_header": flip_header,
             "edited_segment": flip_middle, "edited_last_tag": flip_last_tag,
             "segment_removed": drop_middle, "segment_appended": append_extra}


@pytest.mark.parametrize("tamper", TAMPERING)
async def test_tampered_attachment_is_500_integrity_failure_and_audited(
        client: httpx.AsyncClient, runtime: Runtime, tamper: str,
        captured_logs: object) -> None:
    patient = await signed_in(runtime, "patient")
    data = file_of("application/pdf", 6 * 64 * KIB + 100)
    created = expect(await upload(client, patient, patient.id, data,
                                  content_type="application/pdf", chunk=64 * KIB), 201)
    rows = await stored_segments(runtime, created["id"])
    assert len(rows) >= 4, [len(d) for _, d in rows]
    await TAMPERING[tamper](runtime, created["id"], rows)

    response = await download(client, patient, created["id"])
    assert response.status_code == 500, (response.status_code, response.content[:80])
    body = response.json()
    assert body["error"] == "integrity_failure"
    assert body["request_id"] == response.headers["x-request-id"]
    assert data[200:264] not in response.content
    events = (await events_of(runtime, [body["request_id"]]))[body["request_id"]]
    assert [(e.action, e.outcome, e.actor_id) for e in events] == [
        ("INTEGRITY_FAILURE", "error", patient.id)]
    assert "Traceback" not in captured_logs.getvalue()  # type: ignore[attr-defined]

    # The attachment stays unreadable (no partial success later), and still audited each time.
    again = await download(client, patient, created["id"])
    assert again.status_code == 500 and again.json()["error"] == "integrity_failure"
    async with runtime.sessions() as session:
        views = (await session.execute(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.resource_id == created["id"],
            AuditEvent.action == "VIEW_ATTACHMENT"))).scalar_one()
    assert views == 0


async def test_a_download_carries_its_name_made_safe(client: httpx.AsyncClient,
                                                    runtime: Runtime,
                                                    captured_logs: io.StringIO) -> None:
    """The sealed name comes back in `Content-Disposition` (RFC 6266: an ASCII `filename`, the
    UTF-8 name as `filename*`), without its quotes, path, controls or bidi override, and it
    appears in no log line and no audit event."""
    patient = await signed_in(runtime, "patient")
    # On the wire: a Windows path, escaped quotes, a bidi override, non-ASCII.
    wire = '..\\Befund \\"M\u00fcller\\" \u202e \u8a3a\u65ad.pdf'
    uploaded = await upload(client, patient, patient.id, file_of("application/pdf", 40),
                            filename=wire, content_type="application/pdf")
    created = expect(uploaded, 201)
    assert created["filename"] == 'Befund "M\u00fcller" \u202e \u8a3a\u65ad.pdf'
    got = await download(client, patient, created["id"])
    assert got.status_code == 200
    header = got.headers["content-disposition"]
    assert header.isascii() and header.isprintable()
    assert header == ("attachment; filename=\"Befund__Muller.pdf\"; "
                      "filename*=UTF-8''Befund%20_M%C3%BCller_%20%E8%A8%BA%E6%96%AD.pdf")
    exact = unquote(header.split("filename*=UTF-8''", 1)[1], errors="strict")
    assert exact == "Befund _M\u00fcller_ \u8a3a\u65ad.pdf"
    events = await events_of(runtime, [uploaded.headers["x-request-id"],
                                       got.headers["x-request-id"]])
    assert all(events.values())
    logged = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    written = json.dumps([logged, [e.event_metadata for request in events.values()
                                   for e in request]], default=str, ensure_ascii=False)
    for piece in ("M\u00fcller", "Befund", "\u8a3a\u65ad"):
        assert piece not in written
