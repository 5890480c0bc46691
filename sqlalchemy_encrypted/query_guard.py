"""Compile-time checks for SQL that would silently work on ciphertext.

Operators such as ``==`` or LIKE are rejected by the column types' comparators
when the expression is built. ORDER BY, GROUP BY, casts, SQL functions and
comparisons with the encrypted column on the right (or inside ``tuple_()``,
``type_coerce()`` or a subquery) reach a column without calling its
operators, so they are checked here, when a SELECT is compiled. In INSERT
and UPDATE statements, values bound with another type than the column's are
retyped, so they are encrypted too.
Compilation happens before any SQL is sent, and a compiled statement is
cached, so the checks run once per distinct statement.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import Delete, Insert, Update
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    Case,
    Cast,
    ClauseElement,
    ClauseList,
    ColumnClause,
    ColumnElement,
    ExpressionClauseList,
    Grouping,
    Label,
    Null,
    Over,
    Tuple,
    TypeCoerce,
    WithinGroup,
    _textual_label_reference,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import CompoundSelect, ScalarSelect, Select
from sqlalchemy.util import immutabledict

from ._comparison import ColumnComparison
from ._search import TokenSearch
from .errors import UnsupportedOperationError
from .keys import KeyPurpose
from .types import EncryptedType

__all__ = ["check_compound_select", "check_expressions", "check_select", "encrypting_dml"]

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


def _named_columns(statement: Any, clause: Any) -> list[EncryptedType[Any]]:
    """Resolve ``order_by("name")`` and ``group_by("name")`` against the
    statement's selected columns."""
    found: list[EncryptedType[Any]] = []
    if statement is None:
        return found
    for element in visitors.iterate(clause):
        if isinstance(element, _textual_label_reference):
            column = statement.selected_columns.get(element.element)
            if column is not None and isinstance(column.type, EncryptedType):
                found.append(column.type)
    return found


def _check_ordering(order_by: Any, group_by: Any, statement: Any = None) -> None:
    for clause in order_by:
        for column_type in _encrypted_columns(clause) + _named_columns(statement, clause):
            raise _reject(column_type, "ORDER BY")
    for clause in group_by:
        for column_type in _encrypted_columns(clause) + _named_columns(statement, clause):
            if column_type.purpose is KeyPurpose.RANDOMIZED:
                raise _reject(column_type, "GROUP BY")


def _is_randomized(column_type: Any) -> bool:
    return isinstance(column_type, EncryptedType) and column_type.purpose is KeyPurpose.RANDOMIZED


def _randomized_columns(clause: Any) -> list[ColumnClause[Any]]:
    """Return the randomized encrypted table columns that ``clause`` reads."""
    return [
        element
        for element in visitors.iterate(clause)
        if isinstance(element, ColumnClause) and _is_randomized(element.type)
    ]


def _keyed_by_primary_key(column: ColumnClause[Any], selected: list[Any]) -> bool:
    """Return True if ``selected`` includes the whole primary key of ``column``'s table.

    Each row then differs from every other row of that table, so removing
    duplicate rows gives the same result with plaintext and with ciphertext.
    """
    primary_key = getattr(column.table, "primary_key", None)
    if primary_key is None or not len(primary_key):
        return False
    chosen = {id(element._deannotate()) for element in selected}
    return all(id(key._deannotate()) in chosen for key in primary_key)


def _selected_columns(select: Select[Any]) -> list[Any]:
    """Return the selected column expressions, with labels removed."""
    return [
        column.element if isinstance(column, Label) else column
        for column in select.selected_columns
    ]


def _check_duplicate_removal(select: Select[Any], what: str) -> None:
    """Raise if ``select``'s rows are de-duplicated (DISTINCT, or a member
    of UNION, INTERSECT or EXCEPT) over a randomized column.

    Each randomized value has its own ciphertext, so rows with equal
    plaintext would stay separate. Selecting the primary key of the
    column's table makes every row unique anyway, which is allowed.
    """
    selected = _selected_columns(select)
    for expression in selected:
        for column in _randomized_columns(expression):
            column_type = column.type
            if not isinstance(column_type, EncryptedType):
                continue
            if not _keyed_by_primary_key(column, selected):
                raise UnsupportedOperationError(
                    f"{what} is not supported on randomized encrypted column "
                    f"{column_type.column_identity}: equal values have different "
                    "ciphertexts, so the database would not remove duplicates. Remove them "
                    "in Python after loading, select the table's primary key too, or use "
                    "DeterministicEncrypted for a column that needs it"
                )


def _distinct_on(select: Select[Any]) -> list[Any]:
    """Return the DISTINCT ON expressions of ``select``, from ``distinct(*columns)``
    or from the PostgreSQL ``distinct_on()`` extension of SQLAlchemy 2.1."""
    clauses = list(select._distinct_on)
    extension = getattr(select, "_pre_columns_clause", None)
    if extension is not None:
        for element in visitors.iterate(extension):
            clauses.extend(getattr(element, "_distinct_on", ()))
    return clauses


def check_select(select: Select[Any]) -> None:
    """Raise :class:`UnsupportedOperationError` if ``select`` orders, groups,
    casts or calls a SQL function over an encrypted column, or removes
    duplicates over a randomized one.

    Grouping, window partitioning, DISTINCT and DISTINCT ON are allowed on
    deterministic columns, whose equal values have equal stored bytes.
    """
    _check_ordering(select._order_by_clauses, select._group_by_clauses, select)
    for clause in _distinct_on(select):
        for column_type in _encrypted_columns(clause):
            if column_type.purpose is KeyPurpose.RANDOMIZED:
                raise _reject(column_type, "DISTINCT ON")
    if select._distinct:
        _check_duplicate_removal(select, "SELECT DISTINCT")
    check_expressions(select)


def check_expressions(statement: Any) -> None:
    """Raise :class:`UnsupportedOperationError` if any part of ``statement``
    casts, calls a SQL function (other than ``count()``), orders a window or
    compares a row value (``tuple_()``) over an encrypted column."""
    for element in visitors.iterate(statement):
        if isinstance(element, BinaryExpression):
            _check_row_value(element)
            _check_comparison(element)
        elif isinstance(element, FunctionElement):
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
        elif isinstance(element, Case):
            if element.value is not None:
                for column_type in _encrypted_columns(element.value):
                    # case({...}, value=column) compares the column with each key.
                    raise _reject(column_type, "CASE with a value to compare")
            results = [result for _, result in element.whens]
            if element.else_ is not None:
                results.append(element.else_)
            _check_one_source(results, "CASE")


def _check_row_value(binary: BinaryExpression[Any]) -> None:
    """Reject a comparison of row values that contain an encrypted column.

    SQLAlchemy compares a ``tuple_()`` element by element in SQL, without
    the column type's comparator. A randomized value never matches, ordering
    compares ciphertext, and a deterministic value is bound under the active
    key version only, so rows under an older version are missed during a
    rotation.
    """
    for side in (binary.left, binary.right):
        if isinstance(side, Tuple):
            for column_type in _encrypted_columns(side):
                raise UnsupportedOperationError(
                    f"a row-value (tuple_) comparison is not supported on encrypted column "
                    f"{column_type.column_identity}: compare each column on its own, for "
                    "example and_(column == value, other == value2)"
                )


def _compared_types(side: Any) -> list[Any]:
    """Return the types a comparison operand compares: its own type, or
    those of the columns a subquery selects. Bound values and NULL give none."""
    while isinstance(side, Grouping):
        side = side.element
    if isinstance(side, TypeCoerce):
        # type_coerce(column, String) compares the stored bytes under another type.
        return _compared_types(side.clause) or [side.type]
    if isinstance(side, Tuple):
        return [found for clause in side.clauses for found in _compared_types(clause)]
    if isinstance(side, (ClauseList, ExpressionClauseList)):
        # The bounds of BETWEEN, or the list of an IN over expressions.
        return [found for clause in side.clauses for found in _compared_types(clause)]
    if isinstance(side, ScalarSelect):
        side = side.element
    if isinstance(side, (Select, CompoundSelect)):
        return [column.type for column in side.selected_columns]
    if isinstance(side, (BindParameter, Null)) or not isinstance(side, ColumnElement):
        return []
    return [side.type]


def _check_comparison(binary: BinaryExpression[Any]) -> None:
    """Reject a comparison between an encrypted column and anything but a
    value bound through the column's own type.

    The column types' comparators build the comparisons that work (see
    :class:`TokenSearch`) and reject the others when the expression is
    built. These forms never reach them: the encrypted column on the right
    of another column or bound value (``plain == encrypted``,
    ``literal("x") == encrypted``, which would also send the value as
    plaintext), or inside a subquery compared with ``in_()``.
    """
    if isinstance(binary, (TokenSearch, ColumnComparison)):
        return
    sides = (binary.left, binary.right)
    for side, other in (sides, sides[::-1]):
        encrypted = [t for t in _compared_types(side) if isinstance(t, EncryptedType)]
        if not encrypted:
            continue
        if isinstance(other, Null):
            # IS NULL and its variants look at no bytes of the value.
            continue
        if isinstance(other, BindParameter) and isinstance(other.type, EncryptedType):
            continue
        raise UnsupportedOperationError(
            f"comparing encrypted column {encrypted[0].column_identity} with another column, "
            "value or subquery is not supported: the database would compare ciphertext, not "
            "values; compare the column itself with a Python value"
        )


def _describe_source(element: Any) -> str:
    if isinstance(element.type, EncryptedType):
        return f"encrypted column {element.type.column_identity}"
    return "a value that is not encrypted"


def _check_one_source(elements: list[Any], what: str) -> None:
    """Raise if ``elements``, which share one result column, mix an
    encrypted column with another column or value.

    The result column is decrypted with one column's key and identity, so
    values from anywhere else fail to authenticate, or come back as raw
    ciphertext. NULL mixes with anything.
    """
    encrypted = [e for e in elements if isinstance(e.type, EncryptedType)]
    if not encrypted:
        return
    identity = encrypted[0].type.column_identity
    for element in elements:
        if isinstance(element, Null):
            continue
        if isinstance(element.type, EncryptedType) and (element.type.column_identity == identity):
            continue
        raise UnsupportedOperationError(
            f"{what} combines encrypted column {identity} with "
            f"{_describe_source(element)} in one result column: its values could not be "
            "decrypted with one column's key; select the columns separately"
        )


def _member_selects(select: CompoundSelect[Any]) -> list[Select[Any]]:
    """Return the SELECTs of a compound statement, nested ones included."""
    found: list[Select[Any]] = []
    for member in select.selects:
        inner = getattr(member, "element", member)
        if isinstance(inner, Select):
            found.append(inner)
        elif isinstance(inner, CompoundSelect):
            found.extend(_member_selects(inner))
    return found


def check_compound_select(select: CompoundSelect[Any]) -> None:
    """Check the ORDER BY and GROUP BY of a UNION, INTERSECT or EXCEPT, and
    that each of its result columns comes from one encrypted column or none.

    UNION, INTERSECT and EXCEPT without ALL remove duplicate rows, so, as
    for SELECT DISTINCT, no member may select a randomized column without
    the primary key of its table. Member SELECTs are checked on their own
    when they compile.
    """
    _check_ordering(select._order_by_clauses, select._group_by_clauses, select)
    keyword = str(getattr(select.keyword, "value", "UNION"))
    members = [list(member.selected_columns) for member in select.selects]
    for position in range(min(len(columns) for columns in members)):
        _check_one_source([columns[position] for columns in members], keyword)
    if not keyword.endswith("ALL"):
        for member in _member_selects(select):
            _check_duplicate_removal(member, keyword)


def _encrypted_column(columns: Any, key: Any) -> Any:
    column = columns.get(getattr(key, "key", key))
    if column is not None and isinstance(column.type, EncryptedType):
        return column
    return None


def _needs_encrypting_type(value: Any) -> bool:
    """Return True for a bound parameter that keeps a non-encrypting type.

    SQLAlchemy gives an untyped parameter the column's type, but keeps the
    type of a typed one, such as ``literal("x")``, ``bindparam("n",
    type_=String)`` or the parameters ``lambda_stmt`` makes for
    ``.values(name=variable)``. Such a value would be stored unencrypted.
    """
    return (
        isinstance(value, BindParameter)
        and not value.type._isnull
        and not isinstance(value.type, EncryptedType)
    )


def _reject_expression(column: Any, value: Any) -> None:
    """Reject a SQL expression as the value of an encrypted column: the
    database would store its result unencrypted."""
    if isinstance(value, (BindParameter, Null)) or not isinstance(value, ClauseElement):
        return
    if isinstance(value, ColumnElement) and value._deannotate() is column._deannotate():
        return
    raise UnsupportedOperationError(
        f"the value for encrypted column {column.type.column_identity} is a SQL expression, "
        "which the database would store unencrypted; pass a Python value instead"
    )


def encrypting_dml(statement: Insert | Update) -> Insert | Update:
    """Return ``statement`` with every value for an encrypted column bound
    through the column's type.

    A typed bound parameter is retyped to the column's encrypted type, the
    same way SQLAlchemy types an untyped one. A SQL expression as the value
    raises :class:`UnsupportedOperationError`.
    """
    columns = getattr(statement.table, "c", None)
    if columns is None:
        return statement
    replacements = {}
    for key, value in (statement._values or {}).items():
        column = _encrypted_column(columns, key)
        if column is None:
            continue
        _reject_expression(column, value)
        if _needs_encrypting_type(value):
            replacements[key] = value._with_binary_element_type(column.type)
    for rows in getattr(statement, "_multi_values", None) or ():
        for row in rows:
            for key, value in row.items() if isinstance(row, dict) else ():
                column = _encrypted_column(columns, key)
                if column is not None:
                    _reject_expression(column, value)
                    if _needs_encrypting_type(value):
                        raise UnsupportedOperationError(
                            f"the value for encrypted column {column.type.column_identity} "
                            "in a multi-row VALUES is a typed bound parameter, which would "
                            "store it unencrypted; pass plain Python values"
                        )
    if replacements:
        # Set on a clone rather than through .values(), because a statement
        # resolved from lambda_stmt keeps its values in a plain dict, which
        # .values() cannot extend.
        merged: dict[Any, Any] = dict(statement._values or {})
        merged.update(replacements)
        statement = statement._clone()
        statement._values = immutabledict(merged)
    return statement


@compiles(Insert)
def _compile_checked_insert(element: Insert, compiler: Any, **kw: Any) -> str:
    encrypting = encrypting_dml(element)
    # ON CONFLICT clauses and RETURNING can compare or call functions too.
    check_expressions(encrypting)
    return str(compiler.visit_insert(encrypting, **kw))


@compiles(Update)
def _compile_checked_update(element: Update, compiler: Any, **kw: Any) -> str:
    encrypting = encrypting_dml(element)
    check_expressions(encrypting)
    return str(compiler.visit_update(encrypting, **kw))


@compiles(Delete)
def _compile_checked_delete(element: Delete, compiler: Any, **kw: Any) -> str:
    check_expressions(element)
    return str(compiler.visit_delete(element, **kw))


@compiles(Select)
def _compile_checked_select(element: Select[Any], compiler: Any, **kw: Any) -> str:
    check_select(element)
    return str(compiler.visit_select(element, **kw))


@compiles(CompoundSelect)
def _compile_checked_compound_select(element: CompoundSelect[Any], compiler: Any, **kw: Any) -> str:
    check_compound_select(element)
    return str(compiler.visit_compound_select(element, **kw))
