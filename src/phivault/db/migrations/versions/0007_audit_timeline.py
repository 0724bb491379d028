"""The audit head keeps how the chain's times follow its order (`audit/timeline.py`): the newest
`at` chained, the most an event's `at` fell behind it, and the `seq` up to which both are kept.
Searches over a time window use them to read only the window's part of the chain.

The upgrade reads the existing chain once, in `seq` order and in batches (constant memory), to
fill them in.

On PostgreSQL it also rewrites the head's guard (0004), whose "no event after the new head"
test was `EXISTS (... WHERE seq > NEW.seq)`: once PL/pgSQL switched to a generic plan, that ran
as a sequential scan of the whole trail on every head move (30 ms per sequencer batch at
200,000 events, 150 ms at 1,000,000, found by bench/audit_search_bench.py). `max(seq)` is one
probe of the primary key whatever the plan.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from phivault.audit import timeline
from phivault.db.base import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# The head moves only to the chain's last event (0004); {after} tests for events after it.
FOLLOWS_CHAIN = """CREATE OR REPLACE FUNCTION phivault_audit_head_follows_chain() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT ((NEW.seq = 0 AND NEW.hash = decode(repeat('00', 32), 'hex'))
                OR EXISTS (SELECT 1 FROM {schema}.audit_events
                           WHERE seq = NEW.seq AND hash = NEW.hash))
           OR {after} THEN
            RAISE EXCEPTION 'audit_head must name the chain''s last event'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN NEW;
    END;
    $$"""
AFTER_BY_MAX = "coalesce((SELECT max(seq) FROM {schema}.audit_events), 0) > NEW.seq"
AFTER_BY_EXISTS = "EXISTS (SELECT 1 FROM {schema}.audit_events WHERE seq > NEW.seq)"


def _guard(after: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    # Named with its schema, as in 0004: a temporary table must not answer for audit_events.
    schema = bind.dialect.identifier_preparer.quote(
        bind.exec_driver_sql("SELECT current_schema()").scalar_one())
    op.execute(FOLLOWS_CHAIN.replace("{after}", after).replace("{schema}", schema))


def upgrade() -> None:
    with op.batch_alter_table("audit_head", schema=None) as batch_op:
        batch_op.add_column(sa.Column("latest_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("lateness_us", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("timed_seq", SEQ, nullable=True))
    _guard(AFTER_BY_MAX)
    timeline.recompute(op.get_bind())


def downgrade() -> None:
    _guard(AFTER_BY_EXISTS)
    with op.batch_alter_table("audit_head", schema=None) as batch_op:
        batch_op.drop_column("timed_seq")
        batch_op.drop_column("lateness_us")
        batch_op.drop_column("latest_at")
