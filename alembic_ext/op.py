"""A typed ``op`` for migration files: Alembic's operations plus this package's.

Alembic attaches operations registered by extensions to ``alembic.op`` at
run time, so editors and type checkers do not know ``op.encrypt_column``.
Import this module in their place to get completion and checking::

    from alembic_ext import op

    def upgrade() -> None:
        op.add_column("persons", sa.Column("ssn", Encrypted(sa.String(11))))
        op.encrypt_column("persons", "name", type_=Encrypted(sa.String(100)))

Every other name (``op.add_column``, ``op.execute``, ...) is Alembic's own,
forwarded at run time and typed by Alembic's stub.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic import op as _alembic_op
from sqlalchemy.types import TypeEngine

from sqlalchemy_encrypted.keyring.schema import SEALED_COUNT
from sqlalchemy_encrypted.rotation import ReencryptionResult
from sqlalchemy_encrypted.types import EncryptedType

from . import toimpl as _toimpl  # noqa: F401  (registers the operations)
from .ops import DEFAULT_BATCH_SIZE
from .report import ConversionReport

if TYPE_CHECKING:
    from alembic.op import *  # noqa: F403


def _operations() -> Any:
    # alembic.op forwards to the Operations of the running migration. Its
    # stub lists Alembic's own operations only, hence the Any.
    return _alembic_op


def encrypt_column(
    table_name: str,
    column_name: str,
    *,
    type_: EncryptedType[Any],
    existing_type: TypeEngine[Any] | None = None,
    tenant_column: str | None = None,
    tenant_id: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    primary_key: Sequence[str] | None = None,
    strict: bool = False,
    commit_batches: bool = True,
    schema: str | None = None,
) -> ConversionReport:
    """Encrypt every value of a plaintext column; see :meth:`EncryptColumnOp.encrypt_column`."""
    report: ConversionReport = _operations().encrypt_column(
        table_name,
        column_name,
        type_=type_,
        existing_type=existing_type,
        tenant_column=tenant_column,
        tenant_id=tenant_id,
        batch_size=batch_size,
        primary_key=primary_key,
        strict=strict,
        commit_batches=commit_batches,
        schema=schema,
    )
    return report


def decrypt_column(
    table_name: str,
    column_name: str,
    *,
    type_: TypeEngine[Any],
    from_type: EncryptedType[Any],
    tenant_column: str | None = None,
    tenant_id: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    primary_key: Sequence[str] | None = None,
    strict: bool = False,
    commit_batches: bool = True,
    schema: str | None = None,
) -> ConversionReport:
    """Decrypt every value of an encrypted column; see :meth:`DecryptColumnOp.decrypt_column`."""
    report: ConversionReport = _operations().decrypt_column(
        table_name,
        column_name,
        type_=type_,
        from_type=from_type,
        tenant_column=tenant_column,
        tenant_id=tenant_id,
        batch_size=batch_size,
        primary_key=primary_key,
        strict=strict,
        commit_batches=commit_batches,
        schema=schema,
    )
    return report


def reencrypt_column(
    table_name: str,
    column_name: str,
    *,
    type_: EncryptedType[Any],
    tenant_column: str | None = None,
    tenants: Sequence[str] | None = None,
    versions: Sequence[int] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    primary_key: Sequence[str] | None = None,
    commit_batches: bool = True,
    schema: str | None = None,
) -> ReencryptionResult:
    """Re-encrypt stale values; see :meth:`ReencryptColumnOp.reencrypt_column`."""
    result: ReencryptionResult = _operations().reencrypt_column(
        table_name,
        column_name,
        type_=type_,
        tenant_column=tenant_column,
        tenants=tenants,
        versions=versions,
        batch_size=batch_size,
        primary_key=primary_key,
        commit_batches=commit_batches,
        schema=schema,
    )
    return result


def create_keyring_table(table_name: str = "encryption_keys", *, schema: str | None = None) -> None:
    """Create the keyring table; see :meth:`CreateKeyringTableOp.create_keyring_table`."""
    _operations().create_keyring_table(table_name, schema=schema)


def add_keyring_usage_column(
    table_name: str = "encryption_keys", *, schema: str | None = None
) -> None:
    """Add the ``sealed_count`` column to a keyring table made by version 0.1.0.

    The keyring counts the values each randomized DEK seals in that column
    (``Keyring(key_usage_limit=...)``). Existing keys start at 0.
    """
    _operations().add_column(
        table_name,
        sa.Column(SEALED_COUNT, sa.BigInteger(), nullable=False, server_default="0"),
        schema=schema,
    )


def drop_keyring_table(table_name: str = "encryption_keys", *, schema: str | None = None) -> None:
    """Drop the keyring table; see :meth:`DropKeyringTableOp.drop_keyring_table`."""
    _operations().drop_keyring_table(table_name, schema=schema)


if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        return getattr(_alembic_op, name)
