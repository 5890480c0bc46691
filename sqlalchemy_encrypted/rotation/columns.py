"""Descriptions of the columns that store envelopes, and raw access to their bytes.

The census and the re-encryption engine work on :class:`EncryptedColumn`
descriptions built from SQLAlchemy tables. Columns declared with
:class:`~sqlalchemy_encrypted.Encrypted` or
:class:`~sqlalchemy_encrypted.DeterministicEncrypted` are found by their
type. A column that stores envelopes but is mapped as plain bytes or text (for
example one filled through :meth:`EncryptedType.seal`) is registered in its
``Column.info``::

    sa.Column("blob", sa.LargeBinary, info={
        "encrypted_type": Encrypted(sa.String(), context="notes.blob"),
    })

The type in ``info`` must name the ``context=`` its values were sealed with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase

from ..errors import ConfigurationError
from ..keys import KeyPurpose
from ..row_tenant import tenant_column_of
from ..types import EncryptedType

__all__ = [
    "ENCRYPTED_TYPE_INFO_KEY",
    "EncryptedColumn",
    "Target",
    "declared_encrypted_type",
    "encrypted_columns",
    "resolve_columns",
]

ENCRYPTED_TYPE_INFO_KEY = "encrypted_type"

# Anything a caller may pass to name the columns to work on.
Target: TypeAlias = sa.MetaData | sa.Table | type[DeclarativeBase] | Iterable[sa.Table]


@dataclass(frozen=True)
class EncryptedColumn:
    """One column that stores envelopes, with what the engine needs to
    read and rewrite its raw bytes without going through the column type."""

    table: sa.Table
    name: str
    column_type: EncryptedType[Any]

    @classmethod
    def of(
        cls, table: sa.Table, name: str, column_type: EncryptedType[Any] | None = None
    ) -> EncryptedColumn:
        """Describe ``table.c[name]``, taking its encrypted type from the column
        itself, from ``Column.info["encrypted_type"]``, or from ``column_type``."""
        if name not in table.c:
            raise ConfigurationError(f"table {table.name} has no column {name!r}")
        column = table.c[name]
        found = column_type or declared_encrypted_type(column)
        if found is None:
            raise ConfigurationError(
                f"column {table.name}.{name} is not an encrypted column: declare it with "
                f"Encrypted or DeterministicEncrypted, or set info={{'{ENCRYPTED_TYPE_INFO_KEY}'"
                ": Encrypted(..., context=...)}} on a column that stores envelopes"
            )
        if not table.primary_key.columns:
            raise ConfigurationError(
                f"table {table.name} has no primary key: re-encryption pages through rows by "
                "primary key and writes each row back by it"
            )
        if found.context is None and found.column_identity == "<unattached column>":
            raise ConfigurationError(
                f"column {table.name}.{name}: the type in info['{ENCRYPTED_TYPE_INFO_KEY}'] "
                "needs context= naming the identity its values were sealed with"
            )
        return cls(table=table, name=name, column_type=found)

    # -- identity -----------------------------------------------------------

    @property
    def qualified_table(self) -> str:
        """The table name, prefixed by its schema when it has one."""
        if self.table.schema:
            return f"{self.table.schema}.{self.table.name}"
        return self.table.name

    @property
    def label(self) -> str:
        """``table.column``, as census reports and error messages name it."""
        return f"{self.qualified_table}.{self.name}"

    @property
    def purpose(self) -> KeyPurpose:
        return self.column_type.purpose

    @property
    def is_base64(self) -> bool:
        return self.column_type.storage == "base64"

    @property
    def tenant_column(self) -> str | None:
        """The name of the table's tenant column (``Table.info``), or None."""
        return tenant_column_of(self.table)

    # -- raw access -----------------------------------------------------------

    @property
    def primary_key(self) -> list[sa.Column[Any]]:
        return list(self.table.primary_key.columns)

    def raw_table(self, extra: Sequence[str] = ()) -> sa.TableClause:
        """A lightweight table whose encrypted columns are plain bytes (or text).

        Statements on it bypass the column types, so values are read and
        written exactly as stored, and the tenant hooks and query checks of
        this library leave them alone.
        """
        return raw_table(self.table, [self.name, *extra])


def raw_table(table: sa.Table, names: Iterable[str]) -> sa.TableClause:
    """Return ``table`` as a TableClause with its primary key, tenant column and
    ``names``, the encrypted ones typed as their storage type."""
    wanted: list[str] = [column.name for column in table.primary_key.columns]
    tenant = tenant_column_of(table)
    if tenant is not None:
        wanted.append(tenant)
    wanted.extend(names)
    columns = []
    seen: set[str] = set()
    for name in wanted:
        if name in seen:
            continue
        seen.add(name)
        source = table.c[name]
        columns.append(sa.column(name, _storage_type(source)))
    return sa.table(table.name, *columns, schema=table.schema)


def _storage_type(column: sa.Column[Any]) -> sa.types.TypeEngine[Any]:
    column_type = column.type
    if isinstance(column_type, EncryptedType):
        return sa.Text() if column_type.storage == "base64" else sa.LargeBinary()
    declared = column.info.get(ENCRYPTED_TYPE_INFO_KEY) if column.info else None
    if isinstance(declared, EncryptedType):
        return sa.Text() if declared.storage == "base64" else sa.LargeBinary()
    return column_type


def declared_encrypted_type(column: sa.Column[Any]) -> EncryptedType[Any] | None:
    if isinstance(column.type, EncryptedType):
        return column.type
    declared = column.info.get(ENCRYPTED_TYPE_INFO_KEY) if column.info else None
    if declared is None:
        return None
    if not isinstance(declared, EncryptedType):
        raise ConfigurationError(
            f"column {column.table.name}.{column.name}: info['{ENCRYPTED_TYPE_INFO_KEY}'] "
            f"must be an Encrypted or DeterministicEncrypted instance, got "
            f"{type(declared).__name__}"
        )
    return declared


def _tables(target: Target) -> list[sa.Table]:
    if isinstance(target, sa.MetaData):
        return list(target.sorted_tables)
    if isinstance(target, sa.Table):
        return [target]
    if isinstance(target, type):
        metadata = getattr(target, "metadata", None)
        if not isinstance(metadata, sa.MetaData):
            raise ConfigurationError(f"{target.__name__} is not a declarative base")
        return list(metadata.sorted_tables)
    tables = list(target)
    for table in tables:
        if not isinstance(table, sa.Table):
            raise ConfigurationError(
                f"expected MetaData, a Table, a declarative base or Tables, got "
                f"{type(table).__name__}"
            )
    return tables


def encrypted_columns(target: Target) -> list[EncryptedColumn]:
    """List every encrypted column of ``target``, in table dependency order."""
    found = []
    for table in _tables(target):
        for column in table.columns:
            if declared_encrypted_type(column) is not None:
                found.append(EncryptedColumn.of(table, column.name))
    return found


def resolve_columns(
    target: Target,
    tables: Iterable[str] | None = None,
    columns: Iterable[str] | None = None,
) -> list[EncryptedColumn]:
    """Select encrypted columns of ``target`` by table name and column name.

    Table names may carry their schema (``billing.invoices``); column names
    may be bare (``email``) or qualified (``persons.email``). Raises
    :class:`ConfigurationError` for a name that matches nothing.
    """
    found = encrypted_columns(target)
    if tables is not None:
        wanted_tables = set(tables)
        known = {c.qualified_table for c in found} | {c.table.name for c in found}
        unknown = sorted(wanted_tables - known)
        if unknown:
            raise ConfigurationError(
                f"no encrypted columns in table(s) {', '.join(unknown)}; known tables: "
                f"{', '.join(sorted({c.qualified_table for c in found})) or 'none'}"
            )
        found = [
            c for c in found if c.qualified_table in wanted_tables or c.table.name in wanted_tables
        ]
    if columns is not None:
        wanted_columns = set(columns)
        matched = [
            c
            for c in found
            if c.name in wanted_columns
            or c.label in wanted_columns
            or f"{c.table.name}.{c.name}" in wanted_columns
        ]
        named = {c.name for c in matched} | {c.label for c in matched}
        named |= {f"{c.table.name}.{c.name}" for c in matched}
        unknown = sorted(wanted_columns - named)
        if unknown:
            raise ConfigurationError(f"no encrypted column named {', '.join(unknown)}")
        found = matched
    return found
