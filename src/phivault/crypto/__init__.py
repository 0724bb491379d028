"""phivault's cryptography: envelope encryption, blind indexes, streams, signing keys and TLS.

This is the only package that imports `cryptography.hazmat`; everything else calls its recipes.
"""

from phivault.crypto.envelope import IntegrityError
from phivault.crypto.keys import KeyFormatError

__all__ = ["IntegrityError", "KeyFormatError"]
