"""Per-tenant DEKs in a keyring table, wrapped by KEKs of a KMS provider."""

from __future__ import annotations

from .cache import CacheStats, TtlCache
from .check import key_check_value
from .keyring import Keyring
from .lifecycle import RETIRE_MARGIN_SECONDS
from .schema import KeyState, keyring_table
from .store import KeyInfo

__all__ = [
    "RETIRE_MARGIN_SECONDS",
    "CacheStats",
    "KeyInfo",
    "KeyState",
    "Keyring",
    "TtlCache",
    "key_check_value",
    "keyring_table",
]
