"""Schema steps of a column conversion: reflect, check, add the shadow column, lock.

The final swap of the converted column into place is in :mod:`alembic_ext.swap`
(PostgreSQL) and :mod:`alembic_ext.swap_sqlite`. The helpers here quote
names and run statements for both.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from sqlalchemy_encrypted.errors import MigrationError
from sqlalchemy_encrypted.statement_errors import database_message

__all__ = [
    "SUPPORTED_DIALECTS",
    "ColumnInfo",
    "TableInfo",
    "add_column",
    "begin_write",
    "check_swappable",
    "conversion_step",
    "database_message",
    "drop_column",
    "lock_for_writes",
    "quote_name",
    "reflect_table",
    "run_step",
    "shadow_column_name",
    "table_sql",
]

SUPPORTED_DIALECTS = ("postgresql", "sqlite")

# PostgreSQL truncates identifiers longer than 63 bytes.
_MAX_IDENTIFIER_LENGTH = 63


@dataclass(frozen=True)
class ColumnInfo:
    """One reflected column."""

    name: str
    type: TypeEngine[Any]
    nullable: bool
    default: str | None
    comment: str | None


@dataclass(frozen=True)
class TableInfo:
    """The reflected columns and primary key of the table being converted."""

    name: str
    schema: str | None
    columns: dict[str, ColumnInfo]
    primary_key: tuple[str, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name

    def column(self, name: str) -> ColumnInfo:
        try:
            return self.columns[name]
        except KeyError:
            raise MigrationError(f"table {self.qualified_name} has no column {name!r}") from None


def reflect_table(conn: Connection, table: str, schema: str | None) -> TableInfo:
    inspector = sa.inspect(conn)
    if not inspector.has_table(table, schema=schema):
        where = f"{schema}.{table}" if schema else table
        raise MigrationError(f"table {where} does not exist")
    columns = {
        entry["name"]: ColumnInfo(
            name=entry["name"],
            type=entry["type"],
            nullable=bool(entry.get("nullable", True)),
            default=entry.get("default"),
            comment=entry.get("comment"),
        )
        for entry in inspector.get_columns(table, schema=schema)
    }
    primary_key = tuple(inspector.get_pk_constraint(table, schema=schema)["constrained_columns"])
    return TableInfo(table, schema, columns, primary_key)


def shadow_column_name(column: str, suffix: str) -> str:
    """Return the name of the temporary column that receives converted values.

    The name is visible in the database while a conversion is unfinished,
    so it names what it is for: ``<column>__encrypting`` or ``<column>__decrypting``.
    """
    name = f"{column}__{suffix}"
    if len(name.encode("utf-8")) <= _MAX_IDENTIFIER_LENGTH:
        return name
    digest = hashlib.sha256(column.encode("utf-8")).hexdigest()[:8]
    return f"{column[:30]}_{digest}__{suffix}"


def table_sql(conn: Connection, table: str, schema: str | None) -> str:
    return conn.dialect.identifier_preparer.format_table(sa.table(table, schema=schema))


def quote_name(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)


def begin_write(conn: Connection, table: str, schema: str | None, column: str) -> None:
    """On SQLite, open a write transaction so that the DDL that follows is atomic.

    An UPDATE that matches no row makes the ``sqlite3`` module emit BEGIN,
    and SQLite takes the database write lock for it. Other dialects need
    nothing here.
    """
    if conn.dialect.name != "sqlite":
        return
    target = table_sql(conn, table, schema)
    quoted = quote_name(conn, column)
    conn.exec_driver_sql(f"UPDATE {target} SET {quoted} = {quoted} WHERE 1 = 0")  # noqa: S608


def lock_for_writes(conn: Connection, table: str, schema: str | None, column: str) -> None:
    """Block concurrent writes to the table until the current transaction ends.

    PostgreSQL: ``SHARE ROW EXCLUSIVE`` lets readers continue and makes
    writers wait. SQLite: the database write lock (see :func:`begin_write`).
    """
    if conn.dialect.name == "postgresql":
        target = table_sql(conn, table, schema)
        conn.exec_driver_sql(f"LOCK TABLE {target} IN SHARE ROW EXCLUSIVE MODE")
    else:
        begin_write(conn, table, schema, column)


def check_swappable(conn: Connection, info: TableInfo, column: str) -> None:
    """Raise before any write if a foreign key uses ``column`` on SQLite.

    A foreign key compares stored values, and the conversion changes every
    stored value of the column, so the key could no longer match. This
    covers the table's own foreign keys on the column and those of other
    tables that refer to it. PostgreSQL rejects both at the swap.
    """
    if conn.dialect.name != "sqlite":
        return
    inspector = sa.inspect(conn)
    lowered = column.lower()
    blockers = [
        f"its FOREIGN KEY ({', '.join(key['constrained_columns'])}) to {key['referred_table']}"
        for key in inspector.get_foreign_keys(info.name, schema=info.schema)
        if lowered in (name.lower() for name in key["constrained_columns"])
    ]
    for other in inspector.get_table_names(schema=info.schema):
        for key in inspector.get_foreign_keys(other, schema=info.schema):
            refers_here = key["referred_table"].lower() == info.name.lower()
            if refers_here and lowered in (name.lower() for name in key["referred_columns"]):
                blockers.append(
                    f"the FOREIGN KEY ({', '.join(key['constrained_columns'])}) of table {other}"
                )
    if blockers:
        raise MigrationError(
            f"cannot convert {info.qualified_name}.{column}: {' and '.join(blockers)} "
            "uses it, and a foreign key cannot match the converted values. Nothing was "
            "written. Drop the foreign key in an earlier migration, then run this one again"
        )


# SQLSTATEs of a lock that could not be taken: lock_not_available (lock_timeout
# or NOWAIT) and deadlock_detected.
_LOCK_SQLSTATES = ("55P03", "40P01")
_READ_ONLY_SQLSTATE = "25006"
_DUPLICATE_COLUMN_SQLSTATE = "42701"
_DEPENDENT_OBJECTS_SQLSTATE = "2BP01"


def _sqlite_error_code(error: sa.exc.DBAPIError) -> int | None:
    """Return the primary SQLite result code of ``error``, such as SQLITE_BUSY."""
    code = getattr(error.orig, "sqlite_errorcode", None)
    # Extended result codes keep the primary code in their low byte.
    return code & 0xFF if isinstance(code, int) else None


def _advice(error: sa.exc.DBAPIError) -> str:
    """Return what the operator should do about ``error`` before running the migration again."""
    sqlstate = getattr(error.orig, "sqlstate", None)
    sqlite_code = _sqlite_error_code(error)
    if sqlstate in _LOCK_SQLSTATES or sqlite_code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return (
            "Another transaction holds a lock that this step needs. Wait until it ends, or "
            "stop the application's writers to the table, then run the migration again. "
            "PostgreSQL's lock_timeout and SQLite's busy timeout set how long a step waits"
        )
    if sqlstate == _READ_ONLY_SQLSTATE or sqlite_code == sqlite3.SQLITE_READONLY:
        return (
            "The database is read-only for this connection: run the migration on one that can write"
        )
    if sqlstate == _DEPENDENT_OBJECTS_SQLSTATE:
        return _dependent_objects_advice(error)
    message = str(error.orig)
    if sqlstate == _DUPLICATE_COLUMN_SQLSTATE or message.startswith("duplicate column name"):
        return (
            "A column of that name exists already: another run of this migration may have "
            "added it at the same time, or, on SQLite, a column whose name differs only in "
            "case. Run the migration again, and if it fails the same way, rename or drop "
            "that column"
        )
    return "Fix the cause and run the migration again"


def _dependent_objects_advice(error: sa.exc.DBAPIError) -> str:
    """Return the advice for PostgreSQL's dependent_objects_still_exist (2BP01)."""
    # This DETAIL lists the dependent objects ("view v depends on column c of
    # table t") and never quotes a stored value, unlike the DETAIL of other errors.
    detail = getattr(getattr(error.orig, "diag", None), "message_detail", None)
    listed = f" ({'; '.join(detail.splitlines())})" if isinstance(detail, str) and detail else ""
    return (
        f"Other objects depend on the column{listed}, and PostgreSQL drops a column only "
        "when nothing depends on it. Drop those objects, such as views, before the "
        "conversion and create them again after the column is swapped. In a migration, "
        "create them again in a later revision, because the swap runs at the end of the "
        "migration. Then run the migration again"
    )


@contextlib.contextmanager
def conversion_step(label: str, step: str, outcome: str) -> Iterator[None]:
    """Raise :class:`MigrationError` for a database error of one schema step of a conversion.

    ``label`` names the table and column, ``step`` completes "could not ...",
    and ``outcome`` is a sentence stating what the failure leaves. The message quotes only the
    database's primary message and SQLSTATE (see :func:`database_message`),
    and the database error is not chained, because its parameters and
    PostgreSQL's DETAIL line can quote stored values.
    """
    try:
        yield
    except sa.exc.DBAPIError as exc:
        raise MigrationError(
            f"{label}: could not {step}: {database_message(exc)}. {outcome}. {_advice(exc)}"
        ) from None


def run_step(
    conn: Connection, info: TableInfo, column: str, step: str, sql: str, outcome: str
) -> None:
    """Execute one statement of the final swap, naming the step if it fails.

    ``outcome`` is the sentence of :func:`conversion_step`.
    """
    if conn.dialect.paramstyle in ("format", "pyformat"):
        # The driver reads "%" as a placeholder, and reflected constraint
        # SQL can hold one (LIKE '%@%').
        sql = sql.replace("%", "%%")
    label = f"{info.qualified_name}.{column}"
    with conversion_step(label, step, outcome):
        conn.exec_driver_sql(sql)


def add_column(
    conn: Connection, table: str, schema: str | None, name: str, type_: TypeEngine[Any]
) -> None:
    type_sql = type_.compile(dialect=conn.dialect)
    target = table_sql(conn, table, schema)
    conn.exec_driver_sql(f"ALTER TABLE {target} ADD COLUMN {quote_name(conn, name)} {type_sql}")


def drop_column(conn: Connection, table: str, schema: str | None, name: str) -> None:
    target = table_sql(conn, table, schema)
    conn.exec_driver_sql(f"ALTER TABLE {target} DROP COLUMN {quote_name(conn, name)}")
