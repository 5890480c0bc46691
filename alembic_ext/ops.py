"""Alembic operations for encrypted columns, registered on ``op`` by importing ``alembic_ext``.

Each class contains the arguments of one operation and its user-facing
classmethod (``op.encrypt_column(...)`` and so on). The implementations are
in :mod:`alembic_ext.toimpl`; the autogenerate renderers in
:mod:`alembic_ext.render`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alembic.operations import MigrateOperation, Operations
from sqlalchemy.types import TypeEngine

from sqlalchemy_encrypted.rotation import ReencryptionResult
from sqlalchemy_encrypted.types import EncryptedType

from .report import ConversionReport

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "CreateKeyringTableOp",
    "DecryptColumnOp",
    "DropKeyringTableOp",
    "EncryptColumnOp",
    "ReencryptColumnOp",
]

DEFAULT_BATCH_SIZE = 1000


class _ColumnConversionOp(MigrateOperation):
    """Arguments shared by the encrypt and decrypt operations."""

    def __init__(
        self,
        table_name: str,
        column_name: str,
        *,
        tenant_column: str | None = None,
        tenant_id: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        primary_key: Sequence[str] | None = None,
        strict: bool = False,
        commit_batches: bool = True,
        schema: str | None = None,
    ) -> None:
        self.table_name = table_name
        self.column_name = column_name
        self.tenant_column = tenant_column
        self.tenant_id = tenant_id
        self.batch_size = batch_size
        self.primary_key = tuple(primary_key) if primary_key is not None else None
        self.strict = strict
        self.commit_batches = commit_batches
        self.schema = schema

    def _shared_kwargs(self) -> dict[str, Any]:
        return {
            "tenant_column": self.tenant_column,
            "tenant_id": self.tenant_id,
            "batch_size": self.batch_size,
            "primary_key": self.primary_key,
            "strict": self.strict,
            "commit_batches": self.commit_batches,
            "schema": self.schema,
        }


@Operations.register_operation("encrypt_column")
class EncryptColumnOp(_ColumnConversionOp):
    """Encrypt the existing values of a plaintext column and change its type."""

    def __init__(
        self,
        table_name: str,
        column_name: str,
        *,
        type_: EncryptedType[Any],
        existing_type: TypeEngine[Any] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(table_name, column_name, **kw)
        self.type_ = type_
        self.existing_type = existing_type

    @classmethod
    def encrypt_column(
        cls,
        operations: Operations,
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
        """Encrypt every value of a plaintext column and give it an encrypted type.

        The values are sealed in batches into a temporary column
        ``<column>__encrypting``. Each one is then checked by decrypting it
        while writes to the table are blocked, and the temporary column
        replaces the original one. During ``alembic upgrade`` or
        ``downgrade`` this final step runs at the end of the migration, for
        all its converted columns together, in the transaction that writes
        the version row. The column keeps its name, NOT NULL,
        comment, indexes and constraints. NULL stays NULL. Values that already are envelopes of
        this column are kept as they are and counted.

        :param table_name: the table.
        :param column_name: the plaintext column.
        :param type_: the new type, ``Encrypted(...)`` or ``DeterministicEncrypted(...)``;
            its ``context=``, if any, is bound into every value.
        :param existing_type: the column's current type, used to read the
            values and rendered into the reverse operation; reflected from the
            database when omitted.
        :param tenant_column: the column naming each row's tenant; every
            value is sealed under that tenant's key.
        :param tenant_id: the one tenant of a single-tenant table. With
            neither tenant option, the tenant of the active ``tenant_scope``
            or the default tenant is used.
        :param batch_size: rows read and written per batch.
        :param primary_key: the columns that identify a row, when the table
            has no primary key constraint.
        :param strict: raise :class:`MixedValuesError` before writing anything
            if some values are already encrypted.
        :param commit_batches: commit each batch on a separate connection,
            so an interrupted run keeps its progress and a large table is not
            converted in one long transaction. This commits the work the
            migration did before this operation. With False, everything runs
            in the migration's transaction with writes blocked throughout.
        :param schema: the table's schema.
        :return: the counts of encrypted, already encrypted and NULL values.
            During a migration it contains the batches' counts until the swap at
            the end of the migration updates it.
        :raises ConversionBatchError: if the database fails a batch.
        """
        operation = cls(
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
        report: ConversionReport = operations.invoke(operation)
        return report

    def reverse(self) -> DecryptColumnOp:
        if self.existing_type is None:
            raise ValueError(
                f"cannot reverse encrypt_column of {self.table_name}.{self.column_name} "
                "without existing_type, the plaintext type to restore"
            )
        return DecryptColumnOp(
            self.table_name,
            self.column_name,
            type_=self.existing_type,
            from_type=self.type_,
            **self._shared_kwargs(),
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("encrypt_column", self.schema, self.table_name, self.column_name)


@Operations.register_operation("decrypt_column")
class DecryptColumnOp(_ColumnConversionOp):
    """Decrypt the values of an encrypted column and change it to a plaintext type."""

    def __init__(
        self,
        table_name: str,
        column_name: str,
        *,
        type_: TypeEngine[Any],
        from_type: EncryptedType[Any],
        **kw: Any,
    ) -> None:
        super().__init__(table_name, column_name, **kw)
        self.type_ = type_
        self.from_type = from_type

    @classmethod
    def decrypt_column(
        cls,
        operations: Operations,
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
        """Decrypt every value of an encrypted column and give it a plaintext type.

        The reverse of :meth:`EncryptColumnOp.encrypt_column`, typically in a
        ``downgrade()``: values are decrypted in batches into a temporary
        column ``<column>__decrypting``, checked, and swapped in. Values that
        are not envelopes (legacy plaintext) are kept and counted; a value
        with an envelope header that does not authenticate stops the
        operation.

        :param type_: the plaintext type the column gets, such as ``sa.String(254)``.
        :param from_type: the column's encrypted type, as the application
            declared it (including ``context=``), needed to open the values.

        The other parameters are those of ``encrypt_column``; ``strict``
        raises before writing if some values are already plaintext.
        """
        operation = cls(
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
        report: ConversionReport = operations.invoke(operation)
        return report

    def reverse(self) -> EncryptColumnOp:
        return EncryptColumnOp(
            self.table_name,
            self.column_name,
            type_=self.from_type,
            existing_type=self.type_,
            **self._shared_kwargs(),
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("decrypt_column", self.schema, self.table_name, self.column_name)


@Operations.register_operation("reencrypt_column")
class ReencryptColumnOp(MigrateOperation):
    """Move the values of an encrypted column to their tenants' active key versions."""

    def __init__(
        self,
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
    ) -> None:
        self.table_name = table_name
        self.column_name = column_name
        self.type_ = type_
        self.tenant_column = tenant_column
        self.tenants = tuple(tenants) if tenants is not None else None
        self.versions = tuple(versions) if versions is not None else None
        self.batch_size = batch_size
        self.primary_key = tuple(primary_key) if primary_key is not None else None
        self.commit_batches = commit_batches
        self.schema = schema

    @classmethod
    def reencrypt_column(
        cls,
        operations: Operations,
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
        """Re-encrypt the column's values that are under an older key version.

        Runs the same re-encryption job as the command line and the
        ``sqlalchemy_encrypted.rotation`` API. A census finds the stale
        values, and each is decrypted and sealed again under its tenant's
        active DEK with a compare-and-swap write, so a concurrent application
        write wins. A final census must find none left, else
        :class:`ReencryptionError` is raised. Running it again after an
        interruption continues with what is still stale.

        :param type_: the column's encrypted type, as the application declares it.
        :param tenant_column: the column naming each row's tenant, so the
            census can check that each value is sealed under its row's tenant.
        :param tenants: only re-encrypt the values of these tenants.
        :param versions: only re-encrypt values under these key versions.
        :param batch_size: rows per batch.
        :param primary_key: the columns that identify a row, when the table
            has no primary key constraint.
        :param commit_batches: commit each batch on a separate connection
            (this commits the migration's earlier work first); with False the
            job runs in savepoints of the migration's transaction.
        :param schema: the table's schema.
        :return: the job's result, with the census before and after.
        """
        operation = cls(
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
        result: ReencryptionResult = operations.invoke(operation)
        return result


@Operations.register_operation("create_keyring_table")
class CreateKeyringTableOp(MigrateOperation):
    """Create the keyring table, which stores the wrapped DEKs."""

    def __init__(self, table_name: str = "encryption_keys", *, schema: str | None = None) -> None:
        self.table_name = table_name
        self.schema = schema

    @classmethod
    def create_keyring_table(
        cls,
        operations: Operations,
        table_name: str = "encryption_keys",
        *,
        schema: str | None = None,
    ) -> None:
        """Create the keyring table, with the definition :class:`Keyring` uses.

        Pure DDL: it needs no key and also works in offline (``--sql``) mode.
        Pass the ``table_name`` and ``schema`` the application's ``Keyring``
        is configured with.
        """
        operations.invoke(cls(table_name, schema=schema))

    def reverse(self) -> DropKeyringTableOp:
        return DropKeyringTableOp(self.table_name, schema=self.schema)


@Operations.register_operation("drop_keyring_table")
class DropKeyringTableOp(MigrateOperation):
    """Drop the keyring table, and with it every DEK: all encrypted data becomes unreadable."""

    def __init__(self, table_name: str = "encryption_keys", *, schema: str | None = None) -> None:
        self.table_name = table_name
        self.schema = schema

    @classmethod
    def drop_keyring_table(
        cls,
        operations: Operations,
        table_name: str = "encryption_keys",
        *,
        schema: str | None = None,
    ) -> None:
        """Drop the keyring table.

        Every wrapped DEK is deleted with it, so values sealed under those
        keys can never be decrypted again (unless a backup of the table is
        kept). Use it in the ``downgrade()`` of the migration that created the
        table, after every encrypted column was decrypted or dropped.
        """
        operations.invoke(cls(table_name, schema=schema))

    def reverse(self) -> CreateKeyringTableOp:
        return CreateKeyringTableOp(self.table_name, schema=self.schema)
