"""Key check values: a short tag that shows whether an unwrapped DEK is the right one.

The value is HMAC-SHA256 keyed with the DEK over a fixed label, the key id
and the purpose, truncated to 16 bytes. It reveals nothing useful about the
DEK (unlike a plain hash, it cannot be precomputed for candidate keys
without the key itself), and binding the key id means a DEK moved to
another keyring row fails the check.
"""

from __future__ import annotations

import hmac
import uuid

from ..keys import KeyPurpose

__all__ = ["KEY_CHECK_SIZE", "key_check_matches", "key_check_value"]

KEY_CHECK_SIZE = 16
_LABEL = b"sqlalchemy-encrypted key check v1"


def key_check_value(dek: bytes, key_id: uuid.UUID, purpose: KeyPurpose) -> bytes:
    message = _LABEL + key_id.bytes + purpose.value.encode("ascii")
    return hmac.digest(dek, message, "sha256")[:KEY_CHECK_SIZE]


def key_check_matches(dek: bytes, key_id: uuid.UUID, purpose: KeyPurpose, stored: bytes) -> bool:
    """Compare in constant time against the stored key check value."""
    return hmac.compare_digest(key_check_value(dek, key_id, purpose), stored)
