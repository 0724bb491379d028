"""The public key that verifies audit checkpoints (SPEC §8), published for anyone to check a
checkpoint's origin."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from phivault.access.guards import Public
from phivault.web.dependencies import RuntimeDep

router = APIRouter(tags=["audit"])


@router.get("/.well-known/audit-key.json", dependencies=[Depends(Public())],
            summary="Public keys that verify audit checkpoints")
async def audit_key(runtime: RuntimeDep) -> dict[str, Any]:
    """The Ed25519 public keys of PHIVAULT_AUDIT_SIGNING_KEY as a JWK Set (RFC 7517, RFC 8037);
    a checkpoint's `key_id` is a key's `kid`. Empty when no key is configured. Public."""
    return runtime.settings.checkpoint_signer.jwks()
