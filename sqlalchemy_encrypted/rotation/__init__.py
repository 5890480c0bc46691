"""Key rotation: the census of key versions and the re-encryption engine.

``census()`` counts stored values per table, column, tenant and key version
without decrypting them. ``ReencryptionJob`` (or ``reencrypt()``) moves
stale values to their tenant's active key version, resumably and with
several workers on PostgreSQL. ``retire_key_version()`` retires a version
only when the census shows no value still uses it.
"""

from __future__ import annotations

from .census import Census, CensusEntry, ColumnCensus, census
from .checkpoint import DEFAULT_CHECKPOINT_TABLE, Checkpoint, CheckpointStore, checkpoint_table
from .columns import ENCRYPTED_TYPE_INFO_KEY, EncryptedColumn, encrypted_columns
from .job import (
    ReencryptionJob,
    ReencryptionProgress,
    ReencryptionResult,
    RowFailure,
    reencrypt,
)
from .retire import check_key_unused, retire_key_version
from .unique import check_unique_values, install_unique_guard, remove_unique_guard

__all__ = [
    "DEFAULT_CHECKPOINT_TABLE",
    "ENCRYPTED_TYPE_INFO_KEY",
    "Census",
    "CensusEntry",
    "Checkpoint",
    "CheckpointStore",
    "ColumnCensus",
    "EncryptedColumn",
    "ReencryptionJob",
    "ReencryptionProgress",
    "ReencryptionResult",
    "RowFailure",
    "census",
    "check_key_unused",
    "check_unique_values",
    "checkpoint_table",
    "encrypted_columns",
    "install_unique_guard",
    "reencrypt",
    "remove_unique_guard",
    "retire_key_version",
]
