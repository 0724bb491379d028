"""Signed checkpoints (SPEC §8): a head signed with Ed25519, proven unchanged later, with only the
events after it verified; the published key; the key's configuration."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select

from phivault.audit import service
from phivault.audit.chain import GENESIS_HASH
from phivault.audit.checkpoint import (
    ChainBroken,
    Checkpoint,
    CheckpointFormatError,
    check_signature,
    parse_checkpoint,
    take_checkpoint,
)
from phivault.audit.models import AuditEvent
from phivault.audit.verify import Anchor
from phivault.config import ConfigError, load_settings
from phivault.crypto.audit_signing import CONTEXT, CheckpointSignatureError
from phivault.crypto.keys import KeyKind, generate_key_line
from phivault.runtime import Runtime
from tests.audit.factories import tamper, write_chain
from tests.conftest import client_for, generate_keys

AT = datetime(2026, 12, 3, 7, 15, 30, 250000, tzinfo=UTC)


@pytest.fixture
async def signed_chain(fresh_runtime: Callable[..., Any]) -> tuple[Runtime, Checkpoint]:
    """40 events, a checkpoint of the head at seq 30, then 10 more events."""
    rt: Runtime = await fresh_runtime(
        audit_signing_key=generate_key_line(KeyKind.AUDIT_SIGNING))
    await write_chain(rt, 30)
    checkpoint, _ = await take_checkpoint(rt.sessions, rt.settings.checkpoint_signer,
                                          rt.audit_key, rt.sequencer, at=AT)
    await write_chain(rt, 10)
    return rt, checkpoint


async def _verify(rt: Runtime, checkpoint: Checkpoint | None = None,
                  **options: Any) -> tuple[bool, int, int | None]:
    anchor = check_signature(checkpoint, rt.settings.checkpoint_signer) if checkpoint else None
    result = await service.verify_snapshot(rt.sessions, rt.audit_key, rt.sequencer,
                                           rt.queue_key, checkpoint=anchor, **options)
    return result.ok, result.events, result.first_bad_seq


async def test_a_checkpoint_signs_the_head(signed_chain: tuple[Runtime, Checkpoint]) -> None:
    rt, checkpoint = signed_chain
    async with rt.sessions() as session:
        head_hash = (await session.execute(
            select(AuditEvent.hash).where(AuditEvent.seq == 30))).scalar_one()
    assert (checkpoint.seq, checkpoint.hash, checkpoint.at) == (30, head_hash, AT)
    assert checkpoint.key_id == rt.settings.checkpoint_signer.key_id
    written = json.loads(checkpoint.dumps())
    assert written == {"seq": 30, "hash": head_hash.hex(), "at": "2026-12-03T07:15:30.250000Z",
                       "key_id": checkpoint.key_id, "signature": written["signature"]}
    assert parse_checkpoint(checkpoint.dumps()) == checkpoint


async def test_verify_from_a_checkpoint_reads_only_the_events_after_it(
        signed_chain: tuple[Runtime, Checkpoint], backend: Any) -> None:
    rt, checkpoint = signed_chain
    assert await _verify(rt) == (True, 40, None)
    assert await _verify(rt, checkpoint) == (True, 10, None)
    # An event before the checkpoint is never read (it was verified when the checkpoint was
    # taken): editing it breaks the whole chain, not the verification from the checkpoint.
    await tamper(rt, "UPDATE audit_events SET ip = '198.51.100.9' WHERE seq = 12")
    assert await _verify(rt) == (False, 40, 12)
    assert await _verify(rt, checkpoint) == (True, 10, None)
    if backend.name == "postgres":
        assert await _verify(rt, checkpoint, ranges=3, processes=1) == (True, 10, None)


@pytest.mark.tampers
@pytest.mark.parametrize("sql, first_bad", [
    ("UPDATE audit_events SET ip = '198.51.100.9' WHERE seq = 35", 35),
    ("UPDATE audit_events SET ip = '198.51.100.9' WHERE seq = 31", 31),
    ("UPDATE audit_events SET ip = '198.51.100.9' WHERE seq = 30", 30),  # the head it signed
    ("DELETE FROM audit_events WHERE seq = 30", 30),
    ("DELETE FROM audit_events WHERE seq = 31", 31),
    ("UPDATE audit_events SET prev_hash = :zero WHERE seq = 31", 31),
    ("DELETE FROM audit_events WHERE seq >= 38", 38),
])
async def test_tampers_after_a_checkpoint_are_found_at_the_exact_seq(
        signed_chain: tuple[Runtime, Checkpoint], backend: Any, sql: str,
        first_bad: int) -> None:
    rt, checkpoint = signed_chain
    await tamper(rt, sql, **({"zero": bytes(32)} if ":zero" in sql else {}))
    ok, _events, bad = await _verify(rt, checkpoint)
    assert (ok, bad) == (False, first_bad)
    if backend.name == "postgres":
        ok, _events, bad = await _verify(rt, checkpoint, ranges=3, processes=1)
        assert (ok, bad) == (False, first_bad)


@pytest.mark.tampers
async def test_a_truncated_tail_is_found_against_a_checkpoint(
        signed_chain: tuple[Runtime, Checkpoint]) -> None:
    """Cut every event after seq 24 and move the head back to 24: the chain alone still
    verifies (that is what truncation looks like), the checkpoint at 30 does not."""
    rt, checkpoint = signed_chain
    async with rt.sessions() as session:
        hash_24 = (await session.execute(
            select(AuditEvent.hash).where(AuditEvent.seq == 24))).scalar_one()
    await tamper(rt, "DELETE FROM audit_events WHERE seq > 24")
    await tamper(rt, "UPDATE audit_head SET seq = 24, hash = :hash", hash=hash_24)
    assert await _verify(rt) == (True, 24, None)
    ok, _events, bad = await _verify(rt, checkpoint)
    assert (ok, bad) == (False, 25)


@pytest.mark.tampers
async def test_a_broken_chain_is_never_signed(signed_chain: tuple[Runtime, Checkpoint]) -> None:
    """A checkpoint vouches for everything up to its head: taken after a tamper, it would
    bless it. So the chain is verified first (whole, or after the previous checkpoint), and
    the head signed is the one that verification checked."""
    rt, first = signed_chain
    signer = rt.settings.checkpoint_signer
    assert signer is not None
    second, result = await take_checkpoint(rt.sessions, signer, rt.audit_key,
                                           after=first.anchor)
    assert (second.seq, result.events, result.ok) == (40, 10, True)
    await tamper(rt, "UPDATE audit_events SET ip = '198.51.100.9' WHERE seq = 35")
    with pytest.raises(ChainBroken) as broken:
        await take_checkpoint(rt.sessions, signer, rt.audit_key, after=first.anchor)
    assert broken.value.result.first_bad_seq == 35
    with pytest.raises(ChainBroken):
        await take_checkpoint(rt.sessions, signer, rt.audit_key)
    # An edit before the previous checkpoint is the whole chain's to find, not the increment's.
    await tamper(rt, "UPDATE audit_events SET ip = '198.51.100.8' WHERE seq = 12")
    with pytest.raises(ChainBroken) as broken:
        await take_checkpoint(rt.sessions, signer, rt.audit_key)
    assert broken.value.result.first_bad_seq == 12


@pytest.mark.tampers
async def test_a_chain_rewritten_from_before_the_checkpoint_is_found(
        fresh_runtime: Callable[..., Any]) -> None:
    """Someone with the audit key rewrites the chain (valid MACs throughout): the signed head
    no longer matches."""
    rt: Runtime = await fresh_runtime(
        audit_signing_key=generate_key_line(KeyKind.AUDIT_SIGNING))
    await write_chain(rt, 5)
    checkpoint, _ = await take_checkpoint(rt.sessions, rt.settings.checkpoint_signer,
                                          rt.audit_key)
    await tamper(rt, "DELETE FROM audit_events")
    await tamper(rt, "UPDATE audit_head SET seq = 0, hash = :genesis", genesis=GENESIS_HASH)
    await write_chain(rt, 8)  # a different, valid chain
    assert await _verify(rt) == (True, 8, None)
    ok, _events, bad = await _verify(rt, checkpoint)
    assert (ok, bad) == (False, 5)


async def test_a_checkpoint_of_the_empty_chain(fresh_runtime: Callable[..., Any]) -> None:
    rt: Runtime = await fresh_runtime(
        audit_signing_key=generate_key_line(KeyKind.AUDIT_SIGNING))
    checkpoint, _ = await take_checkpoint(rt.sessions, rt.settings.checkpoint_signer,
                                          rt.audit_key)
    assert (checkpoint.seq, checkpoint.hash) == (0, GENESIS_HASH)
    await write_chain(rt, 3)
    assert await _verify(rt, checkpoint) == (True, 3, None)


@pytest.mark.parametrize("field, value", [
    ("seq", 31), ("hash", "00" * 32), ("at", "2026-12-04T07:15:30.250000Z"),
])
async def test_an_edited_checkpoint_is_refused(signed_chain: tuple[Runtime, Checkpoint],
                                               field: str, value: Any) -> None:
    rt, checkpoint = signed_chain
    edited = parse_checkpoint(json.dumps({**checkpoint.to_json(), field: value}))
    with pytest.raises(CheckpointSignatureError, match="^the signature does not verify$"):
        check_signature(edited, rt.settings.checkpoint_signer)


async def test_a_checkpoint_of_another_key_is_refused(
        signed_chain: tuple[Runtime, Checkpoint]) -> None:
    rt, checkpoint = signed_chain
    other = load_settings(**_keys(audit_signing_key=generate_key_line(KeyKind.AUDIT_SIGNING)))
    with pytest.raises(CheckpointSignatureError, match="is not in PHIVAULT_AUDIT_SIGNING_KEY"):
        check_signature(checkpoint, other.checkpoint_signer)
    # The same key id on another key: a forgery.
    forged_key = f"{checkpoint.key_id}:{generate_key_line(KeyKind.AUDIT_SIGNING).split(':')[1]}"
    forger = load_settings(**_keys(audit_signing_key=forged_key)).checkpoint_signer
    forged = dataclasses.replace(checkpoint, signature=forger.sign(checkpoint.signed_bytes()))
    with pytest.raises(CheckpointSignatureError, match="^the signature does not verify$"):
        check_signature(forged, rt.settings.checkpoint_signer)


async def test_a_rotated_key_still_verifies_old_checkpoints(
        signed_chain: tuple[Runtime, Checkpoint]) -> None:
    rt, checkpoint = signed_chain
    old = rt.settings.audit_signing_key
    assert old is not None
    rotated = load_settings(**_keys(audit_signing_key=generate_key_line(
        KeyKind.AUDIT_SIGNING) + "," + old.get_secret_value())).checkpoint_signer
    assert rotated.key_id != checkpoint.key_id
    assert check_signature(checkpoint, rotated) == Anchor(30, checkpoint.hash)


WELL_FORMED = {"seq": 1, "hash": "00" * 32, "at": "2026-12-03T07:15:30.000000Z",
               "key_id": "k", "signature": "A" * 86}


@pytest.mark.parametrize("text, problem", [
    ("not json", "not JSON"),
    ("[]", "expected exactly the fields"),
    ('{"seq": 1}', "expected exactly the fields"),
    (json.dumps({**WELL_FORMED, "extra": 1}), "expected exactly the fields"),
    (json.dumps({**WELL_FORMED, "seq": -1}), "seq:"),
    (json.dumps({**WELL_FORMED, "seq": True}), "seq:"),
    (json.dumps({**WELL_FORMED, "hash": "0" * 63}), "hash:"),
    (json.dumps({**WELL_FORMED, "hash": "AB" * 32}), "hash:"),
    (json.dumps({**WELL_FORMED, "at": "2026-12-03 07:15:30"}), "at:"),
    (json.dumps({**WELL_FORMED, "at": "2026-13-03T07:15:30.000000Z"}), "at:"),
    (json.dumps({**WELL_FORMED, "key_id": ""}), "key_id:"),
    (json.dumps({**WELL_FORMED, "signature": "A" * 85}), "signature:"),
    (json.dumps({**WELL_FORMED, "signature": "A" * 84 + "+/"}), "signature:"),
])
def test_malformed_checkpoints_are_named(text: str, problem: str) -> None:
    with pytest.raises(CheckpointFormatError, match=problem):
        parse_checkpoint(text)
    assert parse_checkpoint(json.dumps(WELL_FORMED)).seq == 1


async def test_the_public_key_is_published(signed_chain: tuple[Runtime, Checkpoint]) -> None:
    """Anyone can check a checkpoint's origin with the published key alone."""
    rt, checkpoint = signed_chain
    async with client_for(rt) as client:
        answer = await client.get("/.well-known/audit-key.json")
    assert answer.status_code == 200
    (jwk,) = answer.json()["keys"]
    assert {k: jwk[k] for k in ("kty", "crv", "kid", "alg")} == {
        "kty": "OKP", "crv": "Ed25519", "kid": checkpoint.key_id, "alg": "EdDSA"}
    assert "d" not in jwk
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(jwk["x"] + "="))
    public.verify(checkpoint.signature, CONTEXT + checkpoint.signed_bytes())
    with pytest.raises(InvalidSignature):
        public.verify(checkpoint.signature, checkpoint.signed_bytes())  # the context binds


async def test_no_key_publishes_an_empty_set(runtime: Runtime) -> None:
    async with client_for(runtime) as client:
        answer = await client.get("/.well-known/audit-key.json")
    assert answer.status_code == 200 and answer.json() == {"keys": []}


# The key's configuration.

def _keys(**extra: str) -> dict[str, str]:
    values = {name.removeprefix("PHIVAULT_").lower(): value
              for name, value in generate_keys().items()}
    values.update(extra)
    return values


def test_the_key_is_optional_until_a_checkpoint_is_made() -> None:
    settings = load_settings(**_keys())
    assert settings.checkpoint_signer.keys == ()
    with pytest.raises(ConfigError, match="^PHIVAULT_AUDIT_SIGNING_KEY: is required"):
        settings.require_checkpoint_signer()


def pem_armour(body: str) -> str:
    """PEM armour around a body that is no key at all (the label is built, so no key-shaped
    text sits in the repository)."""
    label = " ".join(("PRIVATE", "KEY"))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----"


@pytest.mark.parametrize("value, problem", [
    ("nokey", "expected id:base64url"),
    ("ck-1:dG9vLXNob3J0", "must decode to 32 bytes"),
    (pem_armour("x"), "not PEM"),
])
def test_a_malformed_key_is_named(value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"^PHIVAULT_AUDIT_SIGNING_KEY: .*{problem}"):
        load_settings(**_keys(audit_signing_key=value))


def test_the_key_may_come_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in generate_keys().items():
        monkeypatch.setenv(name, value)
    line = generate_key_line(KeyKind.AUDIT_SIGNING)
    (tmp_path / "signing").write_text(line + "\n")
    monkeypatch.setenv("PHIVAULT_AUDIT_SIGNING_KEY_FILE", str(tmp_path / "signing"))
    assert load_settings().checkpoint_signer.key_id == line.split(":")[0]
    monkeypatch.setenv("PHIVAULT_AUDIT_SIGNING_KEY", line)
    with pytest.raises(ConfigError, match="^PHIVAULT_AUDIT_SIGNING_KEY_FILE: set either"):
        load_settings()


def test_prod_refuses_a_dev_key() -> None:
    dev = generate_key_line(KeyKind.AUDIT_SIGNING, dev=True)
    assert load_settings(**_keys(audit_signing_key=dev)).checkpoint_signer.keys
    with pytest.raises(ConfigError, match="^PHIVAULT_AUDIT_SIGNING_KEY: .*init --dev"):
        load_settings(**_keys(audit_signing_key=dev, env="prod"))
    load_settings(**_keys(audit_signing_key=generate_key_line(KeyKind.AUDIT_SIGNING),
                          env="prod"))
