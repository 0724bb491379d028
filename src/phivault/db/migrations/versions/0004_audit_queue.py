"""The audit queue and its sequencer's guards, search indexes, sealed break-glass reasons.

Requests insert their events into `audit_queue`; the sequencer chains them into `audit_events`
(SPEC §8). Triggers refuse deleting the chain's head and deleting a queued event that is not yet
in the chain, on PostgreSQL and SQLite alike.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from phivault.db.base import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

OLD_INDEXES = ("at", "actor_id", "action", "patient_id")
SEARCH_INDEXES = {
    "ix_audit_events_actor_seq": ["actor_id", "seq"],
    "ix_audit_events_patient_seq": ["patient_id", "seq"],
    "ix_audit_events_action_seq": ["action", "seq"],
    "ix_audit_events_outcome_seq": ["outcome", "seq"],
    "ix_audit_events_resource_seq": ["resource_type", "resource_id", "seq"],
    "ix_audit_events_at": ["at"],
}

PG_GUARDS = (
    """CREATE FUNCTION phivault_audit_head_kept() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_head is kept: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END;
    $$""",
    "CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head "
    "FOR EACH ROW EXECUTE FUNCTION phivault_audit_head_kept()",
    "CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head "
    "FOR EACH STATEMENT EXECUTE FUNCTION phivault_audit_head_kept()",
    # A queued event leaves the queue only once it is in the chain (the sequencer inserts it
    # there in the same transaction, before deleting it): nobody can make one vanish unchained.
    """CREATE FUNCTION phivault_audit_queue_chained_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' THEN
            RAISE EXCEPTION 'audit_queue is append-only: UPDATE refused'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM {schema}.audit_events WHERE event_id = OLD.event_id)
           AND NOT EXISTS (SELECT 1 FROM {schema}.audit_queue_rejected WHERE id = OLD.id) THEN
            RAISE EXCEPTION 'audit_queue: an event not yet chained cannot be deleted'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN OLD;
    END;
    $$""",
    "CREATE TRIGGER audit_queue_chained_only BEFORE UPDATE OR DELETE ON audit_queue "
    "FOR EACH ROW EXECUTE FUNCTION phivault_audit_queue_chained_only()",
    "CREATE TRIGGER audit_queue_no_truncate BEFORE TRUNCATE ON audit_queue "
    "FOR EACH STATEMENT EXECUTE FUNCTION phivault_audit_append_only()",
    "CREATE TRIGGER audit_queue_rejected_append_only BEFORE UPDATE OR DELETE ON "
    "audit_queue_rejected FOR EACH ROW EXECUTE FUNCTION phivault_audit_append_only()",
    "CREATE TRIGGER audit_queue_rejected_no_truncate BEFORE TRUNCATE ON audit_queue_rejected "
    "FOR EACH STATEMENT EXECUTE FUNCTION phivault_audit_append_only()",
    # The head moves only to the chain's last event: its seq and hash, with nothing after it.
    # So a role that may move it (the sequencer's) cannot rewind it over a cut tail, or jump it
    # ahead and leave a gap every later batch would trip over.
    """CREATE FUNCTION phivault_audit_head_follows_chain() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT ((NEW.seq = 0 AND NEW.hash = decode(repeat('00', 32), 'hex'))
                OR EXISTS (SELECT 1 FROM {schema}.audit_events
                           WHERE seq = NEW.seq AND hash = NEW.hash))
           OR EXISTS (SELECT 1 FROM {schema}.audit_events WHERE seq > NEW.seq) THEN
            RAISE EXCEPTION 'audit_head must name the chain''s last event'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN NEW;
    END;
    $$""",
    "CREATE TRIGGER audit_head_follows_chain BEFORE UPDATE ON audit_head "
    "FOR EACH ROW EXECUTE FUNCTION phivault_audit_head_follows_chain()",
)

SQLITE_GUARDS = (
    "CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head "
    "BEGIN SELECT RAISE(ABORT, 'audit_head is kept: DELETE refused'); END",
    "CREATE TRIGGER audit_queue_no_update BEFORE UPDATE ON audit_queue "
    "BEGIN SELECT RAISE(ABORT, 'audit_queue is append-only: UPDATE refused'); END",
    "CREATE TRIGGER audit_queue_chained_only BEFORE DELETE ON audit_queue "
    "WHEN NOT EXISTS (SELECT 1 FROM audit_events WHERE event_id = OLD.event_id) "
    "AND NOT EXISTS (SELECT 1 FROM audit_queue_rejected WHERE id = OLD.id) "
    "BEGIN SELECT RAISE(ABORT, 'audit_queue: an event not yet chained cannot be deleted'); END",
    "CREATE TRIGGER audit_queue_rejected_no_update BEFORE UPDATE ON audit_queue_rejected "
    "BEGIN SELECT RAISE(ABORT, 'audit_queue_rejected is append-only: UPDATE refused'); END",
    "CREATE TRIGGER audit_queue_rejected_no_delete BEFORE DELETE ON audit_queue_rejected "
    "BEGIN SELECT RAISE(ABORT, 'audit_queue_rejected is append-only: DELETE refused'); END",
    "CREATE TRIGGER audit_head_follows_chain BEFORE UPDATE ON audit_head "
    "WHEN NOT ((NEW.seq = 0 AND NEW.hash = zeroblob(32)) "
    "OR EXISTS (SELECT 1 FROM audit_events WHERE seq = NEW.seq AND hash = NEW.hash)) "
    "OR EXISTS (SELECT 1 FROM audit_events WHERE seq > NEW.seq) "
    "BEGIN SELECT RAISE(ABORT, 'audit_head must name the chain''s last event'); END",
)


def upgrade() -> None:
    op.create_table(
        "audit_queue",
        sa.Column("id", BIGINT, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("actor_id", sa.Uuid(), nullable=True),
        sa.Column("actor_role", sa.String(16), nullable=True),
        sa.Column("action", sa.String(48), nullable=False),
        sa.Column("resource_type", sa.String(48), nullable=True),
        sa.Column("resource_id", sa.String(64), nullable=True),
        sa.Column("patient_id", sa.Uuid(), nullable=True),
        sa.Column("outcome", sa.String(8), nullable=False),
        sa.Column("ip", sa.String(45), nullable=True),
        sa.Column("user_agent", sa.String(256), nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("mac", sa.LargeBinary(32), nullable=False),
        sa.CheckConstraint("outcome IN ('success', 'denied', 'error')",
                           name=op.f("ck_audit_queue_outcome")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_queue")),
        sa.UniqueConstraint("event_id", name=op.f("uq_audit_queue_event_id")),
    )
    op.create_table(
        "audit_queue_rejected",
        sa.Column("id", BIGINT, autoincrement=False, nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=True),
        sa.Column("at", UTCDateTime(), nullable=True),
        sa.Column("actor_id", sa.Uuid(), nullable=True),
        sa.Column("actor_role", sa.String(16), nullable=True),
        sa.Column("action", sa.String(48), nullable=True),
        sa.Column("resource_type", sa.String(48), nullable=True),
        sa.Column("resource_id", sa.String(64), nullable=True),
        sa.Column("patient_id", sa.Uuid(), nullable=True),
        sa.Column("outcome", sa.String(8), nullable=True),
        sa.Column("ip", sa.String(45), nullable=True),
        sa.Column("user_agent", sa.String(256), nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("metadata_text", sa.Text(), nullable=True),
        sa.Column("mac", sa.LargeBinary(32), nullable=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("rejected_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_queue_rejected")),
    )
    # Plain ADD COLUMN and CREATE INDEX: a batch (copy-and-move) on SQLite would drop the
    # table's append-only triggers.
    op.add_column("audit_events", sa.Column("event_id", sa.Uuid(), nullable=True))
    op.create_index("uq_audit_events_event_id", "audit_events", ["event_id"], unique=True)
    for column in OLD_INDEXES:
        op.drop_index(op.f(f"ix_audit_events_{column}"), table_name="audit_events")
    for name, columns in SEARCH_INDEXES.items():
        # The patient index carries actor_id (PostgreSQL's INCLUDE; SQLite has none), so the
        # access log's total, "about this patient, by someone else", is an index-only scan.
        include: dict[str, Any] = ({"postgresql_include": ["actor_id"]}
                                   if name.endswith("patient_seq") else {})
        op.create_index(name, "audit_events", columns, **include)

    op.add_column("break_glass_grants", sa.Column("data_key_id", sa.Uuid(), nullable=True))
    op.add_column("break_glass_grants", sa.Column("reason", sa.LargeBinary(4096), nullable=True))

    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # The queue's trigger names audit_events with its schema: unqualified, a temporary
        # table of that name (temporary tables come first in the search path) could vouch for
        # an event that was never chained.
        schema = bind.dialect.identifier_preparer.quote(
            bind.exec_driver_sql("SELECT current_schema()").scalar_one())
        for statement in PG_GUARDS:
            op.execute(statement.replace("{schema}", schema))
    else:
        for statement in SQLITE_GUARDS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_head_follows_chain ON audit_head")
        op.execute("DROP FUNCTION phivault_audit_head_follows_chain()")
        op.execute("DROP TRIGGER audit_queue_no_truncate ON audit_queue")
        op.execute("DROP TRIGGER audit_queue_chained_only ON audit_queue")
        op.execute("DROP FUNCTION phivault_audit_queue_chained_only()")
        op.execute("DROP TRIGGER audit_head_no_truncate ON audit_head")
        op.execute("DROP TRIGGER audit_head_no_delete ON audit_head")
        op.execute("DROP FUNCTION phivault_audit_head_kept()")
    else:
        op.execute("DROP TRIGGER audit_head_no_delete")
        op.execute("DROP TRIGGER audit_head_follows_chain")
    with op.batch_alter_table("break_glass_grants") as batch:
        batch.drop_column("reason")
        batch.drop_column("data_key_id")
    for name in SEARCH_INDEXES:
        op.drop_index(name, table_name="audit_events")
    for column in OLD_INDEXES:
        op.create_index(op.f(f"ix_audit_events_{column}"), "audit_events", [column])
    op.drop_index("uq_audit_events_event_id", table_name="audit_events")
    op.drop_column("audit_events", "event_id")
    op.drop_table("audit_queue_rejected")
    op.drop_table("audit_queue")
