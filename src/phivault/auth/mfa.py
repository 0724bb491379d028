"""TOTP (RFC 6238: 30 s steps, 6 digits, SHA-1 as authenticator apps expect), with one step
of drift and each code accepted once: a login remembers the step it used, and only later steps
are accepted after it."""

from __future__ import annotations

import hmac
import time

import pyotp

ISSUER = "phivault"
STEP_SECONDS = 30
DRIFT_STEPS = 1


def new_secret() -> str:
    return pyotp.random_base32(32)  # 160 bits, RFC 4226's recommended length


def provisioning_uri(secret: str, account: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=account, issuer_name=ISSUER)


def matching_step(secret: str, code: str, *, after_step: int | None,
                  now: float | None = None) -> int | None:
    """The time step `code` belongs to (within one step of now), if it is later than
    `after_step`; None otherwise. Constant-time comparison of every candidate."""
    if len(code) != 6 or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret)
    current = int((time.time() if now is None else now) // STEP_SECONDS)
    found = None
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        if hmac.compare_digest(totp.at(step * STEP_SECONDS), code) and (
                after_step is None or step > after_step):
            found = step
    return found
