"""Care endings: a patient ends one doctor's care relationship (SPEC §7).

Consultations between the two made up to a row's `ended_at` grant nothing any more. The table is
append-only for the runtime role (deploy/postgres-roles.sql grants it SELECT and INSERT only).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from phivault.db.base import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "care_endings",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("patient_id", sa.Uuid(), nullable=False),
        sa.Column("doctor_id", sa.Uuid(), nullable=False),
        sa.Column("ended_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["patient_id"], ["users.id"],
                                name=op.f("fk_care_endings_patient_id_users")),
        sa.ForeignKeyConstraint(["doctor_id"], ["users.id"],
                                name=op.f("fk_care_endings_doctor_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_care_endings")),
    )
    # The chart gate asks, on every chart request, whether the pair has an end at or after a
    # consultation's creation: one index probe.
    op.create_index("ix_care_endings_pair", "care_endings",
                    ["patient_id", "doctor_id", "ended_at"])


def downgrade() -> None:
    op.drop_index("ix_care_endings_pair", table_name="care_endings")
    op.drop_table("care_endings")
