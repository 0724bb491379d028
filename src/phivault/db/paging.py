"""One page of a query's rows, and the total the query would give without paging."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

T = TypeVar("T")


async def fetch_page(session: AsyncSession, query: Select[T], limit: int,
                     offset: int) -> tuple[Sequence[T], int]:
    """`query`'s rows from `offset` (at most `limit`), and how many there are in all."""
    counted: Select[Any] = select(func.count()).select_from(query.order_by(None).subquery())
    total = int((await session.execute(counted)).scalar_one())
    rows = (await session.execute(query.limit(limit).offset(offset))).scalars().all()
    return rows, total
