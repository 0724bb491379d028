"""List paging: `limit` (default 50, at most 500) and `offset`, the total in `X-Total-Count`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Response

MAX_LIMIT = 500
MAX_OFFSET = 10_000_000


@dataclass(frozen=True, slots=True)
class Page:
    limit: int
    offset: int

    def answer(self, response: Response, total: int) -> None:
        response.headers["X-Total-Count"] = str(total)


async def page_parameters(
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="At most 500.")] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Page:
    return Page(limit, offset)


PageDep = Annotated[Page, Depends(page_parameters)]
