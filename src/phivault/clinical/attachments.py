"""Attachments: streamed in, sealed segment by segment, streamed out; memory stays flat.

An upload is `multipart/form-data` with one part named `file`. Its type is decided by the
file's own first bytes (PDF, PNG, JPEG, DICOM) and must match the part's declared type. The
bytes never touch the disk in clear (no spooled temporary file): each piece is sealed as it
arrives (`crypto/stream.py`: 64 KiB segments, each authenticated with its index and a last
flag) and stored as rows of `attachment_segments`. A download first authenticates the whole
stream, so a truncated, reordered or edited segment answers 500 `integrity_failure` before any
byte is sent, then streams and decrypts it again, a batch of segments at a time.

No transaction and no pooled connection stays open while the client sends the body (an outside
review had a patient trickling a byte every 25 s hold SQLite's only write lock for minutes, and
twenty such uploads drain PostgreSQL's pool). So an upload has three phases (`db/phases.py`):
the access check in a short read-only transaction, which refuses before a byte is read; the
body, sealed as it arrives into a spool (memory up to `SPOOL_MEMORY`, then an unlinked temporary
file: ciphertext only, under a data key that exists only in this process's memory until the
last phase); then one short transaction that reads the caller's session and account again and
checks access again (a revocation, an erasure or the end of a care relationship may have
happened meanwhile), stores the key, the row and its segments, and records the event. A client
that stops halfway, or a process that dies, leaves nothing behind in the database. What the
spools hold is bounded by the API's upload gate: `UPLOADS_PER_ACCOUNT` at once per account and
`UPLOADS_PER_PROCESS` per server process, beyond which an upload answers 429 at once.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from phivault.access.care import Basis, deny, require_chart_access
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.auth.service import require_live_session
from phivault.auth.tokens import AccessClaims
from phivault.clinical.models import Attachment, AttachmentSegment
from phivault.clinical.records import basis_metadata
from phivault.clinical.schemas import AttachmentView
from phivault.crypto import IntegrityError
from phivault.crypto.envelope import Envelope
from phivault.crypto.stream import StreamOpener, StreamSealer
from phivault.db.base import utcnow
from phivault.db.engine import READ_ONLY
from phivault.db.paging import fetch_page
from phivault.db.phases import reads_only
from phivault.errors import InvalidRequest, NotFound, PayloadTooLarge, UnsupportedMedia
from phivault.keys.service import RowCipher, add_row_cipher, row_cipher
from phivault.schemas import single_line

TABLE = "attachments"
MAX_FILE_BYTES = 25 * 1024 * 1024
SNIFF_BYTES = 132
READ_BATCH = 16  # segment rows per query when reading (about 1 MiB)
STORE_BYTES = 64 * 1024  # sealed bytes per `attachment_segments` row
FLUSH_SEGMENTS = 16  # rows per INSERT round trip when storing (about 1 MiB)
SPOOL_MEMORY = 128 * 1024  # sealed bytes held in memory per upload before spooling to disk
# Uploads a server process receives at once, and per account (`web/gates.py`): each holds its
# spool until its body is in.
UPLOADS_PER_PROCESS = 64
UPLOADS_PER_ACCOUNT = 2
ALLOWED_TYPES = ("application/pdf", "image/png", "image/jpeg", "application/dicom")


def sniff(head: bytes) -> str | None:
    """The allowed type a file's first bytes show, if any."""
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(head) >= SNIFF_BYTES and head[128:132] == b"DICM":
        return "application/dicom"
    return None


@dataclass
class _Part:
    headers: dict[str, bytes] = field(default_factory=dict)
    field_name: bytes = b""
    value_name: bytes = b""


class _Upload:
    """State of one streamed upload: the multipart parse, the sniffing, the sealing."""

    def __init__(self, sealer: StreamSealer, spool: IO[bytes]) -> None:
        self.sealer, self.spool = sealer, spool
        self.parts: list[_Part] = []
        self.pending: list[bytes] = []  # file bytes parsed but not yet sealed
        self.head = b""
        self.sniffed = False
        self.size = 0
        self.files = 0
        self.filename: str | None = None
        self.declared: str | None = None
        self.finished = False

    # Parser callbacks (synchronous; the async work happens between writes).

    def on_part_begin(self) -> None:
        self.parts.append(_Part())

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1].field_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1].value_name += data[start:end]

    def on_header_end(self) -> None:
        part = self.parts[-1]
        name = part.field_name.decode("latin-1").strip().lower()
        part.headers[name] = part.value_name.strip()  # raw bytes; decoded once, below
        part.field_name, part.value_name = b"", b""

    def on_headers_finished(self) -> None:
        part = self.parts[-1]
        disposition, options = parse_options_header(part.headers.get("content-disposition", b""))
        if disposition != b"form-data" or options.get(b"name") != b"file":
            raise InvalidRequest("Send one multipart part named 'file'.")
        self.files += 1
        if self.files > 1:
            raise InvalidRequest("Send one file per upload.")
        raw_name = options.get(b"filename", b"").decode("utf-8", "replace")
        name = raw_name.replace("\\", "/").rsplit("/", 1)[-1].strip()
        if not 1 <= len(name) <= 255:
            raise InvalidRequest("The file needs a name of 1 to 255 characters.")
        try:
            # Names are shown in listings, exports and terminals, like any other text.
            single_line(name)
        except ValueError:
            raise InvalidRequest("The file name must be one line without control "
                                 "characters.") from None
        if not name.strip("."):
            raise InvalidRequest("The file needs a name, not only dots.")
        self.filename = name
        declared, _ = parse_options_header(part.headers.get("content-type", b""))
        self.declared = declared.decode("latin-1").lower()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.size > MAX_FILE_BYTES:
            raise PayloadTooLarge("Attachments are at most 25 MiB.")
        self.pending.append(bytes(data[start:end]))

    def on_end(self) -> None:
        self.finished = True

    # Sealing.

    def drain(self) -> None:
        """Seal what the parser produced since the last call and spool the sealed bytes."""
        data, self.pending = b"".join(self.pending), []
        if not data:
            return
        if not self.sniffed:
            self.head += data
            if len(self.head) < SNIFF_BYTES:
                return
            self._check_type()
            data, self.head = self.head, b""
        self._store(self.sealer.update(data))

    def _check_type(self) -> None:
        self.sniffed = True
        detected = sniff(self.head)
        if detected is None or detected != self.declared:
            raise UnsupportedMedia()

    def _store(self, sealed: bytes) -> None:
        self.spool.write(sealed)

    def finish(self) -> str:
        """The end of the body: the last sealed bytes are spooled; returns the file's name."""
        if not self.finished or self.filename is None:
            raise InvalidRequest("The multipart body is incomplete or has no file.")
        if not self.sniffed:
            self._check_type()
            self._store(self.sealer.update(self.head))
        self._store(self.sealer.finalize())
        return self.filename


def boundary_of(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary or len(boundary) > 200:
        raise UnsupportedMedia("Upload attachments as multipart/form-data with a 'file' part.")
    return boundary


async def upload(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                 patient_id: uuid.UUID, content_type: str | None,
                 body: AsyncIterator[bytes], *, care_days: int) -> AttachmentView:
    """Store one attachment from a streamed multipart body (see the module docstring)."""
    boundary = boundary_of(content_type)
    async with reads_only(session):
        await require_chart_access(session, claims, patient_id, write=True,
                                   resource_type="attachment", care_days=care_days)
    row_id = uuid.uuid4()
    data_key = envelope.new_data_key(uuid.uuid4())
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY) as spool:
        state = _Upload(StreamSealer(data_key, TABLE, "content", row_id), spool)
        await _receive(state, boundary, body)  # no transaction open meanwhile
        filename = state.finish()
        # The last phase: one short transaction. The body may have taken minutes: the caller's
        # session and account are read again (a revocation, disabling or erasure meanwhile
        # wins), and so is their access to the chart.
        await require_live_session(session, claims)
        basis = await require_chart_access(session, claims, patient_id, write=True,
                                           resource_type="attachment", care_days=care_days)
        cipher = add_row_cipher(session, envelope, data_key, TABLE, row_id)
        attachment = Attachment(
            id=row_id, patient_id=patient_id, uploader_id=claims.user_id,
            data_key_id=cipher.data_key_id, filename=cipher.seal("filename", filename),
            content_type=state.declared or "", size=state.size, segments=0, complete=True,
            created_at=utcnow())
        session.add(attachment)
        await session.flush()
        spool.seek(0)
        while piece := spool.read(STORE_BYTES):
            session.add(AttachmentSegment(attachment_id=row_id, index=attachment.segments,
                                          data=piece))
            attachment.segments += 1
            if attachment.segments % FLUSH_SEGMENTS == 0:
                await session.flush()
    audit.record(session, Action.CREATE_ATTACHMENT, resource_type="attachment",
                 resource_id=row_id, patient_id=patient_id,
                 metadata={"size": state.size, "content_type": attachment.content_type,
                           **basis_metadata(basis)})
    return AttachmentView(id=row_id, patient_id=patient_id, uploader_id=claims.user_id,
                          filename=filename, content_type=attachment.content_type,
                          size=state.size, created_at=attachment.created_at)


async def _receive(state: _Upload, boundary: bytes, body: AsyncIterator[bytes]) -> None:
    """Parse, check and seal the body as it arrives."""
    parser = MultipartParser(boundary, {
        "on_part_begin": state.on_part_begin, "on_header_field": state.on_header_field,
        "on_header_value": state.on_header_value, "on_header_end": state.on_header_end,
        "on_headers_finished": state.on_headers_finished, "on_part_data": state.on_part_data,
        "on_end": state.on_end})
    try:
        async for chunk in body:
            parser.write(chunk)
            state.drain()
        parser.finalize()
    except MultipartParseError:
        raise InvalidRequest("The multipart body is malformed.") from None
    state.drain()


async def _view(session: AsyncSession, envelope: Envelope, row: Attachment) -> AttachmentView:
    cipher = await row_cipher(session, envelope, TABLE, row.id, row.data_key_id)
    return AttachmentView(id=row.id, patient_id=row.patient_id, uploader_id=row.uploader_id,
                          filename=cipher.open("filename", row.filename),
                          content_type=row.content_type, size=row.size,
                          created_at=row.created_at)


async def list_attachments(session: AsyncSession, envelope: Envelope, claims: AccessClaims,
                           patient_id: uuid.UUID, limit: int, offset: int, *,
                           care_days: int) -> tuple[list[AttachmentView], int]:
    basis = await require_chart_access(session, claims, patient_id, write=False,
                                       resource_type="attachment", care_days=care_days)
    rows, total = await fetch_page(session, select(Attachment).where(
        Attachment.patient_id == patient_id, Attachment.complete.is_(True))
        .order_by(Attachment.created_at.desc(), Attachment.id), limit, offset)
    views = [await _view(session, envelope, row) for row in rows]
    audit.record(session, Action.VIEW_ATTACHMENT, resource_type="attachment",
                 patient_id=patient_id, metadata={"count": len(views), "listing": True,
                                                  **basis_metadata(basis)})
    return views, total


@dataclass(frozen=True, slots=True)
class Download:
    view: AttachmentView
    basis: Basis
    body: AsyncIterator[bytes]


async def download(session: AsyncSession, sessions: async_sessionmaker[AsyncSession],
                   envelope: Envelope, claims: AccessClaims, attachment_id: uuid.UUID, *,
                   care_days: int) -> Download:
    row = await session.get(Attachment, attachment_id)
    if row is None or not row.complete:
        raise deny(session, NotFound(), None, "attachment", "no_such_attachment")
    basis = await require_chart_access(session, claims, row.patient_id, write=False,
                                       resource_type="attachment", care_days=care_days)
    view = await _view(session, envelope, row)
    cipher = await row_cipher(session, envelope, TABLE, row.id, row.data_key_id)
    # Authenticate every segment before sending a byte (an IntegrityError here is a clean 500).
    async for _ in _plaintext(sessions, cipher, row.id):
        pass
    audit.record(session, Action.VIEW_ATTACHMENT, resource_type="attachment",
                 resource_id=row.id, patient_id=row.patient_id,
                 metadata={"size": row.size, **basis_metadata(basis)})
    return Download(view, basis, _plaintext(sessions, cipher, row.id))


async def _plaintext(sessions: async_sessionmaker[AsyncSession], cipher: RowCipher,
                     attachment_id: uuid.UUID) -> AsyncIterator[bytes]:
    """Decrypt the stored segments in order, a batch at a time, in a session of its own (the
    request's unit of work has committed by the time a response streams)."""
    opener = StreamOpener(cipher.data_key, TABLE, "content", attachment_id)
    index = 0
    while True:
        async with sessions() as session:
            await session.connection(execution_options={READ_ONLY: True})
            rows = (await session.execute(
                select(AttachmentSegment.index, AttachmentSegment.data)
                .where(AttachmentSegment.attachment_id == attachment_id,
                       AttachmentSegment.index >= index)
                .order_by(AttachmentSegment.index).limit(READ_BATCH))).all()
        if not rows:
            break
        for seg_index, data in rows:
            if seg_index != index:
                raise IntegrityError()  # a missing row: the stream was cut
            index += 1
            plain = opener.update(data)
            if plain:
                yield plain
    yield opener.finalize()
