"""Schema steps of a column conversion: reflect, add the shadow column, lock, swap.

The swap drops the source column and renames the shadow column into its
place, inside the caller's transaction, then restores NOT NULL, the column
comment and every index and constraint the drop removed.

PostgreSQL: ``DROP COLUMN`` removes the indexes and constraints that use
the column. Their exact definitions (``pg_get_indexdef``,
``pg_get_constraintdef``) are read first and executed again after the
rename, so the new column gets the same names and options.

SQLite (3.35 or newer): the native ``DROP COLUMN`` and ``RENAME COLUMN``
keep the rest of the table definition as written. Indexes are dropped
first and recreated from their stored SQL. Alembic's batch mode recreates
the table from reflection and drops unnamed constraints, so it is used
only to restore NOT NULL, and a check afterwards raises if that lost an
index or constraint. A write transaction is opened before any DDL, because
the ``sqlite3`` module commits DDL at once when no transaction is open.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from sqlalchemy_encrypted.errors import MigrationError

__all__ = [
    "SUPPORTED_DIALECTS",
    "ColumnInfo",
    "TableInfo",
    "add_column",
    "begin_write",
    "check_swappable",
    "drop_column",
    "lock_for_writes",
    "reflect_table",
    "shadow_column_name",
    "swap_columns",
]

logger = logging.getLogger("sqlalchemy_encrypted.alembic")

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


def _table_sql(conn: Connection, table: str, schema: str | None) -> str:
    return conn.dialect.identifier_preparer.format_table(sa.table(table, schema=schema))


def _quote(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)


def begin_write(conn: Connection, table: str, schema: str | None, column: str) -> None:
    """On SQLite, open a write transaction so that the DDL that follows is atomic.

    An UPDATE that matches no row makes the ``sqlite3`` module emit BEGIN,
    and SQLite takes the database write lock for it. Other dialects need
    nothing here.
    """
    if conn.dialect.name != "sqlite":
        return
    target = _table_sql(conn, table, schema)
    quoted = _quote(conn, column)
    conn.exec_driver_sql(f"UPDATE {target} SET {quoted} = {quoted} WHERE 1 = 0")  # noqa: S608


def lock_for_writes(conn: Connection, table: str, schema: str | None, column: str) -> None:
    """Block concurrent writes to the table until the current transaction ends.

    PostgreSQL: ``SHARE ROW EXCLUSIVE`` lets readers continue and makes
    writers wait. SQLite: the database write lock (see :func:`begin_write`).
    """
    if conn.dialect.name == "postgresql":
        target = _table_sql(conn, table, schema)
        conn.exec_driver_sql(f"LOCK TABLE {target} IN SHARE ROW EXCLUSIVE MODE")
    else:
        begin_write(conn, table, schema, column)


def check_swappable(conn: Connection, info: TableInfo, column: str) -> None:
    """Raise before any write if SQLite could not drop ``column`` at the swap.

    SQLite refuses ``DROP COLUMN`` for a column that a table-level UNIQUE
    constraint or a foreign key uses. Recreating the table instead would
    need the constraint rebuilt on the renamed column, which the swap does
    not do.
    """
    if conn.dialect.name != "sqlite":
        return
    inspector = sa.inspect(conn)
    blockers = [
        f"UNIQUE constraint {unique.get('name') or '(unnamed)'} "
        f"({', '.join(unique['column_names'])})"
        for unique in inspector.get_unique_constraints(info.name, schema=info.schema)
        if column in unique["column_names"]
    ]
    blockers += [
        f"FOREIGN KEY ({', '.join(key['constrained_columns'])}) to {key['referred_table']}"
        for key in inspector.get_foreign_keys(info.name, schema=info.schema)
        if column in key["constrained_columns"]
    ]
    if blockers:
        raise MigrationError(
            f"cannot convert {info.qualified_name}.{column} on SQLite: the table-level "
            f"{' and '.join(blockers)} uses it, and SQLite cannot drop such a column to swap "
            "in its converted copy. Nothing was written. Replace a UNIQUE constraint with a "
            "unique index (op.create_index(..., unique=True)) in an earlier migration, "
            "recreating the table with op.batch_alter_table(), then run this one again"
        )


def add_column(
    conn: Connection, table: str, schema: str | None, name: str, type_: TypeEngine[Any]
) -> None:
    type_sql = type_.compile(dialect=conn.dialect)
    target = _table_sql(conn, table, schema)
    conn.exec_driver_sql(f"ALTER TABLE {target} ADD COLUMN {_quote(conn, name)} {type_sql}")


def drop_column(conn: Connection, table: str, schema: str | None, name: str) -> None:
    target = _table_sql(conn, table, schema)
    conn.exec_driver_sql(f"ALTER TABLE {target} DROP COLUMN {_quote(conn, name)}")


def swap_columns(
    conn: Connection, info: TableInfo, source: ColumnInfo, shadow: str, type_: TypeEngine[Any]
) -> None:
    """Replace ``source`` by the ``shadow`` column, keeping the source's name,
    NOT NULL, comment, indexes and constraints.

    Runs inside the caller's transaction: on failure nothing is changed once
    the caller rolls back, and the error names the step that failed.
    """
    if source.default is not None:
        logger.warning(
            "the server default of %s.%s is not carried over to the converted column",
            info.qualified_name,
            source.name,
        )
    if conn.dialect.name == "postgresql":
        _swap_postgresql(conn, info, source, shadow)
    else:
        _swap_sqlite(conn, info, source, shadow, type_)


def _run_step(conn: Connection, info: TableInfo, column: str, step: str, sql: str) -> None:
    try:
        conn.exec_driver_sql(sql)
    except sa.exc.DBAPIError as exc:
        raise MigrationError(
            f"could not {step} while converting {info.qualified_name}.{column}: "
            f"{exc.orig}. The converted values are kept in a temporary column, so "
            "fix the cause and run the migration again"
        ) from exc


def _swap_postgresql(conn: Connection, info: TableInfo, source: ColumnInfo, shadow: str) -> None:
    target = _table_sql(conn, info.name, info.schema)
    column = _quote(conn, source.name)

    def indexes() -> dict[str, str]:
        rows = conn.execute(
            sa.text(
                "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = CAST(:t AS regclass) "
                "AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)"
            ),
            {"t": target},
        )
        return {name: definition for name, definition in rows}

    def constraints() -> dict[str, str]:
        # contype 'n' is a NOT NULL constraint (PostgreSQL 18), restored separately.
        rows = conn.execute(
            sa.text(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = CAST(:t AS regclass) AND contype <> 'n'"
            ),
            {"t": target},
        )
        return {name: definition for name, definition in rows}

    indexes_before = indexes()
    constraints_before = constraints()

    _run_step(
        conn,
        info,
        source.name,
        "drop the source column",
        f"ALTER TABLE {target} DROP COLUMN {column}",
    )
    _run_step(
        conn,
        info,
        source.name,
        "rename the converted column",
        f"ALTER TABLE {target} RENAME COLUMN {_quote(conn, shadow)} TO {column}",
    )

    lost_constraints = {
        name: sql for name, sql in constraints_before.items() if name not in constraints()
    }
    for name, definition in lost_constraints.items():
        _run_step(
            conn,
            info,
            source.name,
            f"recreate constraint {name}",
            f"ALTER TABLE {target} ADD CONSTRAINT {_quote(conn, name)} {definition}",
        )
    remaining = indexes()
    for name, definition in indexes_before.items():
        if name not in remaining:
            _run_step(conn, info, source.name, f"recreate index {name}", definition)

    if not source.nullable:
        _run_step(
            conn,
            info,
            source.name,
            "restore NOT NULL",
            f"ALTER TABLE {target} ALTER COLUMN {column} SET NOT NULL",
        )
    if source.comment is not None:
        commented: sa.Column[Any] = sa.Column(source.name, comment=source.comment)
        sa.Table(info.name, sa.MetaData(), commented, schema=info.schema)
        conn.execute(sa.schema.SetColumnComment(commented))


def _sqlite_master(conn: Connection, schema: str | None) -> str:
    return f"{_quote(conn, schema)}.sqlite_master" if schema else "sqlite_master"


def _sqlite_fingerprint(conn: Connection, table: str, schema: str | None) -> set[tuple[Any, ...]]:
    """Return the indexes, unique constraints, checks and foreign keys of a table,
    described by content rather than by name (SQLite renames automatic indexes)."""
    prefix = f"{_quote(conn, schema)}." if schema else ""
    quoted = _quote(conn, table)
    found: set[tuple[Any, ...]] = set()
    for row in conn.exec_driver_sql(f"PRAGMA {prefix}index_list({quoted})").all():
        name, unique, origin, partial = row[1], row[2], row[3], row[4]
        info = conn.exec_driver_sql(f"PRAGMA {prefix}index_info({_quote(conn, name)})").all()
        found.add(("index", unique, origin, partial, tuple(entry[2] for entry in info)))
    for row in conn.exec_driver_sql(f"PRAGMA {prefix}foreign_key_list({quoted})").all():
        found.add(("foreign key", row[2], row[3], row[4]))
    for check in sa.inspect(conn).get_check_constraints(table, schema=schema):
        found.add(("check", check["sqltext"]))
    return found


def _swap_sqlite(
    conn: Connection,
    info: TableInfo,
    source: ColumnInfo,
    shadow: str,
    type_: TypeEngine[Any],
) -> None:
    target = _table_sql(conn, info.name, info.schema)
    column = _quote(conn, source.name)
    begin_write(conn, info.name, info.schema, source.name)
    fingerprint = _sqlite_fingerprint(conn, info.name, info.schema)

    # SQLite refuses to drop an indexed column, so every explicit index of
    # the table is dropped and recreated from its stored SQL.
    indexes = conn.execute(
        sa.text(
            f"SELECT name, sql FROM {_sqlite_master(conn, info.schema)} "  # noqa: S608
            "WHERE type = 'index' AND tbl_name = :t AND sql IS NOT NULL"
        ),
        {"t": info.name},
    ).all()
    prefix = f"{_quote(conn, info.schema)}." if info.schema else ""
    for name, _ in indexes:
        conn.exec_driver_sql(f"DROP INDEX {prefix}{_quote(conn, name)}")

    _run_step(
        conn,
        info,
        source.name,
        "drop the source column",
        f"ALTER TABLE {target} DROP COLUMN {column}",
    )
    _run_step(
        conn,
        info,
        source.name,
        "rename the converted column",
        f"ALTER TABLE {target} RENAME COLUMN {_quote(conn, shadow)} TO {column}",
    )
    for name, sql in indexes:
        _run_step(conn, info, source.name, f"recreate index {name}", sql)

    if not source.nullable:
        operations = Operations(MigrationContext.configure(connection=conn))
        with operations.batch_alter_table(
            info.name, schema=info.schema, recreate="always"
        ) as batch:
            batch.alter_column(source.name, existing_type=type_, nullable=False)
        if _sqlite_fingerprint(conn, info.name, info.schema) != fingerprint:
            raise MigrationError(
                f"could not restore NOT NULL on {info.qualified_name}.{source.name}: SQLite "
                "needs the table recreated for that, and recreating it would lose an unnamed "
                "constraint. Name the table's UNIQUE and CHECK constraints (or make the "
                "column nullable) and run the migration again"
            )
