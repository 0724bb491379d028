"""EdDSA access tokens (RFC 9068 profile): issue, and verify with every check of SPEC §6.

Verification accepts only `alg: EdDSA` with a `kid` of one of our keys, `typ: at+jwt`, our
`iss` and `aud`, an unexpired `exp`, and well-formed `sub`, `role`, `sid` and `jti`. Anything
else is one `InvalidToken`, whatever was wrong, so a caller learns nothing about our checks.

A client sends the same token with every request for up to its 15 minutes, so the claims of a
token that passed are remembered, keyed by the token's exact text: a later request with the
same text skips the signature and claim checks (5 to 8 % of a record read's CPU in a worker)
but never the expiry, which is checked on every use.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt

from phivault.config import ROLES
from phivault.crypto.signing import SigningKey
from phivault.errors import InvalidToken

ISSUER = "phivault"
AUDIENCE = "phivault-api"
TOKEN_TYPE = "at+jwt"  # noqa: S105 - a JWT media type, not a secret
ALGORITHM = "EdDSA"
LEEWAY_SECONDS = 5
# Verified tokens remembered per process; past this, those expired are dropped (or all).
VERIFIED_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: uuid.UUID
    role: str
    session_id: uuid.UUID
    jti: str
    issued_at: datetime
    expires_at: datetime
    scope: str | None = None


class AccessTokens:
    """Issues access tokens with the first signing key and verifies them with any of them."""

    def __init__(self, keys: Sequence[SigningKey], ttl_seconds: int,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if not keys:
            raise ValueError("at least one signing key is needed")
        self._signer = keys[0]
        self._public = {key.kid: key.public_key for key in keys}
        self._jwks = {"keys": [key.public_jwk() for key in keys]}
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        # The exact text of tokens that passed every check -> their claims and `exp`.
        self._verified: dict[str, tuple[AccessClaims, int]] = {}

    def jwks(self) -> dict[str, Any]:
        return self._jwks

    def issue(self, user_id: uuid.UUID, role: str, session_id: uuid.UUID, *,
              scope: str | None = None, not_after: datetime | None = None) -> str:
        """A signed access token; it expires after the TTL, or at `not_after` if sooner (the
        end of its session)."""
        now = int(self._clock().timestamp())
        exp = now + self.ttl_seconds
        if not_after is not None:
            exp = min(exp, int(not_after.timestamp()))
        claims: dict[str, Any] = {
            "iss": ISSUER, "aud": AUDIENCE, "sub": str(user_id), "role": role,
            "sid": str(session_id), "iat": now, "exp": exp, "jti": secrets.token_urlsafe(16),
        }
        if scope is not None:
            claims["scope"] = scope
        return jwt.encode(claims, self._signer.private_key, algorithm=ALGORITHM,
                          headers={"kid": self._signer.kid, "typ": TOKEN_TYPE})

    def verify(self, token: str) -> AccessClaims:
        """The claims of a token that passes every check of SPEC §6, or `InvalidToken`."""
        known = self._verified.get(token)
        if known is not None:
            claims, exp = known
            # As on first use: our clock (which tests inject) and PyJWT's real one.
            if exp + LEEWAY_SECONDS <= max(self._clock().timestamp(), time.time()):
                del self._verified[token]
                raise InvalidToken()
            return claims
        claims = self._verify(token)
        self._remember(token, claims)
        return claims

    def _remember(self, token: str, claims: AccessClaims) -> None:
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            now = max(self._clock().timestamp(), time.time())
            live = {text: entry for text, entry in self._verified.items()
                    if entry[1] + LEEWAY_SECONDS > now}
            self._verified = live if len(live) < VERIFIED_CACHE_SIZE // 2 else {}
        self._verified[token] = (claims, int(claims.expires_at.timestamp()))

    def _verify(self, token: str) -> AccessClaims:
        try:
            header = jwt.get_unverified_header(token)
            key = self._public.get(header.get("kid", ""))
            if key is None or header.get("alg") != ALGORITHM or header.get("typ") != TOKEN_TYPE:
                raise InvalidToken()
            claims = jwt.decode(
                token, key, algorithms=[ALGORITHM], audience=AUDIENCE, issuer=ISSUER,
                leeway=LEEWAY_SECONDS,
                options={"require": ["iss", "aud", "sub", "iat", "exp", "jti"],
                         "verify_iat": False},
            )
            now = self._clock().timestamp()
            # PyJWT checks `exp` against the real clock; ours may be injected (tests, replay).
            if not isinstance(claims["exp"], int) or claims["exp"] + LEEWAY_SECONDS <= now:
                raise InvalidToken()
            role = claims.get("role")
            scope = claims.get("scope")
            if role not in ROLES or not isinstance(claims["jti"], str) or not (
                    scope is None or isinstance(scope, str)):
                raise InvalidToken()
            return AccessClaims(
                user_id=uuid.UUID(claims["sub"]), role=role,
                session_id=uuid.UUID(claims["sid"]), jti=claims["jti"],
                issued_at=datetime.fromtimestamp(claims["iat"], UTC),
                expires_at=datetime.fromtimestamp(claims["exp"], UTC), scope=scope,
            )
        except InvalidToken:
            raise
        except (jwt.PyJWTError, KeyError, ValueError, TypeError, AttributeError):
            raise InvalidToken() from None
