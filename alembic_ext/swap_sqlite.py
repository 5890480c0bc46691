"""The final swap of a column conversion on SQLite.

SQLite 3.35 and newer have ``ALTER TABLE ... DROP COLUMN``, but SQLite
refuses to drop a column that a UNIQUE constraint, a table-level CHECK
constraint, a generated column, a trigger or a view uses. It drops a
column-level CHECK constraint together with the column, and it cannot add
NOT NULL to an existing column. So the swap takes one of two ways, both
inside the caller's transaction:

Drop and rename
    For a nullable column, inside a savepoint: drop the table's explicit
    indexes, drop the source column, rename the shadow column into its
    place and recreate the indexes from their stored SQL. The column gets
    the shadow column's declared type (BLOB when encrypting) and moves to
    the end of the table. If SQLite refuses a step, or the table's indexes
    and constraints differ afterwards, the savepoint is rolled back and the
    values are written back in place instead.
Write back in place
    Copy the converted values from the shadow column into the source column
    with one UPDATE, then drop the shadow column. The table definition is
    not rewritten: constraints, indexes, NOT NULL, the server default, the
    column's position and its declared type stay as written, and the UPDATE
    enforces the UNIQUE and CHECK constraints on the converted values.
    SQLite stores a BLOB unchanged in a column of any declared type (but not
    in a STRICT table), and a check afterwards compares every copied value
    with its shadow value. The table's triggers are dropped around the
    UPDATE and recreated from their stored SQL, so the swap fires none of
    them, as on PostgreSQL.

SQLite's other way to change a column's type is to recreate the table and
copy the rows, and it is not used here. While foreign keys are enforced,
``DROP TABLE`` on the original table runs the ``ON DELETE`` actions of the
tables that refer to it, so ``CASCADE`` deletes their rows. ``PRAGMA
foreign_keys`` cannot prevent that, because it has no effect inside the
migration's transaction.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from sqlalchemy_encrypted.envelope import FORMAT_VERSION, HEADER_SIZE
from sqlalchemy_encrypted.errors import MigrationError

from .ddl import ColumnInfo, TableInfo, quote_name, run_step, table_sql

__all__ = ["holds_only_envelopes", "swap_sqlite"]

logger = logging.getLogger("sqlalchemy_encrypted.alembic")

_SAVEPOINT = "sqlalchemy_encrypted_swap"

# The stored SQL of an index or trigger starts with one of these, followed
# by the object's name: SQLite removes a schema name and IF NOT EXISTS when
# it stores the statement.
_CREATE_PREFIXES = ("CREATE INDEX ", "CREATE UNIQUE INDEX ", "CREATE TRIGGER ")


def swap_sqlite(
    conn: Connection, info: TableInfo, source: ColumnInfo, shadow: str, outcome: str
) -> bool:
    """Replace ``source`` by the ``shadow`` column; see the module docstring.

    The caller has opened the write transaction. ``outcome`` is the sentence
    that ends an error and states what the failure leaves. Returns True if the
    values were written back in place, so the column kept its declared type.
    """
    fingerprint = _sqlite_fingerprint(conn, info.name, info.schema)
    if source.nullable:
        reason = _drop_and_rename(conn, info, source, shadow, fingerprint)
        if reason is None:
            return False
    else:
        reason = "SQLite cannot add NOT NULL to an existing column"
    logger.info(
        "%s.%s: %s, so the converted values are written back into the column, "
        "which keeps its declared type %s",
        info.qualified_name,
        source.name,
        reason,
        source.type,
    )
    _write_back(conn, info, source, shadow, fingerprint, outcome)
    return True


def holds_only_envelopes(conn: Connection, table: str, schema: str | None, column: str) -> bool:
    """Return True if the column has a value and every value that is not NULL
    is a BLOB that starts like an envelope.

    A column whose converted values were written back in place keeps its
    text or numeric declared type, so only its values tell it apart from a
    plaintext column. A column without values counts as plaintext.
    """
    target = table_sql(conn, table, schema)
    quoted = quote_name(conn, column)
    not_envelope = conn.execute(
        sa.text(
            f"SELECT EXISTS (SELECT 1 FROM {target} WHERE {quoted} IS NOT NULL AND "  # noqa: S608
            f"(typeof({quoted}) <> 'blob' OR length({quoted}) < :size "
            f"OR substr({quoted}, 1, 1) <> :version))"
        ),
        {"size": HEADER_SIZE, "version": bytes([FORMAT_VERSION])},
    ).scalar_one()
    if not_envelope:
        return False
    has_value = conn.exec_driver_sql(
        f"SELECT EXISTS (SELECT 1 FROM {target} WHERE {quoted} IS NOT NULL)"  # noqa: S608
    ).scalar_one()
    return bool(has_value)


def _sqlite_master(conn: Connection, schema: str | None) -> str:
    return f"{quote_name(conn, schema)}.sqlite_master" if schema else "sqlite_master"


def _schema_prefix(conn: Connection, schema: str | None) -> str:
    return f"{quote_name(conn, schema)}." if schema else ""


def _sqlite_fingerprint(conn: Connection, table: str, schema: str | None) -> set[tuple[Any, ...]]:
    """Return the indexes, unique constraints, checks and foreign keys of a table,
    described by content rather than by name (SQLite renames automatic indexes)."""
    prefix = _schema_prefix(conn, schema)
    quoted = quote_name(conn, table)
    found: set[tuple[Any, ...]] = set()
    for row in conn.exec_driver_sql(f"PRAGMA {prefix}index_list({quoted})").all():
        name, unique, origin, partial = row[1], row[2], row[3], row[4]
        info = conn.exec_driver_sql(f"PRAGMA {prefix}index_info({quote_name(conn, name)})").all()
        found.add(("index", unique, origin, partial, tuple(entry[2] for entry in info)))
    for row in conn.exec_driver_sql(f"PRAGMA {prefix}foreign_key_list({quoted})").all():
        found.add(("foreign key", row[2], row[3], row[4]))
    for check in sa.inspect(conn).get_check_constraints(table, schema=schema):
        found.add(("check", check["sqltext"]))
    return found


def _stored_sql(conn: Connection, info: TableInfo, kind: str) -> list[tuple[str, str]]:
    """Return the name and stored CREATE statement of the table's explicit indexes
    or of its triggers."""
    rows = conn.execute(
        sa.text(
            f"SELECT name, sql FROM {_sqlite_master(conn, info.schema)} "  # noqa: S608
            "WHERE type = :kind AND tbl_name = :t AND sql IS NOT NULL"
        ),
        {"kind": kind, "t": info.name},
    ).all()
    return [(name, sql) for name, sql in rows]


def _in_schema(conn: Connection, sql: str, schema: str | None) -> str:
    """Qualify the name in a stored CREATE INDEX or CREATE TRIGGER statement with
    ``schema``: run unqualified, it would create the object in ``main``."""
    if schema is None:
        return sql
    for prefix in _CREATE_PREFIXES:
        if sql.startswith(prefix):
            return f"{prefix}{quote_name(conn, schema)}.{sql[len(prefix) :]}"
    raise MigrationError(f"cannot recreate a schema object from its stored SQL: {sql[:60]!r}")


def _drop_and_rename(
    conn: Connection,
    info: TableInfo,
    source: ColumnInfo,
    shadow: str,
    fingerprint: set[tuple[Any, ...]],
) -> str | None:
    """Try the drop and rename inside a savepoint.

    Returns None when it succeeded, or, after rolling the savepoint back,
    the reason it could not be used.
    """
    target = table_sql(conn, info.name, info.schema)
    prefix = _schema_prefix(conn, info.schema)
    # SQLite refuses to drop an indexed column, so every explicit index of
    # the table is dropped and recreated from its stored SQL.
    indexes = _stored_sql(conn, info, "index")
    conn.exec_driver_sql(f"SAVEPOINT {_SAVEPOINT}")
    try:
        for name, _ in indexes:
            conn.exec_driver_sql(f"DROP INDEX {prefix}{quote_name(conn, name)}")
        conn.exec_driver_sql(f"ALTER TABLE {target} DROP COLUMN {quote_name(conn, source.name)}")
        conn.exec_driver_sql(
            f"ALTER TABLE {target} RENAME COLUMN {quote_name(conn, shadow)} "
            f"TO {quote_name(conn, source.name)}"
        )
        for _, sql in indexes:
            conn.exec_driver_sql(_in_schema(conn, sql, info.schema))
    except sa.exc.DBAPIError as exc:
        reason = f"SQLite cannot drop the column ({exc.orig})"
    else:
        if _sqlite_fingerprint(conn, info.name, info.schema) == fingerprint:
            conn.exec_driver_sql(f"RELEASE {_SAVEPOINT}")
            return None
        reason = "dropping the column would also drop a constraint defined on it"
    conn.exec_driver_sql(f"ROLLBACK TO {_SAVEPOINT}")
    conn.exec_driver_sql(f"RELEASE {_SAVEPOINT}")
    return reason


def _write_back(
    conn: Connection,
    info: TableInfo,
    source: ColumnInfo,
    shadow: str,
    fingerprint: set[tuple[Any, ...]],
    outcome: str,
) -> None:
    target = table_sql(conn, info.name, info.schema)
    column = quote_name(conn, source.name)
    shadow_column = quote_name(conn, shadow)
    prefix = _schema_prefix(conn, info.schema)

    triggers = _stored_sql(conn, info, "trigger")
    for name, _ in triggers:
        drop = f"DROP TRIGGER {prefix}{quote_name(conn, name)}"
        run_step(conn, info, source.name, f"drop trigger {name}", drop, outcome)
    run_step(
        conn,
        info,
        source.name,
        "write the converted values into the column",
        f"UPDATE {target} SET {column} = {shadow_column}",  # noqa: S608
        outcome,
    )
    changed = conn.exec_driver_sql(
        f"SELECT count(*) FROM {target} WHERE typeof({column}) <> typeof({shadow_column}) "  # noqa: S608
        f"OR CAST({column} AS BLOB) IS NOT CAST({shadow_column} AS BLOB)"
    ).scalar_one()
    if changed:
        raise MigrationError(
            f"could not write the converted values into {info.qualified_name}.{source.name}: "
            f"SQLite converted {changed} value(s) to the storage class of the column's "
            f"declared type {source.type} (type affinity), which would change them. "
            f"{outcome}. Pass a type_ that matches the declared type, then run the migration "
            "again"
        )
    run_step(
        conn,
        info,
        source.name,
        "drop the temporary column",
        f"ALTER TABLE {target} DROP COLUMN {shadow_column}",
        outcome,
    )
    for name, sql in triggers:
        run_step(
            conn,
            info,
            source.name,
            f"recreate trigger {name}",
            _in_schema(conn, sql, info.schema),
            outcome,
        )
    if _sqlite_fingerprint(conn, info.name, info.schema) != fingerprint:
        raise MigrationError(
            f"the indexes or constraints of {info.qualified_name} changed while converting "
            f"{source.name}, so the swap was rolled back. {outcome}"
        )
