"""Bringing a database to the newest schema with the bundled Alembic migrations."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None  # noqa: S101 - the package ships its migrations
    return head


async def upgrade(engine: AsyncEngine) -> tuple[str | None, str]:
    """Upgrade to head; returns (revision before, revision after). Idempotent."""

    def run(connection: Connection) -> str | None:
        before = MigrationContext.configure(connection).get_current_revision()
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        return before

    async with engine.begin() as connection:
        before = await connection.run_sync(run)
    return before, head_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(
            lambda c: MigrationContext.configure(c).get_current_revision())
