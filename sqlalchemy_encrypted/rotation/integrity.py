"""Name the constraint and columns behind an ``IntegrityError``, quoting no value.

The databases quote the rejected key in their messages: PostgreSQL in its
DETAIL line (``Key (email)=(...) already exists``), MySQL and MariaDB in
the message itself (``Duplicate entry '...' for key ...``). Those texts are
never passed on. Only names are taken from them, and a column name only
when the table has a column of that name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.schema import ColumnCollectionConstraint

__all__ = ["Rejection", "describe_rejection"]

# SQLSTATE of a unique violation (PostgreSQL).
_UNIQUE_VIOLATION = "23505"
# MySQL and MariaDB error code ER_DUP_ENTRY.
_DUPLICATE_ENTRY = 1062
_SQLITE_UNIQUE = "UNIQUE constraint failed: "
# The column list of PostgreSQL's DETAIL line, up to the quoted values.
_POSTGRES_KEY = re.compile(r"^Key \(([^()]*)\)=\(")
# The index name at the end of MySQL's duplicate entry message.
_MYSQL_KEY = re.compile(r" for key '([^']+)'$")


@dataclass(frozen=True)
class Rejection:
    """The constraint and columns that the database named when it rejected a row's update.

    ``reason`` is the class name of the driver's exception, and ``unique``
    is True for a unique violation. ``constraint`` is the constraint or
    index name, or None, and ``columns`` are the columns of the table that
    it covers, or () when the database named none.
    """

    reason: str
    unique: bool
    constraint: str | None
    columns: tuple[str, ...]

    def message(self) -> str:
        """Return the failure message of the rejected row, which quotes no value."""
        names = []
        if self.constraint:
            names.append(self.constraint)
        if self.columns:
            names.append(f"on ({', '.join(self.columns)})")
        named = f" {' '.join(names)}" if names else ""
        if self.unique:
            return (
                f"the database rejected the re-encrypted row ({self.reason}): unique "
                f"index{named} already holds the same value under the active key version "
                "in another row; remove or merge the duplicate, then run the job again"
            )
        constraint = f" of constraint {self.constraint}" if self.constraint else ""
        return (
            f"the database rejected the re-encrypted row ({self.reason}{constraint}); the "
            "row was left as it was"
        )


def describe_rejection(error: IntegrityError, table: sa.Table) -> Rejection:
    """Return the constraint and columns of ``table`` that ``error`` names."""
    original = error.orig
    reason = type(original).__name__ if original is not None else "IntegrityError"
    known = {column.name for column in table.columns}
    diagnostics = getattr(original, "diag", None)
    if diagnostics is not None:
        return _postgres_rejection(original, diagnostics, reason, table, known)
    arguments: tuple[Any, ...] = tuple(getattr(original, "args", ()))
    if len(arguments) >= 2 and arguments[0] == _DUPLICATE_ENTRY:
        return _mysql_rejection(arguments[1], reason, table)
    return _sqlite_rejection(str(original), reason, table, known)


def _postgres_rejection(
    original: Any, diagnostics: Any, reason: str, table: sa.Table, known: set[str]
) -> Rejection:
    # psycopg has ``sqlstate``, psycopg2 ``pgcode``.
    sqlstate = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    constraint = getattr(diagnostics, "constraint_name", None)
    if not isinstance(constraint, str) or not constraint:
        constraint = None
    columns: tuple[str, ...] = ()
    detail = getattr(diagnostics, "message_detail", None)
    if isinstance(detail, str):
        match = _POSTGRES_KEY.match(detail)
        if match is not None:
            columns = _known_names(match.group(1).split(", "), known)
    if not columns and constraint is not None:
        columns = _constraint_columns(table, constraint)
    return Rejection(reason, sqlstate == _UNIQUE_VIOLATION, constraint, columns)


def _mysql_rejection(text: object, reason: str, table: sa.Table) -> Rejection:
    # NOTE: tested with messages in the format of MySQL 8 and MariaDB, not
    # against a server.
    constraint = None
    match = _MYSQL_KEY.search(text) if isinstance(text, str) else None
    if match is not None:
        # MySQL 8 writes "table.index", MariaDB and older MySQL only "index".
        name = match.group(1).rpartition(".")[2]
        # The name follows the quoted values, so it is used only when the
        # table has an index of that name, which shows it is not a value.
        if name == "PRIMARY" or name in _index_names(table):
            constraint = name
    columns = _constraint_columns(table, constraint) if constraint else ()
    return Rejection(reason, True, constraint, columns)


def _sqlite_rejection(text: str, reason: str, table: sa.Table, known: set[str]) -> Rejection:
    """Read SQLite's "UNIQUE constraint failed: t.a, t.b" (or "...: index 'name'")."""
    if not text.startswith(_SQLITE_UNIQUE):
        return Rejection(reason, False, None, ())
    listed = text[len(_SQLITE_UNIQUE) :].strip()
    if listed.startswith("index '") and listed.endswith("'"):
        constraint = listed[len("index '") : -1]
        return Rejection(reason, True, constraint, _constraint_columns(table, constraint))
    names = [item.rpartition(".")[2] for item in listed.split(", ")]
    return Rejection(reason, True, None, _known_names(names, known))


def _known_names(names: list[str], known: set[str]) -> tuple[str, ...]:
    """Return ``names`` if every one is a column name in ``known``, else ()."""
    stripped = [name.strip() for name in names]
    if stripped and all(name in known for name in stripped):
        return tuple(stripped)
    return ()


def _index_names(table: sa.Table) -> set[str]:
    names: set[str] = {str(index.name) for index in table.indexes if index.name}
    names.update(
        str(constraint.name)
        for constraint in table.constraints
        if isinstance(constraint, sa.UniqueConstraint | sa.PrimaryKeyConstraint) and constraint.name
    )
    return names


def _constraint_columns(table: sa.Table, name: str | None) -> tuple[str, ...]:
    """Return the columns of the unique index or constraint ``name`` of ``table``."""
    if name == "PRIMARY":
        return tuple(column.name for column in table.primary_key.columns)
    for index in table.indexes:
        if index.name == name:
            return tuple(column.name for column in index.columns)
    for constraint in table.constraints:
        if isinstance(constraint, ColumnCollectionConstraint) and constraint.name == name:
            return tuple(column.name for column in constraint.columns)
    return ()
