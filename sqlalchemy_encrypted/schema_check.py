"""Find database columns too small for the envelopes their types store.

A column created with the plaintext's length (``VARCHAR(50)`` for a
``String(50)``), or created before the column was encrypted, cannot hold
the envelope. PostgreSQL then rejects long writes, and MySQL outside strict
mode truncates them, which destroys the value. Run
:func:`find_undersized_columns` at startup or in a deployment check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .types import EncryptedType

__all__ = ["UndersizedColumn", "find_undersized_columns"]


@dataclass(frozen=True)
class UndersizedColumn:
    """An encrypted column whose database type is shorter than its envelopes."""

    column: str
    """``table.column`` as declared in the metadata."""
    required: int | None
    """The maximum stored length of the type, or None when unbounded."""
    actual: int
    """The length the database reports for the column."""
    unit: str
    """``"bytes"`` for binary storage, ``"characters"`` for base64 storage."""

    def __str__(self) -> str:
        needed = "an unbounded length" if self.required is None else f"{self.required} {self.unit}"
        return (
            f"encrypted column {self.column} needs {needed}, but the database column "
            f"stores at most {self.actual} {self.unit}"
        )


def find_undersized_columns(
    bind: sa.Engine | sa.Connection, metadata: sa.MetaData
) -> list[UndersizedColumn]:
    """Compare each encrypted column of ``metadata`` with the database.

    Returns the columns whose reflected length is below the type's
    :meth:`~sqlalchemy_encrypted.EncryptedType.max_stored_length`. Tables
    missing from the database, and database types without a length (BYTEA,
    BLOB, TEXT), are skipped.
    """
    inspector = sa.inspect(bind)
    problems = []
    for table in metadata.sorted_tables:
        encrypted = [c for c in table.columns if isinstance(c.type, EncryptedType)]
        if not encrypted or not inspector.has_table(table.name, schema=table.schema):
            continue
        reflected = {
            column["name"]: column
            for column in inspector.get_columns(table.name, schema=table.schema)
        }
        for column in encrypted:
            problem = _check_column(column, reflected.get(column.name))
            if problem is not None:
                problems.append(problem)
    return problems


def _check_column(column: sa.Column[Any], reflected: Any) -> UndersizedColumn | None:
    if reflected is None:
        return None
    actual = getattr(reflected["type"], "length", None)
    if not isinstance(actual, int):
        return None
    column_type = column.type
    assert isinstance(column_type, EncryptedType)
    required = column_type.max_stored_length()
    if required is not None and actual >= required:
        return None
    unit = "characters" if column_type.storage == "base64" else "bytes"
    return UndersizedColumn(f"{column.table.name}.{column.name}", required, actual, unit)
