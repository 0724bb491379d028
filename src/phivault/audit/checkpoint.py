"""Signed checkpoints of the chain's head (SPEC §8): truncation evidence kept outside the database.

A chain alone cannot show that its newest events were cut off: the head moves back with them.
A checkpoint is the head (`seq`, `hash`) and the time it was taken (`at`), signed with Ed25519
(`PHIVAULT_AUDIT_SIGNING_KEY`, public key at `/.well-known/audit-key.json`), for the operator
to keep elsewhere; only a chain that verifies is signed. `phivault audit verify --checkpoint
FILE` checks the signature, proves that the event at `seq` still has that `hash`, and verifies
only the events after it.

The file is JSON: `{"seq": 41523, "hash": "<64 hex digits>", "at": "2026-12-03T07:15:30.000000Z",
"key_id": "ck-...", "signature": "<base64url>"}`. The signature covers the other four fields as
canonical JSON (sorted keys, no spaces, UTF-8), behind the recipe's context string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from phivault.audit.chain import VerifyResult, format_time
from phivault.audit.sequencer import Sequencer
from phivault.audit.verify import Anchor, verify_chain
from phivault.crypto.audit_signing import (
    CheckpointSigner,
    decode_signature,
    encode_signature,
)
from phivault.db.base import utcnow

_HASH_HEX = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
FIELDS = ("seq", "hash", "at", "key_id", "signature")


class CheckpointFormatError(ValueError):
    """The text is not a checkpoint; `str()` says why in one line."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: bytes
    at: datetime
    key_id: str
    signature: bytes

    def signed_bytes(self) -> bytes:
        return signed_bytes(self.seq, self.hash, self.at, self.key_id)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash.hex(), "at": format_time(self.at),
                "key_id": self.key_id, "signature": encode_signature(self.signature)}

    def dumps(self) -> str:
        return orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n"

    @property
    def anchor(self) -> Anchor:
        return Anchor(self.seq, self.hash)


def signed_bytes(seq: int, digest: bytes, at: datetime, key_id: str) -> bytes:
    """What the signature covers: the checkpoint's other fields as canonical JSON."""
    return orjson.dumps({"seq": seq, "hash": digest.hex(), "at": format_time(at),
                         "key_id": key_id}, option=orjson.OPT_SORT_KEYS)


def parse_checkpoint(text: str | bytes) -> Checkpoint:
    """Read a checkpoint file's text (its signature is not checked here).

    Raises:
        CheckpointFormatError: not JSON, a field missing, extra or of the wrong form.
    """
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise CheckpointFormatError("not JSON") from None
    if not isinstance(data, dict) or set(data) != set(FIELDS):
        raise CheckpointFormatError(f"expected exactly the fields {', '.join(FIELDS)}")
    seq, digest, at, key_id, signature = (data[name] for name in FIELDS)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise CheckpointFormatError("seq: must be a whole number >= 0")
    if not isinstance(digest, str) or not _HASH_HEX.fullmatch(digest):
        raise CheckpointFormatError("hash: must be 64 lowercase hex digits")
    if not isinstance(at, str) or not _TIME.fullmatch(at):
        raise CheckpointFormatError("at: must be a UTC time like 2026-12-03T07:15:30.000000Z")
    if not isinstance(key_id, str) or not key_id:
        raise CheckpointFormatError("key_id: must be a key id")
    if not isinstance(signature, str):
        raise CheckpointFormatError("signature: must be base64url text")
    try:
        when = datetime.strptime(at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        raw_signature = decode_signature(signature)
    except ValueError as exc:
        raise CheckpointFormatError(str(exc) if "signature" in str(exc)
                                    else "at: not a valid time") from None
    return Checkpoint(seq, bytes.fromhex(digest), when, key_id, raw_signature)


def check_signature(checkpoint: Checkpoint, signer: CheckpointSigner) -> Anchor:
    """The checkpoint's head, once its signature is proven ours (else
    `CheckpointSignatureError`)."""
    signer.verify(checkpoint.key_id, checkpoint.signed_bytes(), checkpoint.signature)
    return checkpoint.anchor


class ChainBroken(Exception):
    """The chain does not verify, so its head is not signed; `result` says where."""

    def __init__(self, result: VerifyResult) -> None:
        super().__init__(f"the audit chain is broken at seq {result.first_bad_seq}")
        self.result = result


async def take_checkpoint(sessions: async_sessionmaker[AsyncSession], signer: CheckpointSigner,
                          key: bytes, sequencer: Sequencer | None = None, *,
                          after: Anchor | None = None, at: datetime | None = None
                          ) -> tuple[Checkpoint, VerifyResult]:
    """Chain what is committed (with a `sequencer`), verify the chain, and sign the head that
    verification checked, with the verification's result.

    A signature vouches for everything up to the head, so a broken chain is never signed
    (`ChainBroken`): a checkpoint taken after a tamper would otherwise bless it. The whole
    chain is verified, or with `after` (a checkpoint already proven by its signature) only the
    events after it, so that a nightly checkpoint costs what the day added."""
    if sequencer is not None:
        await sequencer.drain()
    async with sessions() as session:
        try:
            result = await verify_chain(session, key, anchor=after)
        finally:
            await session.rollback()
    if not result.ok:
        raise ChainBroken(result)
    seq, digest = result.head_seq, result.head_hash
    when = (at or utcnow()).astimezone(UTC)
    key_id = signer.key_id
    signed = Checkpoint(seq, digest, when, key_id,
                        signer.sign(signed_bytes(seq, digest, when, key_id)))
    return signed, result
