"""The audit tables: the append-only event chain, its one-row head, and the queue that requests
write to (the sequencer moves queued events into the chain, SPEC §8)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.base import Base, UTCDateTime

GENESIS_HASH = bytes(32)


class AuditEvent(Base):
    """One event of the chain. Never updated or deleted (a PostgreSQL trigger enforces it)."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                     primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    actor_role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(48))
    resource_type: Mapped[str | None] = mapped_column(String(48))
    resource_id: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    outcome: Mapped[str] = mapped_column(String(8))
    ip: Mapped[str | None] = mapped_column(String(45))
    user_agent: Mapped[str | None] = mapped_column(String(256))
    request_id: Mapped[str | None] = mapped_column(String(64))
    event_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON())
    prev_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    # The id the event was queued under (null for events chained before the queue existed). Not
    # part of the MAC: it names the event for exports and lets the queue's delete trigger check
    # that a queued event was chained before it goes.
    event_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())

    __table_args__ = (
        Index("uq_audit_events_event_id", "event_id", unique=True),
        CheckConstraint("outcome IN ('success', 'denied', 'error')", name="outcome"),
        CheckConstraint("seq >= 1", name="seq_positive"),
        # Search (GET /audit, /me/access-log) filters by one column and pages newest first by
        # seq: each index ends in seq, so a filtered page is an index range read backwards.
        Index("ix_audit_events_actor_seq", "actor_id", "seq"),
        # With actor_id (PostgreSQL INCLUDE), a patient's access log (events about them by
        # someone else) counts from the index alone (migration 0004).
        Index("ix_audit_events_patient_seq", "patient_id", "seq",
              postgresql_include=["actor_id"]),
        Index("ix_audit_events_action_seq", "action", "seq"),
        Index("ix_audit_events_outcome_seq", "outcome", "seq"),
        Index("ix_audit_events_resource_seq", "resource_type", "resource_id", "seq"),
        Index("ix_audit_events_at", "at"),
    )


class QueuedEvent(Base):
    """An event committed by a request and not yet chained. Each carries its own MAC, so an
    edit is detectable from the moment it commits; the sequencer moves it into `audit_events`
    and deletes it in one transaction (a trigger refuses deleting an event not yet chained)."""

    __tablename__ = "audit_queue"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid(), unique=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    actor_role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(48))
    resource_type: Mapped[str | None] = mapped_column(String(48))
    resource_id: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    outcome: Mapped[str] = mapped_column(String(8))
    ip: Mapped[str | None] = mapped_column(String(45))
    user_agent: Mapped[str | None] = mapped_column(String(256))
    request_id: Mapped[str | None] = mapped_column(String(64))
    event_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON())
    mac: Mapped[bytes] = mapped_column(LargeBinary(32))

    __table_args__ = (
        CheckConstraint("outcome IN ('success', 'denied', 'error')", name="outcome"),
    )


class RejectedEvent(Base):
    """A queued event the sequencer refused to chain: its MAC did not match (edited, forged, or
    unparseable), or it replays an event already chained. Kept as it was found, append-only,
    for the auditor; `verify` reports every one."""

    __tablename__ = "audit_queue_rejected"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=False)
    event_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    actor_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    actor_role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str | None] = mapped_column(String(48))
    resource_type: Mapped[str | None] = mapped_column(String(48))
    resource_id: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    outcome: Mapped[str | None] = mapped_column(String(8))
    ip: Mapped[str | None] = mapped_column(String(45))
    user_agent: Mapped[str | None] = mapped_column(String(256))
    request_id: Mapped[str | None] = mapped_column(String(64))
    metadata_text: Mapped[str | None] = mapped_column(Text())
    mac: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    reason: Mapped[str] = mapped_column(String(32))
    rejected_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AuditHead(Base):
    """The chain's head: the last `seq` and `hash`. Only the sequencer moves it (and locks it
    while it does); a trigger refuses deleting it. It also keeps how the chain's times follow
    its order (`audit/timeline.py`), up to `timed_seq`, for searches over a time window."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    latest_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    lateness_us: Mapped[int | None] = mapped_column(BigInteger(), nullable=True)
    timed_seq: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), nullable=True)

    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)
