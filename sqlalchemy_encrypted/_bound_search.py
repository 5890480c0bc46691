"""Lookups on a deterministic column through bound parameters.

A bound parameter (``bindparam("e")``, or a closure variable of a
``lambda_stmt``) gets its value only when the statement executes, and a
compiled statement is cached and executed again with other values, under
other tenants and after key rotations. So the number of the tenant's
decryptable key versions is unknown when the SQL is rendered, and a scalar
parameter cannot be expanded into a list the way a plain value is.

Such a parameter therefore binds one value: the search values (stored
bytes) of the plaintext under each decryptable key version, active first,
concatenated and padded to :data:`MAX_BOUND_LOOKUP_VERSIONS` by repeating
the active one. All of them have the same length, because an AES-SIV
envelope is the 24-byte header, the 16-byte SIV and a ciphertext as long
as the encoded plaintext. The SQL cuts the value into equal slices::

    email IN (substr(:p, 1, length(:p) / 4),
              substr(:p, 1 + 1 * (length(:p) / 4), length(:p) / 4), ...)

``substr()`` and ``length()`` count bytes on SQLite BLOBs and PostgreSQL
``bytea``, and characters on base64 text, where equal byte lengths give
equal text lengths. The slices depend only on the parameter, so the
database evaluates them once and looks them up in the column's index.
That form mentions the parameter eight times, which costs nothing with
named parameters (PostgreSQL). With positional ones (SQLite's ``?``) each
mention is a placeholder of its own, bound and sealed again, so there the
parameter appears once, in a ``VALUES`` row cut by a join with the slot
numbers ``0 .. MAX_BOUND_LOOKUP_VERSIONS - 1``.

An expanding parameter (``bindparam("e", expanding=True)``, or a list
closure variable of a ``lambda_stmt`` passed to ``in_()``) becomes a
``VALUES`` list with one row per element, cut into slices by a join with
the slot numbers ``0 .. MAX_BOUND_LOOKUP_VERSIONS - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BindParameter, ColumnElement, Grouping

from . import _storage
from ._search import TokenSearch
from .errors import EncryptionError, TooManyKeyVersionsError, UnsupportedOperationError
from .keys import KeyPurpose
from .tenancy import TenantBound, current_tenant

if TYPE_CHECKING:
    from .types import DeterministicEncrypted

__all__ = [
    "MAX_BOUND_LOOKUP_VERSIONS",
    "ExpandingTokenSearch",
    "PackedSearchValue",
    "PackedTokenSearch",
    "expanding_token_search",
    "packed_token_search",
]

# The number of key versions a lookup through a bound parameter covers.
# Every such lookup binds this many search values per plaintext, so it is
# kept small. Two versions exist during a rotation, and a third one if the
# next rotation starts before re-encryption of the previous one finished.
MAX_BOUND_LOOKUP_VERSIONS = 4

# The value bound when no stored value may match, because the tenant has no
# keys or a None inside a list is skipped. Each slice is one byte (or
# character) long, shorter than any envelope, and "-" is not a base64
# character.
_NO_MATCH_BINARY = b"\x00" * MAX_BOUND_LOOKUP_VERSIONS
_NO_MATCH_BASE64 = "-" * MAX_BOUND_LOOKUP_VERSIONS

# Dialects on which the VALUES form of an expanding lookup was tested, plus
# the generic dialect of str(statement).
_VALUES_DIALECTS = frozenset({"sqlite", "postgresql", "default"})


def pack_search_value(
    column_type: DeterministicEncrypted[Any], value: Any, *, skip_none: bool
) -> bytes | str | None:
    """Return the concatenated search values of ``value`` for ``column_type``.

    The tenant comes from a :class:`TenantBound` wrapper, else the tenant
    scope of the execution, else the default tenant. ``None`` binds NULL, or
    with ``skip_none`` a value that matches nothing.
    """
    tenant_id: str | None = None
    if type(value) is TenantBound:
        tenant_id = value.tenant_id
        value = value.value
    storage = column_type.storage
    if value is None:
        if not skip_none:
            return None
        return _NO_MATCH_BASE64 if storage == "base64" else _NO_MATCH_BINARY
    identity = column_type._identity_for_write()
    unexpected: str | None = None
    try:
        tenant = tenant_id if tenant_id is not None else current_tenant(identity, search=True)
        keys = column_type.key_provider.decryptable_keys(tenant, KeyPurpose.DETERMINISTIC)
        if len(keys) > MAX_BOUND_LOOKUP_VERSIONS:
            raise TooManyKeyVersionsError(
                f"encrypted column {identity}: tenant {tenant!r} has {len(keys)} decryptable "
                f"key versions, but a lookup through a bound parameter covers at most "
                f"{MAX_BOUND_LOOKUP_VERSIONS}; finish re-encrypting the tenant's values and "
                "retire its old key versions (sqlalchemy-encrypted keys retire), or compare "
                "with a plain value"
            )
        if not keys:
            # NOTE: for a tenant without keys the plain-value form renders an
            # empty IN, whose NOT IN also matches NULL rows. This NOT IN does not.
            # The value is checked anyway, so a wrong type fails for every tenant.
            column_type.encode_plaintext(value)
            return _NO_MATCH_BASE64 if storage == "base64" else _NO_MATCH_BINARY
        tokens = [column_type.seal(value, key=key) for key in keys]
    except (EncryptionError, sa.exc.SQLAlchemyError):
        raise
    except Exception as exc:
        # SQLAlchemy would wrap any other error in a StatementError that
        # quotes the parameters, and the error itself may quote the value.
        unexpected = type(exc).__name__
    if unexpected is not None:
        raise EncryptionError(
            f"could not build the search values for encrypted column {identity}: {unexpected}"
        )
    tokens.extend([tokens[0]] * (MAX_BOUND_LOOKUP_VERSIONS - len(tokens)))
    if storage == "base64":
        return "".join(_storage.to_base64(token) for token in tokens)
    return b"".join(tokens)


class PackedSearchValue(sa.types.TypeDecorator[Any]):
    """Type of a bound parameter compared with a deterministic column.

    It binds the concatenated search values of the parameter's plaintext
    (see :func:`pack_search_value`). With ``skip_none`` the parameter is an
    element of a list, where None matches nothing, as a None among plain
    values does.
    """

    impl = sa.LargeBinary
    cache_ok = True

    def __init__(self, column_type: DeterministicEncrypted[Any], *, skip_none: bool) -> None:
        super().__init__()
        self.column_type = column_type
        self.skip_none = skip_none
        # Without a length: a bind cast to VARCHAR(n) on PostgreSQL would
        # cut the concatenated value short.
        self.impl = _storage.impl_for(column_type.storage)  # type: ignore[assignment]

    @property
    def _static_cache_key(self) -> Any:
        return (
            type(self),
            self.column_type._static_cache_key,
            self.skip_none,
            MAX_BOUND_LOOKUP_VERSIONS,
        )

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return pack_search_value(self.column_type, value, skip_none=self.skip_none)

    def literal_processor(self, dialect: Dialect) -> Any:
        # Raised here, not from a returned processor, for the reason given
        # in EncryptedType.literal_processor().
        raise UnsupportedOperationError(
            f"encrypted column {self.column_type.column_identity} cannot be rendered as a SQL "
            "literal; use bound parameters"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.column_type.column_identity!r})"


class _PackedSearchRow(PackedSearchValue):
    """Type of an expanding parameter rendered as the rows of a VALUES list.

    SQLAlchemy renders a bind expression around each element of an expanding
    parameter. Two groupings make each element ``((?))``, a row holding a
    parenthesized value. With one, an empty list would render SQLAlchemy's
    empty-set subquery as ``(SELECT ...)``, which is no valid VALUES row.
    """

    def bind_expression(self, bindvalue: BindParameter[Any]) -> ColumnElement[Any]:
        return Grouping(Grouping(bindvalue))


def _slices(parameter: ColumnElement[Any]) -> list[ColumnElement[Any]]:
    """Return the SQL expressions that cut ``parameter``, cast to the
    storage type, into its search values."""
    count = MAX_BOUND_LOOKUP_VERSIONS
    size = sa.func.length(parameter, type_=sa.Integer) // sa.literal_column(str(count), sa.Integer)
    slices: list[ColumnElement[Any]] = [sa.func.substr(parameter, sa.literal_column("1"), size)]
    for slot in range(1, count):
        start = sa.literal_column("1", sa.Integer) + sa.literal_column(str(slot), sa.Integer) * size
        slices.append(sa.func.substr(parameter, start, size))
    return slices


class PackedTokenSearch(TokenSearch):
    """``column IN (slices of each packed parameter)``, or NOT IN.

    With named parameters (PostgreSQL) it renders the slices themselves.
    With positional ones (SQLite's ``?``) every mention of a parameter is a
    separate placeholder, bound and sealed again. There the parameters
    therefore appear once each, in a ``VALUES`` list that a join with the
    slot numbers cuts into slices, as in the expanding form.
    """

    inherit_cache = True


def packed_token_search(
    column: ColumnElement[Any], parameters: Sequence[ColumnElement[Any]], negate: bool
) -> PackedTokenSearch:
    """Return ``column IN (slices of each parameter)``, or NOT IN.

    Each parameter must be bound with a :class:`PackedSearchValue` type.
    """
    operator, negated = (
        (operators.not_in_op, operators.in_op) if negate else (operators.in_op, operators.not_in_op)
    )
    casts = [_cast_to_storage(parameter) for parameter in parameters]
    right = sa.sql.elements.ClauseList(*casts).self_group(against=operator)
    binary = sa.sql.elements.BinaryExpression(
        column,
        cast("ColumnElement[Any]", right),
        operator,
        type_=sa.sql.sqltypes.BOOLEANTYPE,
        negate=negated,
    )
    return PackedTokenSearch(binary)


def _cast_to_storage(parameter: ColumnElement[Any]) -> ColumnElement[Any]:
    # PostgreSQL types a NULL parameter as text and then finds no operator
    # "bytea = text". The cast gives the parameter the column's storage type.
    search_type = parameter.type
    assert isinstance(search_type, PackedSearchValue)
    return sa.cast(parameter, search_type.impl_instance)


@compiles(PackedTokenSearch)
def _compile_packed_token_search(element: PackedTokenSearch, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.left, **kw)
    operator = "NOT IN" if element.operator is operators.not_in_op else "IN"
    casts = list(element.right.element.clauses)
    if compiler.dialect.name in ("mysql", "mariadb"):
        # MySQL types a bound NULL as it needs, and a cast of a base64 value
        # would take the connection's collation, which MySQL cannot compare
        # with the column's ("Illegal mix of collations").
        casts = [cast_.clause for cast_ in casts]
    count = MAX_BOUND_LOOKUP_VERSIONS
    if not compiler.positional or compiler.dialect.name not in _VALUES_DIALECTS:
        # NOTE: a positional driver outside the VALUES dialects (mysqlclient)
        # binds and seals each of the slices' mentions of a parameter again.
        slices = [
            compiler.process(expression, **kw) for cast_ in casts for expression in _slices(cast_)
        ]
        return f"{column} {operator} ({', '.join(slices)})"
    rows = ", ".join(f"({compiler.process(cast_, **kw)})" for cast_ in casts)
    value = "encrypted_search_values.column1"
    size = f"(length({value}) / {count})"
    slots = ", ".join(f"({slot})" for slot in range(count))
    # Every part is compiler output or a constant of this module.
    subquery = (
        f"SELECT substr({value}, 1 + encrypted_search_slots.column1 * {size}, {size}) "  # noqa: S608
        f"FROM (VALUES {rows}) AS encrypted_search_values, "
        f"(VALUES {slots}) AS encrypted_search_slots"
    )
    return f"{column} {operator} ({subquery})"


class ExpandingTokenSearch(TokenSearch):
    """``column IN (...)`` over the slices of each element of an expanding parameter."""

    inherit_cache = True


def expanding_token_search(
    column: ColumnElement[Any],
    parameter: BindParameter[Any],
    column_type: DeterministicEncrypted[Any],
    negate: bool,
) -> ExpandingTokenSearch:
    """Return the lookup of the elements of the expanding ``parameter``."""
    # SQLAlchemy renders an empty list of an IN parameter as a fragment that
    # only fits "IN (...)": "NULL) AND (1 != 1". Without an IN operator it
    # renders an empty SELECT, which is a valid VALUES row.
    parameter = parameter._clone(maintain_key=True)
    parameter.expand_op = None
    # type_coerce() for the reason given in DeterministicEncrypted._retyped().
    rows = sa.type_coerce(parameter, _PackedSearchRow(column_type, skip_none=True))
    operator, negated = (
        (operators.not_in_op, operators.in_op) if negate else (operators.in_op, operators.not_in_op)
    )
    binary = sa.sql.elements.BinaryExpression(
        column, rows, operator, type_=sa.sql.sqltypes.BOOLEANTYPE, negate=negated
    )
    return ExpandingTokenSearch(binary)


@compiles(ExpandingTokenSearch)
def _compile_expanding_token_search(element: ExpandingTokenSearch, compiler: Any, **kw: Any) -> str:
    dialect = compiler.dialect.name
    if dialect not in _VALUES_DIALECTS:
        raise UnsupportedOperationError(
            f"an expanding bound parameter compared with a deterministic encrypted column is "
            f"not supported on {dialect}: pass a list of values or of bound parameters to "
            "in_() instead"
        )
    column = compiler.process(element.left, **kw)
    rows = compiler.process(element.right, **kw)
    # SQLAlchemy renders the expanding parameter in parentheses, which the
    # VALUES list must not have: "(__[POSTCOMPILE_e~~((~~REPL~~))~~])".
    if not (rows.startswith("(") and rows.endswith(")")):
        raise UnsupportedOperationError(
            "an expanding bound parameter compared with a deterministic encrypted column "
            "rendered in an unexpected form; pass a list of values to in_() instead"
        )
    count = MAX_BOUND_LOOKUP_VERSIONS
    value = "encrypted_search_values.column1"
    size = f"(length({value}) / {count})"
    slots = ", ".join(f"({slot})" for slot in range(count))
    operator = "NOT IN" if element.operator is operators.not_in_op else "IN"
    # Every part is compiler output or a constant of this module.
    subquery = (
        f"SELECT substr({value}, 1 + encrypted_search_slots.column1 * {size}, {size}) "  # noqa: S608
        f"FROM (VALUES {rows[1:-1]}) AS encrypted_search_values, "
        f"(VALUES {slots}) AS encrypted_search_slots WHERE {value} IS NOT NULL"
    )
    return f"{column} {operator} ({subquery})"
