"""A session's tokens and when to refresh them, without any I/O, so both clients share it.

An access token lives 15 minutes by default (`PHIVAULT_ACCESS_TOKEN_TTL`, 60 s to an hour); a
refresh token is single-use: each refresh answers a new pair and uses the old refresh token up,
and presenting a used one again revokes the whole session (SPEC §6). So the client must (1)
refresh a little before the access token expires, rather than fail a request on it, and (2)
always keep the newest refresh token, never an older one.

The expiry comes from the login or refresh answer's `expires_in`, counted on this machine's
clock from when the answer arrived: a relative lifetime is immune to the clock difference
between client and server. Tokens restored from storage without it fall back on the access
token's own `exp` claim (read, not verified: it only schedules the refresh; the server is the
one that verifies). A token whose expiry is unknown is treated as expiring now.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from phivault.client.errors import NotSignedIn

Clock = Callable[[], float]
"""Seconds since the Unix epoch; `time.time` unless a test or an app injects another."""

DEFAULT_REFRESH_LEEWAY = 30.0


def jwt_expiry(access_token: str) -> float | None:
    """The `exp` claim of a JWT, unverified; None when the token does not carry one."""
    parts = access_token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except ValueError:
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


@dataclass(frozen=True, slots=True, repr=False)
class Tokens:
    """A session's access and refresh tokens, and when the access token expires (Unix time).

    Persist all three (e.g. from the client's `on_tokens` callback) to resume a session in
    another process; the repr never shows the tokens themselves."""

    access_token: str
    refresh_token: str
    expires_at: float
    lifetime: float

    @classmethod
    def issued(cls, access_token: str, refresh_token: str, expires_in: int,
               clock: Clock = time.time) -> Tokens:
        """Tokens from a login or refresh answer that arrived just now."""
        return cls(access_token, refresh_token, clock() + expires_in, float(expires_in))

    @classmethod
    def restored(cls, access_token: str, refresh_token: str, expires_at: float | None = None,
                 clock: Clock = time.time) -> Tokens:
        """Tokens kept from an earlier session; without `expires_at`, the token's `exp`."""
        expiry = expires_at if expires_at is not None else jwt_expiry(access_token)
        now = clock()
        if expiry is None:
            expiry = now
        return cls(access_token, refresh_token, expiry, max(0.0, expiry - now))

    def expiring(self, now: float, leeway: float = DEFAULT_REFRESH_LEEWAY) -> bool:
        """Whether to refresh before the next request: within `leeway` seconds of the expiry,
        but never more than half the token's lifetime early (a 60-second token would otherwise
        be refreshed before every request)."""
        return now >= self.expires_at - min(leeway, self.lifetime / 2)

    def __repr__(self) -> str:
        return f"Tokens(access_token=***, refresh_token=***, expires_at={self.expires_at:.0f})"


OnTokens = Callable[[Tokens | None], None]
"""Told every new pair (after a login or a refresh), and None when the session is forgotten;
an app that keeps sessions across restarts stores what it is told, the newest pair always."""


class TokenKeeper:
    """A client's current tokens. Both clients change them only under their lock (a thread lock
    or an asyncio lock), so that one refresh happens at a time and nobody sends a refresh token
    that another refresh has just used up."""

    def __init__(self, tokens: Tokens | None, *, on_tokens: OnTokens | None, clock: Clock,
                 leeway: float) -> None:
        self.current = tokens
        self.on_tokens = on_tokens
        self.clock = clock
        self.leeway = leeway

    def require(self) -> Tokens:
        if self.current is None:
            raise NotSignedIn("This route needs a session: log in first (or again, after the "
                              "session ended).")
        return self.current

    def due(self, tokens: Tokens) -> bool:
        """Whether `tokens` should be refreshed before the next request."""
        return tokens.expiring(self.clock(), self.leeway)

    def keep(self, access_token: str, refresh_token: str, expires_in: int) -> Tokens:
        """Store a pair that just arrived, in place of the previous one."""
        tokens = Tokens.issued(access_token, refresh_token, expires_in, self.clock)
        self.current = tokens
        if self.on_tokens is not None:
            self.on_tokens(tokens)
        return tokens

    def forget(self) -> None:
        if self.current is None:
            return
        self.current = None
        if self.on_tokens is not None:
            self.on_tokens(None)


__all__ = ["DEFAULT_REFRESH_LEEWAY", "Clock", "OnTokens", "TokenKeeper", "Tokens", "jwt_expiry"]
