"""Public key publication. (Login, refresh, sessions and TOTP routes join this router.)"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from phivault.access.guards import Public
from phivault.web.dependencies import RuntimeDep

well_known = APIRouter(tags=["auth"])


@well_known.get("/.well-known/jwks.json", dependencies=[Depends(Public())],
                summary="Public keys that verify access tokens")
async def jwks(runtime: RuntimeDep) -> dict[str, Any]:
    """The Ed25519 public keys (JWK Set, RFC 7517) of every configured signing key. Public."""
    return runtime.access_tokens.jwks()
