"""Database: engine, unit of work, base model, Alembic migrations."""
