"""Who is asking, from where, under which request id: set once per request (or CLI command).

The audit trail and the logs read it from here, so no layer has to thread it through.
"""

from __future__ import annotations

import secrets
import uuid
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    ip: str | None = None
    user_agent: str | None = None


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: a user (id and role) or the system itself (a CLI job, a migration)."""

    id: uuid.UUID | None
    role: str | None


SYSTEM = Actor(None, "system")


def new_request_id() -> str:
    return secrets.token_hex(16)


_current: ContextVar[RequestContext | None] = ContextVar("phivault_request", default=None)
_actor: ContextVar[Actor] = ContextVar("phivault_actor", default=SYSTEM)


def current_request() -> RequestContext:
    """The running request's context; outside any request, a fresh one for the process."""
    ctx = _current.get()
    if ctx is None:
        ctx = RequestContext(request_id=new_request_id())
        _current.set(ctx)
    return ctx


def set_request(ctx: RequestContext) -> object:
    """Enter `ctx`; returns a token for `reset_request`."""
    return _current.set(ctx)


def reset_request(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]


def current_actor() -> Actor:
    """The authenticated caller of this request (the system outside requests)."""
    return _actor.get()


def set_actor(actor: Actor) -> None:
    """Called by the authentication guard once the caller is known."""
    _actor.set(actor)


def reset_actor() -> object:
    """Start a request as the system (no caller yet); returns a token for `restore_actor`."""
    return _actor.set(SYSTEM)


def restore_actor(token: object) -> None:
    _actor.reset(token)  # type: ignore[arg-type]
