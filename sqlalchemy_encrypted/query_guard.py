"""Compile-time checks for SQL that would silently work on ciphertext.

Operators such as ``==`` or LIKE are rejected by the column types' comparators
when the expression is built. ORDER BY, GROUP BY, casts and SQL functions
reach a column without calling an operator, so they are checked here, when a
SELECT is compiled. Compilation happens before any SQL is sent, and a
compiled statement is cached, so the check runs once per distinct statement.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import BindParameter, Cast, ColumnElement, Over, WithinGroup
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import CompoundSelect, Select

from .errors import UnsupportedOperationError
from .keys import KeyPurpose
from .types import EncryptedType

__all__ = ["check_compound_select", "check_select"]

# Functions whose result does not depend on the bytes of their argument.
_SAFE_FUNCTIONS = frozenset({"count"})


def _encrypted_columns(clause: Any) -> list[EncryptedType[Any]]:
    found = []
    for element in visitors.iterate(clause):
        if isinstance(element, BindParameter) or not isinstance(element, ColumnElement):
            continue
        if isinstance(element.type, EncryptedType) and not isinstance(
            element, (FunctionElement, Cast)
        ):
            found.append(element.type)
    return found


def _reject(column_type: EncryptedType[Any], what: str) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        f"{what} is not supported on encrypted column {column_type.column_identity}: "
        "the database would work on ciphertext, not on the values"
    )


def _check_ordering(order_by: Any, group_by: Any) -> None:
    for clause in order_by:
        for column_type in _encrypted_columns(clause):
            raise _reject(column_type, "ORDER BY")
    for clause in group_by:
        for column_type in _encrypted_columns(clause):
            if column_type.purpose is KeyPurpose.RANDOMIZED:
                raise _reject(column_type, "GROUP BY")


def check_select(select: Select[Any]) -> None:
    """Raise :class:`UnsupportedOperationError` if ``select`` orders, groups,
    casts or calls a SQL function over an encrypted column.

    Grouping (and window partitioning) is allowed on deterministic columns,
    whose equal values have equal stored bytes.
    """
    _check_ordering(select._order_by_clauses, select._group_by_clauses)
    for element in visitors.iterate(select):
        if isinstance(element, FunctionElement):
            name = getattr(element, "name", "")
            if name.lower() in _SAFE_FUNCTIONS:
                continue
            for column_type in _encrypted_columns(element.clauses):
                raise _reject(column_type, f"SQL function {name}()")
        elif isinstance(element, Cast):
            for column_type in _encrypted_columns(element.clause):
                raise _reject(column_type, "CAST")
        elif isinstance(element, (Over, WithinGroup)):
            order_by = element.order_by
            partition_by = getattr(element, "partition_by", None)
            _check_ordering(
                [] if order_by is None else [order_by],
                [] if partition_by is None else [partition_by],
            )


def check_compound_select(select: CompoundSelect[Any]) -> None:
    """Check the ORDER BY and GROUP BY of a UNION, INTERSECT or EXCEPT; its
    member SELECTs are checked when they compile."""
    _check_ordering(select._order_by_clauses, select._group_by_clauses)


@compiles(Select)
def _compile_checked_select(element: Select[Any], compiler: Any, **kw: Any) -> str:
    check_select(element)
    return str(compiler.visit_select(element, **kw))


@compiles(CompoundSelect)
def _compile_checked_compound_select(element: CompoundSelect[Any], compiler: Any, **kw: Any) -> str:
    check_compound_select(element)
    return str(compiler.visit_compound_select(element, **kw))
