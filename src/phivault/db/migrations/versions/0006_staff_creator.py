"""Separation of duties (SPEC §6): who created a staff account, so that they never approve it.

`users.created_by` is the admin who created the account through the API; NULL for accounts made
before this revision, by the CLI, by registration or by an import. No foreign key: SQLite adds
a column in place only without one, and `users` rows are never deleted (erasure keeps the row).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("created_by", sa.Uuid(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("created_by")
