"""``==`` and ``!=`` between an encrypted column and another SQL expression.

Comparing ciphertext with another column never compares the values, so
such a comparison must not reach the database. It cannot raise when it is
built, though: SQLAlchemy itself evaluates ``column_a == column_b`` to test
whether a column is in a set or list, and relies on ``bool()`` of the
result. :class:`ColumnComparison` keeps that ``bool()`` behaviour and raises
:class:`UnsupportedOperationError` when it is compiled, before any SQL is
sent.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import BinaryExpression

from .errors import UnsupportedOperationError

__all__ = ["ColumnComparison"]


class ColumnComparison(BinaryExpression[bool]):
    """A comparison of an encrypted column with a column or expression."""

    inherit_cache = True

    def __init__(self, binary: BinaryExpression[Any], identity: str) -> None:
        super().__init__(
            binary.left,
            binary.right,
            binary.operator,
            type_=binary.type,
            negate=binary.negate,
            modifiers=binary.modifiers,
        )
        self.encrypted_column = identity

    def _negate(self) -> Any:
        # The stock negation returns a plain BinaryExpression, which would
        # compile without the check.
        negated = super()._negate()  # type: ignore[no-untyped-call]
        if isinstance(negated, BinaryExpression):
            return ColumnComparison(negated, self.encrypted_column)
        return negated


@compiles(ColumnComparison)
def _compile_column_comparison(element: ColumnComparison, compiler: Any, **kw: Any) -> str:
    raise UnsupportedOperationError(
        f"comparing encrypted column {element.encrypted_column} with another column or SQL "
        "expression is not supported: the database would compare ciphertext, not values"
    )
