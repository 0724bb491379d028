"""Gates: how many long requests of one kind a server process runs at once, and per caller.

Some requests hold something for as long as their client takes: an export streams for as long as
its reader reads (and needs a second database connection), an upload spools its sealed body for
as long as its sender sends (memory, then a temporary file). Unbounded, a few callers holding
many of them, slowly, would exhaust what they hold for everyone (outside reviews found both).
A gate has `places` per server process and `per_caller` places per caller; taking one never
waits: a full gate answers 429 `rate_limited` with `Retry-After` at once, so a refused request
holds nothing. Gates are per process, kept on the app's state: with `--workers N` the bound is
N times the places, which is what each process's memory and pool can afford.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from starlette.requests import Request

from phivault.errors import RateLimited


@dataclass
class Gate:
    """`places` at once in this process, `per_caller` of them per caller."""

    what: str  # "export", "upload": named in the 429's detail
    places: int
    per_caller: int = 1
    retry_after: int = 5
    busy: Counter[uuid.UUID] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.places = max(1, self.places)
        self.per_caller = max(1, self.per_caller)

    def enter(self, caller: uuid.UUID) -> None:
        if self.busy[caller] >= self.per_caller:
            raise RateLimited(self.retry_after, (
                f"Your {self.what} is already running; wait for it to finish."
                if self.per_caller == 1 else
                f"You already run {self.per_caller} {self.what}s at once, the most one account "
                "may; wait for one to finish."))
        if self.busy.total() >= self.places:
            raise RateLimited(self.retry_after,
                              f"Too many {self.what}s are running; try again in a few seconds.")
        self.busy[caller] += 1

    def leave(self, caller: uuid.UUID) -> None:
        self.busy[caller] -= 1
        if self.busy[caller] <= 0:
            del self.busy[caller]

    @contextmanager
    def held(self, caller: uuid.UUID) -> Iterator[None]:
        """A place for the block. A route takes it in a dependency with `yield` (request
        scope), which ends after the answer is sent, streamed bodies included, and sees every
        failure before that, the unit of work's commit among them (it runs after the route
        returns): so the place is given back in every case. (An outside review leaked export
        places by failing that commit, when the streamed body that gave them back never
        started.)"""
        self.enter(caller)
        try:
            yield
        finally:
            self.leave(caller)



def gate_of(request: Request, what: str, places: int, per_caller: int = 1) -> Gate:
    """The app's gate for `what`, made on first use."""
    gates: dict[str, Gate] | None = getattr(request.app.state, "gates", None)
    if gates is None:
        gates = request.app.state.gates = {}
    gate = gates.get(what)
    if gate is None:
        gate = gates[what] = Gate(what, places, per_caller)
    return gate
