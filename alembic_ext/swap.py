"""The final swap of a column conversion: the converted column takes the source's place.

The swap runs inside the caller's transaction, so on failure nothing is
changed once the caller rolls back, and the temporary column with the
converted values is kept for the next run.

PostgreSQL: ``DROP COLUMN`` removes the indexes and constraints that use
the column. Their exact definitions (``pg_get_indexdef``,
``pg_get_constraintdef``) are read first and executed again after the
column is renamed, so the new column gets the same names and options.

SQLite: see :mod:`alembic_ext.swap_sqlite`.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .ddl import ColumnInfo, TableInfo, begin_write, quote_name, run_step, table_sql
from .swap_sqlite import swap_sqlite

__all__ = ["swap_columns"]

logger = logging.getLogger("sqlalchemy_encrypted.alembic")


def swap_columns(
    conn: Connection, info: TableInfo, source: ColumnInfo, shadow: str, outcome: str
) -> None:
    """Replace ``source`` by the ``shadow`` column, keeping the source's name,
    NOT NULL, comment, indexes and constraints.

    Runs inside the caller's transaction: on failure nothing is changed once
    the caller rolls back, and the error names the step that failed and
    ends with ``outcome``, the sentence stating what the failure leaves.
    """
    if conn.dialect.name == "postgresql":
        _swap_postgresql(conn, info, source, shadow, outcome)
        in_place = False
    else:
        begin_write(conn, info.name, info.schema, source.name)
        in_place = swap_sqlite(conn, info, source, shadow, outcome)
    if source.default is None:
        return
    if in_place:
        logger.warning(
            "the server default of %s.%s is kept as written, because SQLite cannot remove "
            "it without recreating the table",
            info.qualified_name,
            source.name,
        )
    else:
        logger.warning(
            "the server default of %s.%s is not carried over to the converted column",
            info.qualified_name,
            source.name,
        )


def _swap_postgresql(
    conn: Connection, info: TableInfo, source: ColumnInfo, shadow: str, outcome: str
) -> None:
    target = table_sql(conn, info.name, info.schema)
    column = quote_name(conn, source.name)

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

    run_step(
        conn,
        info,
        source.name,
        "drop the source column",
        f"ALTER TABLE {target} DROP COLUMN {column}",
        outcome,
    )
    run_step(
        conn,
        info,
        source.name,
        "rename the converted column",
        f"ALTER TABLE {target} RENAME COLUMN {quote_name(conn, shadow)} TO {column}",
        outcome,
    )

    lost_constraints = {
        name: sql for name, sql in constraints_before.items() if name not in constraints()
    }
    for name, definition in lost_constraints.items():
        run_step(
            conn,
            info,
            source.name,
            f"recreate constraint {name}",
            f"ALTER TABLE {target} ADD CONSTRAINT {quote_name(conn, name)} {definition}",
            outcome,
        )
    remaining = indexes()
    for name, definition in indexes_before.items():
        if name not in remaining:
            run_step(conn, info, source.name, f"recreate index {name}", definition, outcome)

    if not source.nullable:
        run_step(
            conn,
            info,
            source.name,
            "restore NOT NULL",
            f"ALTER TABLE {target} ALTER COLUMN {column} SET NOT NULL",
            outcome,
        )
    if source.comment is not None:
        commented: sa.Column[Any] = sa.Column(source.name, comment=source.comment)
        sa.Table(info.name, sa.MetaData(), commented, schema=info.schema)
        conn.execute(sa.schema.SetColumnComment(commented))
