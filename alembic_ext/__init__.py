"""Alembic operations and autogenerate support for encrypted columns.

Importing this package (in ``env.py``, or in a migration file) registers
on Alembic's ``op``:

* ``op.create_keyring_table()`` / ``op.drop_keyring_table()``;
* ``op.encrypt_column(table, column, type_=Encrypted(...), ...)``;
* ``op.decrypt_column(table, column, type_=String(...), from_type=Encrypted(...), ...)``;
* ``op.reencrypt_column(table, column, type_=Encrypted(...), ...)``.

It also teaches autogenerate about encrypted columns: they render as
importable expressions with their import lines, a column stored as its
encrypted type's storage type is no change, and a plaintext column whose
model becomes encrypted renders as ``op.encrypt_column(...)``.

``docs/migrations.md`` walks through adopting encryption on an existing
table, rolling back, rotation through migrations and the limits.
"""

from __future__ import annotations

from . import toimpl as _toimpl  # noqa: F401  (registers the implementations)
from .compare import compare_type
from .ops import (
    CreateKeyringTableOp,
    DecryptColumnOp,
    DropKeyringTableOp,
    EncryptColumnOp,
    ReencryptColumnOp,
)
from .render import render_item, render_type
from .report import ConversionReport

__all__ = [
    "ConversionReport",
    "CreateKeyringTableOp",
    "DecryptColumnOp",
    "DropKeyringTableOp",
    "EncryptColumnOp",
    "ReencryptColumnOp",
    "compare_type",
    "render_item",
    "render_type",
]
