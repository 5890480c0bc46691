"""The keyring table: one row per DEK, with its wrapped form and lifecycle state.

The database itself enforces the two invariants the keyring relies on:

* ``UNIQUE (tenant_id, purpose, key_version)``, so two processes creating a
  tenant's first key, or rotating it, cannot both win;
* at most one ``active`` key per ``(tenant_id, purpose)``: a partial unique
  index ``WHERE state = 'active'`` on PostgreSQL and SQLite. MySQL and
  MariaDB have no partial indexes, so there the table gets a generated
  column ``active_slot`` (1 for the active row, NULL otherwise) and a unique
  index over ``(tenant_id, purpose, active_slot)``. NULLs never collide in a
  unique index, so only active rows are constrained.
"""

from __future__ import annotations

import datetime
import enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from ..keys import KeyPurpose

__all__ = [
    "MYSQL_ACTIVE_SLOT",
    "SEALED_COUNT",
    "ExactString",
    "KeyState",
    "UTCDateTime",
    "keyring_table",
]

# Longest KEK id stored: AWS key ARNs are well under this.
KEK_ID_LENGTH = 2048
TENANT_ID_LENGTH = 255
# The usage counter column. Added after the first release of the table, so
# the keyring reads it only when it counts seals (see Keyring.key_usage_limit).
SEALED_COUNT = "sealed_count"
# The generated column that enforces one active key on MySQL and MariaDB.
MYSQL_ACTIVE_SLOT = "active_slot"
_MYSQL_DIALECTS = ("mysql", "mariadb")


class KeyState(enum.StrEnum):
    """Lifecycle state of a DEK.

    ``pending`` keys decrypt but do not encrypt yet, and ``active`` keys do
    both. ``decrypt_only`` keys are older versions that still decrypt.
    ``retired`` keys no longer decrypt, and ``destroyed`` keys have no
    wrapped DEK left.
    """

    PENDING = "pending"
    ACTIVE = "active"
    DECRYPT_ONLY = "decrypt_only"
    RETIRED = "retired"
    DESTROYED = "destroyed"


class UTCDateTime(sa.types.TypeDecorator[datetime.datetime]):
    """A timestamp stored in UTC and returned timezone-aware on every database.

    SQLite has no time zone support, so values are normalised to UTC before
    they are stored and tagged as UTC when read.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: datetime.datetime | None, dialect: Dialect
    ) -> datetime.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("keyring timestamps must be timezone-aware")
        value = value.astimezone(datetime.UTC)
        return value.replace(tzinfo=None) if dialect.name != "postgresql" else value

    def process_result_value(
        self, value: datetime.datetime | None, dialect: Dialect
    ) -> datetime.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=datetime.UTC)
        return value.astimezone(datetime.UTC)


def _values(enum_type: type[enum.StrEnum]) -> str:
    return ", ".join(f"'{member.value}'" for member in enum_type)


class ExactString(sa.types.TypeDecorator[str]):
    """A string column compared code point for code point on every database.

    MySQL and MariaDB compare VARCHAR values with the column's collation,
    whose defaults ignore case and trailing spaces, so a lookup of tenant
    ``"acme"`` would find the keys of tenant ``"Acme "``. There the column is
    a VARBINARY holding the UTF-8 bytes, which compare exactly.
    """

    impl = sa.String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in _MYSQL_DIALECTS:
            from sqlalchemy.dialects import mysql

            # Up to 4 bytes per code point in UTF-8.
            return dialect.type_descriptor(mysql.VARBINARY(4 * self.length))
        return dialect.type_descriptor(sa.String(self.length))

    def process_bind_param(self, value: str | None, dialect: Dialect) -> Any:
        if value is not None and dialect.name in _MYSQL_DIALECTS:
            return value.encode("utf-8")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value).decode("utf-8")
        return value  # type: ignore[no-any-return]


def keyring_table(
    metadata: sa.MetaData, name: str = "encryption_keys", schema: str | None = None
) -> sa.Table:
    """Define the keyring table in ``metadata`` (idempotent per name and schema)."""
    key = f"{schema}.{name}" if schema else name
    if key in metadata.tables:
        return metadata.tables[key]
    table = sa.Table(
        name,
        metadata,
        sa.Column("key_id", sa.Uuid(), primary_key=True),
        sa.Column("tenant_id", ExactString(TENANT_ID_LENGTH), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        # NULL once the key is destroyed.
        sa.Column("wrapped_dek", sa.LargeBinary(), nullable=True),
        sa.Column("kms_provider", sa.String(32), nullable=False),
        sa.Column("kek_id", sa.String(KEK_ID_LENGTH), nullable=False),
        sa.Column("key_check", sa.LargeBinary(32), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("activated_at", UTCDateTime(), nullable=True),
        sa.Column("retired_at", UTCDateTime(), nullable=True),
        sa.Column("destroyed_at", UTCDateTime(), nullable=True),
        sa.Column("rewrapped_at", UTCDateTime(), nullable=True),
        sa.Column("row_version", sa.Integer(), nullable=False),
        # Values the key may have sealed: seals reserved by processes, never
        # fewer than the seals made. Only randomized keys count.
        sa.Column(SEALED_COUNT, sa.BigInteger(), nullable=False, server_default="0"),
        sa.UniqueConstraint("tenant_id", "purpose", "key_version", name=f"uq_{name}_version"),
        sa.CheckConstraint(f"purpose IN ({_values(KeyPurpose)})", name=f"ck_{name}_purpose"),
        sa.CheckConstraint(f"state IN ({_values(KeyState)})", name=f"ck_{name}_state"),
        sa.CheckConstraint("key_version >= 1", name=f"ck_{name}_version"),
        schema=schema,
    )
    sa.Index(
        f"uq_{name}_one_active",
        table.c.tenant_id,
        table.c.purpose,
        unique=True,
        postgresql_where=table.c.state == KeyState.ACTIVE.value,
        sqlite_where=table.c.state == KeyState.ACTIVE.value,
    ).ddl_if(dialect=("postgresql", "sqlite"))  # type: ignore[arg-type]  # a tuple works at run time
    sa.Index(f"ix_{name}_tenant_state", table.c.tenant_id, table.c.state)
    _add_mysql_active_slot(table, name)
    return table


def _add_mysql_active_slot(table: sa.Table, name: str) -> None:
    qualified = f"{table.schema}.{name}" if table.schema else name
    statement = (
        f"ALTER TABLE {qualified} "
        f"ADD COLUMN {MYSQL_ACTIVE_SLOT} TINYINT AS (CASE WHEN state = '{KeyState.ACTIVE.value}' "
        "THEN 1 END) STORED, "
        f"ADD UNIQUE INDEX uq_{name}_one_active (tenant_id, purpose, {MYSQL_ACTIVE_SLOT})"
    )
    ddl: Any = sa.DDL(statement)  # type: ignore[no-untyped-call]
    sa.event.listen(table, "after_create", ddl.execute_if(dialect=_MYSQL_DIALECTS))
