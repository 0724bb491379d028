"""The privacy portal's server-side sessions (SPEC §15, `portal/models.py`).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from phivault.db.base import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "portal_sessions",
        sa.Column("id_digest", sa.LargeBinary(32), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("pending", sa.Boolean(), nullable=False),
        sa.Column("account", sa.String(64), nullable=True),
        sa.Column("auth_session_id", sa.Uuid(), nullable=True),
        sa.Column("csrf_token", sa.LargeBinary(32), nullable=False),
        sa.Column("code_attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("seen_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id_digest", name=op.f("pk_portal_sessions")),
    )
    op.create_index(op.f("ix_portal_sessions_user_id"), "portal_sessions", ["user_id"])
    op.create_index(op.f("ix_portal_sessions_expires_at"), "portal_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_portal_sessions_expires_at"), table_name="portal_sessions")
    op.drop_index(op.f("ix_portal_sessions_user_id"), table_name="portal_sessions")
    op.drop_table("portal_sessions")
