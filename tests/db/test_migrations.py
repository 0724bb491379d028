"""Migrations run on both databases, are idempotent, and match the models exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from phivault.db.metadata import target_metadata
from phivault.db.migrate import current_revision, head_revision, upgrade


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, target_metadata))


async def test_models_and_migrations_do_not_drift(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    async with rt.engine.connect() as connection:
        assert await connection.run_sync(_diff) == []


async def test_upgrade_is_idempotent(fresh_runtime: Callable[..., Any]) -> None:
    rt = await fresh_runtime()
    assert await current_revision(rt.engine) == head_revision()
    before, after = await upgrade(rt.engine)
    assert before == after == head_revision()
