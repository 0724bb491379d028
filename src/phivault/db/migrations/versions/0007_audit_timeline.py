"""The audit head keeps how the chain's times follow its order (`audit/timeline.py`): the newest
`at` chained, the most an event's `at` fell behind it, and the `seq` up to which both hold.
Searches over a time window use them to read only the window's part of the chain.

On PostgreSQL the head's guard (0004) now also computes them, on every move of the head, from
the events it moves past, whatever the UPDATE says: the runtime role that moves the head cannot
write a timing that would hide late events from window searches. The upgrade leaves them empty
(searches do without them): the sequencer's next batch folds the whole chain under the head's
row lock, not under this migration's lock on the table. On SQLite the upgrade folds the chain
here, in batches.

The guard's "no event after the new head" test was `EXISTS (... WHERE seq > NEW.seq)`: once
PL/pgSQL switched to a generic plan, that ran as a sequential scan of the whole trail on every
head move (30 ms per sequencer batch at 200,000 events, 150 ms at 1,000,000, found by
bench/audit_search_bench.py). `max(seq)` is one probe of the primary key whatever the plan.

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
# {timing}: the part that folds the timing (empty in the downgrade's form).
FOLLOWS_CHAIN = """CREATE OR REPLACE FUNCTION phivault_audit_head_follows_chain() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
        start bigint;
        folded_latest timestamptz;
        folded_lateness bigint;
    BEGIN
        IF NOT ((NEW.seq = 0 AND NEW.hash = decode(repeat('00', 32), 'hex'))
                OR EXISTS (SELECT 1 FROM {schema}.audit_events
                           WHERE seq = NEW.seq AND hash = NEW.hash))
           OR {after} THEN
            RAISE EXCEPTION 'audit_head must name the chain''s last event'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        {timing}
        RETURN NEW;
    END;
    $$"""
AFTER_BY_MAX = "coalesce((SELECT max(seq) FROM {schema}.audit_events), 0) > NEW.seq"
AFTER_BY_EXISTS = "EXISTS (SELECT 1 FROM {schema}.audit_events WHERE seq > NEW.seq)"
# The timing is folded from where the old head's stood, over the events up to the new head;
# from the first event when the UPDATE sets timed_seq to NULL (`timeline.recompute`) or there
# is none yet. What the UPDATE says of latest_at and lateness_us is never taken.
TIMING = """IF NEW.timed_seq IS NULL OR OLD.timed_seq IS NULL OR OLD.timed_seq > NEW.seq THEN
            start := 0;
            NEW.latest_at := NULL;
            NEW.lateness_us := 0;
        ELSE
            start := OLD.timed_seq;
            NEW.latest_at := OLD.latest_at;
            NEW.lateness_us := coalesce(OLD.lateness_us, 0);
        END IF;
        IF start < NEW.seq THEN
            SELECT max(at),
                   max((extract(epoch FROM (prev - at)) * 1000000)::bigint)
                       FILTER (WHERE prev > at)
              INTO folded_latest, folded_lateness
              FROM (SELECT at,
                           greatest(NEW.latest_at, max(at) OVER (
                               ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING))
                           AS prev
                      FROM {schema}.audit_events
                     WHERE seq > start AND seq <= NEW.seq) AS moved_past;
            NEW.latest_at := greatest(NEW.latest_at, folded_latest);
            NEW.lateness_us := greatest(NEW.lateness_us, coalesce(folded_lateness, 0));
        END IF;
        NEW.timed_seq := NEW.seq;"""


def _guard(after: str, timing: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    # Named with its schema, as in 0004: a temporary table must not answer for audit_events.
    schema = bind.dialect.identifier_preparer.quote(
        bind.exec_driver_sql("SELECT current_schema()").scalar_one())
    op.execute(FOLLOWS_CHAIN.replace("{timing}", timing).replace("{after}", after)
               .replace("{schema}", schema))


def upgrade() -> None:
    with op.batch_alter_table("audit_head", schema=None) as batch_op:
        batch_op.add_column(sa.Column("latest_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("lateness_us", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("timed_seq", SEQ, nullable=True))
    _guard(AFTER_BY_MAX, TIMING)
    if op.get_bind().dialect.name != "postgresql":
        timeline.recompute(op.get_bind())


def downgrade() -> None:
    _guard(AFTER_BY_EXISTS, "")
    with op.batch_alter_table("audit_head", schema=None) as batch_op:
        batch_op.drop_column("timed_seq")
        batch_op.drop_column("lateness_us")
        batch_op.drop_column("latest_at")
