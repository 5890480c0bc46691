"""Seal the values of INSERT and UPDATE statements under their rows' tenants.

:mod:`.row_tenant` calls :func:`bind_statement` for every INSERT and UPDATE
of a table that names a tenant column and has encrypted columns:

* a row that carries the tenant column, in the statement's parameters or
  in ``.values()``, is sealed under the tenant given there;
* an INSERT row that seals values but does not carry the tenant column is
  sealed under the column's scalar default, and raises
  :class:`TenantContextError` when the column has no default at all;
* the DO UPDATE of an upsert is limited by :func:`.limit_upsert`;
* an UPDATE whose WHERE clause requires ``tenant_column == value`` (a term
  joined by AND) only touches rows of that tenant, so its values are sealed
  under that tenant;
* any other UPDATE that seals values seals them under the tenant of the
  active scope, else the default tenant, and gets ``tenant_column =
  :tenant`` added to its WHERE clause, so it only touches rows of that
  tenant. Before an ORM bulk UPDATE by primary key, the primary keys are
  looked up, and a row of another tenant among them raises
  :class:`TenantContextError` before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql import operators
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList
from sqlalchemy.sql.lambdas import StatementLambdaElement
from sqlalchemy.util import immutabledict

from ._upsert_tenant import limit_upsert
from .errors import TenantContextError
from .tenancy import TenantBound, get_default_tenant, scoped_tenant
from .types import EncryptedType

__all__ = [
    "bind_statement",
    "dml_statement",
    "encrypted_keys",
    "resolve_lambda",
    "row_tenant",
    "target_table",
]

# Primary keys looked up per SELECT before an ORM bulk UPDATE by primary key,
# well below the bound parameter limits of SQLite (32766) and PostgreSQL (65535).
_LOOKUP_BATCH = 500
# Primary keys of other tenants' rows named in the error.
_NAMED_KEYS = 5


def row_tenant(table: sa.Table, tenant: Any) -> str:
    if not isinstance(tenant, str) or not tenant:
        raise TenantContextError(
            f"table {table.name}: the tenant column must hold a non-empty str for rows "
            "with encrypted values"
        )
    scoped = scoped_tenant()
    if scoped is not None and scoped != tenant:
        raise TenantContextError(
            f"table {table.name}: a row of tenant {tenant!r} was written inside "
            f"tenant_scope({scoped!r})"
        )
    return tenant


def encrypted_keys(table: sa.Table) -> list[str]:
    return [column.key for column in table.columns if isinstance(column.type, EncryptedType)]


def dml_statement(element: Any) -> Insert | Update | None:
    """Return the INSERT or UPDATE that ``element`` executes, or None.

    For a ``lambda_stmt()`` that is the statement its lambda built first,
    whose bound values may be those of another call: use it for the table
    only, and :func:`resolve_lambda` for the values of this call.
    """
    if isinstance(element, (Insert, Update)):
        return element
    if isinstance(element, StatementLambdaElement):
        # The cached statement, without the copy that _resolved makes for
        # this call's values, because most lambda statements are SELECTs.
        shape = element._rec.expected_expr
        if isinstance(shape, (Insert, Update)):
            return shape
    return None


def resolve_lambda(element: StatementLambdaElement) -> Insert | Update:
    """Return the statement a ``lambda_stmt()`` compiles to in this call,
    with this call's bound values."""
    resolved = element._resolved
    assert isinstance(resolved, (Insert, Update))
    return resolved


def target_table(statement: Insert | Update) -> Any:
    """Return the table the statement writes to.

    An ORM bulk UPDATE by primary key carries the table SQLAlchemy emits it
    for, one table of a joined inheritance hierarchy at a time, in the
    private ``_emit_update_table`` annotation (SQLAlchemy 2.0 and 2.1).
    """
    emitted = statement._annotations.get("_emit_update_table")
    return emitted if emitted is not None else statement.table


def bind_statement(
    conn: Connection,
    statement: Insert | Update,
    table: sa.Table,
    tenant_name: str,
    multiparams: list[Any],
    params: dict[str, Any],
) -> tuple[Insert | Update, list[Any], dict[str, Any]]:
    """Bind the encrypted values of one execution to their rows' tenants;
    return the statement and parameters to execute instead."""
    tenant_key = table.columns[tenant_name].key
    keys = encrypted_keys(table)
    statement = _bind_statement_values(statement, table, tenant_key, keys)
    param_keys = _param_keys(statement, keys)
    if multiparams:
        multiparams = [
            _bind_row(table, tenant_key, param_keys, row) if isinstance(row, dict) else row
            for row in multiparams
        ]
    if params:
        params = _bind_row(table, tenant_key, param_keys, params)

    rows = multiparams or ([params] if params else [])
    statement = _bind_values_to_row_tenant(statement, table, tenant_key, keys, rows)
    if isinstance(statement, Insert):
        statement, rows = _bind_rows_without_tenant(statement, table, tenant_key, keys, rows)
        if multiparams:
            multiparams = rows
        elif params:
            params = rows[0]
        statement = limit_upsert(statement, table, tenant_name, keys)
        return statement, multiparams, params

    dict_rows = [row for row in rows if isinstance(row, dict)]
    if len(dict_rows) < len(rows) or _carries_tenant(statement, tenant_key, dict_rows):
        return statement, multiparams, params
    statement, dict_rows = _limit_update(conn, statement, table, tenant_name, dict_rows)
    if multiparams:
        multiparams = dict_rows
    elif params:
        params = dict_rows[0]
    return statement, multiparams, params


# -- rows that name their tenant ------------------------------------------------


def _bind_row(
    table: sa.Table, tenant_key: str, keys: list[str], row: dict[str, Any]
) -> dict[str, Any]:
    if tenant_key not in row:
        return row
    tenant = row_tenant(table, row[tenant_key])
    return _bind_row_to(tenant, keys, row)


def _bind_values_to_row_tenant(
    statement: Insert | Update,
    table: sa.Table,
    tenant_key: str,
    keys: list[str],
    rows: list[Any],
) -> Insert | Update:
    """Bind encrypted values given to ``.values()`` to the tenant that the
    parameters of every row name.

    Such a value is sealed once for all the rows, so rows of several tenants
    raise :class:`TenantContextError`. Without this, it would be sealed under
    the scope's or the default tenant, whichever tenant the rows name.
    """
    row_tenants = [row[tenant_key] for row in rows if isinstance(row, dict) and tenant_key in row]
    if not row_tenants or len(row_tenants) < len(rows):
        return statement
    shared = [
        column
        for column, param in _values_of(statement).items()
        if _key_of(column) in keys
        and isinstance(param, BindParameter)
        and param.callable is None
        and param.value is not None
        and not isinstance(param.value, TenantBound)
    ]
    if not shared:
        return statement
    tenants = {row_tenant(table, tenant) for tenant in row_tenants}
    if len(tenants) > 1:
        columns = ", ".join(f"{table.name}.{_key_of(column)}" for column in shared)
        raise TenantContextError(
            f"table {table.name}: the value given to .values() for encrypted column(s) "
            f"{columns} is sealed once for all rows, but the rows name {len(tenants)} "
            f"tenants in {tenant_key!r}; execute the statement once per tenant, or put "
            "the value in each row's parameters"
        )
    return _bind_values_to(statement, tenants.pop(), keys)


def _bind_row_to(tenant: str, keys: list[str], row: dict[str, Any]) -> dict[str, Any]:
    bound = dict(row)
    for key in keys:
        value = bound.get(key)
        if value is not None and not isinstance(value, TenantBound) and key in bound:
            bound[key] = TenantBound(value, tenant)
    return bound


def _key_of(column: Any) -> Any:
    return getattr(column, "key", column)


def _values_of(statement: Insert | Update) -> dict[Any, Any]:
    """Return the values given to ``.values()`` or ``.ordered_values()``,
    which SQLAlchemy 2.0 keeps apart in ``_ordered_values``."""
    ordered = getattr(statement, "_ordered_values", None)
    if ordered:
        return dict(ordered)
    return dict(statement._values or {})


def _replace_values(statement: Insert | Update, replacements: dict[Any, Any]) -> Insert | Update:
    """Return a copy of ``statement`` with some of its values replaced.

    Set on a clone rather than through ``.values()``, because a statement
    resolved from ``lambda_stmt()`` keeps its values in a plain dict, which
    ``.values()`` cannot extend, and ``.ordered_values()`` cannot be called twice.
    """
    statement = statement._clone()
    ordered = getattr(statement, "_ordered_values", None)
    if ordered:
        statement._ordered_values = [  # type: ignore[union-attr]  # SQLAlchemy 2.0 only
            (column, replacements.get(column, value)) for column, value in ordered
        ]
    else:
        merged: dict[Any, Any] = dict(statement._values or {})
        merged.update(replacements)
        statement._values = immutabledict(merged)
    return statement


def _param_keys(statement: Insert | Update, keys: list[str]) -> list[str]:
    """Return the parameter names whose values go to encrypted columns: the
    columns' keys, and the names of bound parameters given to ``.values()``
    for them."""
    found = list(keys)
    for column, param in _values_of(statement).items():
        if _key_of(column) in keys and isinstance(param, BindParameter) and param.key not in found:
            found.append(param.key)
    return found


def _bind_statement_values(
    statement: Insert | Update, table: sa.Table, tenant_key: str, keys: list[str]
) -> Insert | Update:
    """Bind values given to ``.values()`` to the tenant given there too."""
    values = _values_of(statement)
    if values:
        params = {_key_of(column): (column, param) for column, param in values.items()}
        tenant_param = params.get(tenant_key, (None, None))[1]
        if isinstance(tenant_param, BindParameter) and tenant_param.callable is None:
            tenant = row_tenant(table, tenant_param.value)
            statement = _bind_values_to(statement, tenant, keys)
    multi_values = getattr(statement, "_multi_values", None)
    if multi_values:
        _check_multi_values(multi_values, table, tenant_key, keys)
    return statement


def _bind_values_to(statement: Insert | Update, tenant: str, keys: list[str]) -> Insert | Update:
    """Return ``statement`` with the encrypted values of its ``.values()``
    bound to ``tenant``."""
    replacements = {}
    for column, param in _values_of(statement).items():
        if (
            _key_of(column) in keys
            and isinstance(param, BindParameter)
            and param.callable is None
            and param.value is not None
            and not isinstance(param.value, TenantBound)
        ):
            # Untyped, as .values() makes it, so the column's type seals it.
            replacements[column] = sa.bindparam(
                None, TenantBound(param.value, tenant), type_=sa.types.NullType(), unique=True
            )
    if not replacements:
        return statement
    return _replace_values(statement, replacements)


def _check_multi_values(
    multi_values: Any, table: sa.Table, tenant_key: str, keys: list[str]
) -> None:
    """Reject a multi-row ``insert().values([...])`` whose rows belong to
    another tenant than the one its values would be sealed under."""
    sealing_tenant = scoped_tenant() or get_default_tenant()
    for rows in multi_values:
        for row in rows:
            if not isinstance(row, dict):
                continue
            by_key = {_key_of(column): value for column, value in row.items()}
            if not any(by_key.get(key) is not None for key in keys):
                continue
            if tenant_key in by_key:
                tenant = row_tenant(table, by_key[tenant_key])
            else:
                tenant_column = table.columns[tenant_key]
                tenant = _scalar_default(tenant_column)
                if tenant is None:
                    if _computed_default(tenant_column):
                        continue
                    sealing = [key for key in keys if by_key.get(key) is not None]
                    raise _missing_tenant_error(table, tenant_column, sealing)
                tenant = row_tenant(table, tenant)
            if sealing_tenant is None:
                raise TenantContextError(
                    f"table {table.name}: a multi-row insert().values([...]) seals all its "
                    "rows under one tenant, that of the active tenant_scope() or the default "
                    f"tenant, and neither is set, although its rows name their tenant in "
                    f"{tenant_key!r}. Pass the rows as a list of parameter dicts to execute() "
                    "instead, which seals each row under its own tenant"
                )
            if tenant != sealing_tenant:
                raise TenantContextError(
                    f"table {table.name}: a multi-row insert().values([...]) contains a row of "
                    f"tenant {tenant!r}, but its encrypted values would be sealed under "
                    f"{sealing_tenant!r}; pass the rows as a list of parameter dicts to "
                    "execute() instead, which seals each row under its own tenant"
                )


# -- INSERT rows that do not carry the tenant column ----------------------------


def _bind_rows_without_tenant(
    statement: Insert, table: sa.Table, tenant_key: str, keys: list[str], rows: list[Any]
) -> tuple[Insert, list[Any]]:
    """Bind the encrypted values of INSERT rows that do not carry the tenant
    column to its scalar default, or raise :class:`TenantContextError` when
    the column has no default, because the row would get a NULL tenant."""
    if any(_key_of(column) == tenant_key for column in _values_of(statement)):
        return statement, rows
    if any(not isinstance(row, dict) for row in rows):
        return statement, rows
    lacking = [index for index, row in enumerate(rows) if tenant_key not in row]
    if rows and not lacking:
        return statement, rows
    sealing = _keys_sealed_under_scope(statement, keys, [rows[index] for index in lacking])
    if not sealing:
        return statement, rows
    tenant_column = table.columns[tenant_key]
    tenant = _scalar_default(tenant_column)
    if tenant is None:
        if _computed_default(tenant_column):
            # NOTE: the default is computed when the row is written, so it
            # cannot be checked against the tenant the values are sealed under.
            return statement, rows
        raise _missing_tenant_error(table, tenant_column, sealing)
    tenant = row_tenant(table, tenant)
    param_keys = _param_keys(statement, keys)
    rows = list(rows)
    for index in lacking:
        rows[index] = _bind_row_to(tenant, param_keys, rows[index])
    if len(lacking) == len(rows):
        # Values given to .values() go to every row, so bind them only when no
        # row names another tenant.
        bound = _bind_values_to(statement, tenant, keys)
        assert isinstance(bound, Insert)
        statement = bound
    return statement, rows


def _scalar_default(column: sa.Column[Any]) -> Any:
    """Return the value of the column's scalar Python default, or None."""
    default = column.default
    if isinstance(default, sa.ColumnDefault) and default.is_scalar:
        return default.arg
    return None


def _computed_default(column: sa.Column[Any]) -> bool:
    """Return True when the column gets a value from a callable or SQL
    default, or from the database, in a row that does not set it."""
    return column.default is not None or column.server_default is not None


def _missing_tenant_error(
    table: sa.Table, tenant_column: sa.Column[Any], sealing: list[str]
) -> TenantContextError:
    columns = ", ".join(f"{table.name}.{key}" for key in sealing)
    tenant = scoped_tenant() or get_default_tenant()
    sealed_under = f"are sealed under {_scope_label(tenant)}" if tenant else "need a tenant"
    return TenantContextError(
        f"table {table.name}: an INSERT sets encrypted column(s) {columns} but not tenant "  # noqa: S608
        f"column {tenant_column.name!r}, which has no default, so the row would have a NULL "
        f"tenant while its values {sealed_under}. Put the row's tenant in "
        f"{tenant_column.key!r} of each row, or give the column a default"
    )


# -- UPDATE statements that do not carry the tenant column ------------------------


def _carries_tenant(statement: Update, tenant_key: str, rows: list[dict[str, Any]]) -> bool:
    """Return True when the statement sets the tenant column from a value it
    carries, so that its values were bound to that tenant."""
    if any(tenant_key in row for row in rows):
        return True
    for column, param in _values_of(statement).items():
        if _key_of(column) == tenant_key:
            return isinstance(param, BindParameter) and param.callable is None
    return False


def _limit_update(
    conn: Connection,
    statement: Update,
    table: sa.Table,
    tenant_name: str,
    rows: list[dict[str, Any]],
) -> tuple[Update, list[dict[str, Any]]]:
    """Seal the values of an UPDATE that does not set the tenant column
    under one tenant, and limit the UPDATE to that tenant's rows.

    The module docstring lists how the tenant is chosen.
    """
    keys = encrypted_keys(table)
    sealing = _keys_sealed_under_scope(statement, keys, rows)
    if not sealing:
        return statement, rows
    tenant_column = table.columns[tenant_name]
    pinned = _pinned_tenant(statement, tenant_column)
    if pinned is not None:
        bound = _bind_to_pinned_tenant(statement, table, keys, rows, pinned)
        if bound is not None:
            return bound
    tenant = scoped_tenant() or get_default_tenant()
    if tenant is None:
        raise _no_tenant_error(table, tenant_column, sealing)
    _check_bulk_rows(conn, statement, table, tenant_column, tenant, rows)
    return statement.where(tenant_column == tenant), rows


def _and_terms(clause: Any) -> Iterator[Any]:
    """Yield the terms of ``clause`` that are joined by AND at its top level."""
    if clause is None:
        return
    if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
        for term in clause.clauses:
            yield from _and_terms(term)
    else:
        yield clause


def _equality_binds(statement: Update) -> Iterator[tuple[sa.Column[Any], BindParameter[Any]]]:
    """Yield (column, bound parameter) for each ``column == parameter`` term
    of the statement's WHERE clause joined by AND at its top level."""
    for term in _and_terms(statement.whereclause):
        if not isinstance(term, BinaryExpression) or term.operator is not operators.eq:
            continue
        for column, other in ((term.left, term.right), (term.right, term.left)):
            if isinstance(column, sa.Column) and isinstance(other, BindParameter):
                yield column._deannotate(), other


def _pinned_tenant(statement: Update, tenant_column: sa.Column[Any]) -> BindParameter[Any] | None:
    """Return the parameter compared with the tenant column in the WHERE
    clause, so that every row the statement touches has that tenant."""
    target = tenant_column._deannotate()
    for column, param in _equality_binds(statement):
        if column is target:
            return param
    return None


def _bind_to_pinned_tenant(
    statement: Update,
    table: sa.Table,
    keys: list[str],
    rows: list[dict[str, Any]],
    pinned: BindParameter[Any],
) -> tuple[Update, list[dict[str, Any]]] | None:
    """Bind the values to the tenant the WHERE clause requires, or return
    None when that is not possible before execution."""
    param_keys = _param_keys(statement, keys)
    if rows and all(pinned.key in row for row in rows):
        # One tenant per parameter set, which only values in the parameters can follow.
        bound = [_bind_row_to(row_tenant(table, row[pinned.key]), param_keys, row) for row in rows]
        if _keys_sealed_under_scope(statement, keys, bound):
            return None
        return statement, bound
    if pinned.callable is not None or any(pinned.key in row for row in rows):
        return None
    tenant = row_tenant(table, pinned.value)
    bound_statement = _bind_values_to(statement, tenant, keys)
    assert isinstance(bound_statement, Update)
    return bound_statement, [_bind_row_to(tenant, param_keys, row) for row in rows]


def _keys_sealed_under_scope(
    statement: Insert | Update, keys: list[str], rows: list[dict[str, Any]]
) -> list[str]:
    """Return the encrypted columns that get a value not bound to a tenant,
    which the column type seals under the scope's or the default tenant."""
    sealed = []
    for key in keys:
        if any(_unbound(row.get(key)) for row in rows):
            sealed.append(key)
    for column, param in _values_of(statement).items():
        key = _key_of(column)
        if key not in keys or key in sealed or not isinstance(param, BindParameter):
            continue
        if param.callable is not None:
            sealed.append(key)
        elif any(param.key in row for row in rows):
            if any(_unbound(row.get(param.key)) for row in rows):
                sealed.append(key)
        elif _unbound(param.value):
            sealed.append(key)
    return sealed


def _unbound(value: Any) -> bool:
    return value is not None and not isinstance(value, TenantBound)


def _no_tenant_error(
    table: sa.Table, tenant_column: sa.Column[Any], sealing: list[str]
) -> TenantContextError:
    columns = ", ".join(f"{table.name}.{key}" for key in sealing)
    return TenantContextError(
        f"table {table.name}: no tenant is set to seal the new values of encrypted column(s) "
        f"{columns}, and the statement does not name the rows' tenant in tenant column "
        f"{tenant_column.name!r}. Run it inside tenant_scope(tenant_id), which limits it to "
        f"that tenant's rows, filter it with {table.name}.c.{tenant_column.key} == tenant_id, "
        f"or put each row's {tenant_column.key!r} in its parameter dict"
    )


def _scope_label(tenant: str) -> str:
    if scoped_tenant() is not None:
        return f"tenant_scope({tenant!r})"
    return f"default tenant {tenant!r}"


def _check_bulk_rows(
    conn: Connection,
    statement: Update,
    table: sa.Table,
    tenant_column: sa.Column[Any],
    tenant: str,
    rows: list[dict[str, Any]],
) -> None:
    """Raise :class:`TenantContextError` before an ORM bulk UPDATE by primary
    key that names a row of another tenant than ``tenant``.

    The added WHERE term would leave such a row as it is, and SQLAlchemy
    would raise ``StaleDataError`` only after the other rows were written.
    """
    if statement._annotations.get("_emit_update_table") is None or not rows:
        return
    binds = {column.name: param.key for column, param in _equality_binds(statement)}
    primary_key = [column.name for column in table.primary_key.columns]
    if not primary_key or not all(name in binds for name in primary_key):
        return
    columns = [table.c[name] for name in primary_key]
    requested = [tuple(row.get(binds[name]) for name in primary_key) for row in rows]
    foreign: list[tuple[Any, ...]] = []
    for start in range(0, len(requested), _LOOKUP_BATCH):
        batch = requested[start : start + _LOOKUP_BATCH]
        if len(columns) == 1:
            condition = columns[0].in_([key[0] for key in batch])
        else:
            condition = sa.tuple_(*columns).in_(batch)
        query = sa.select(*columns).where(
            condition, table.c[tenant_column.name].is_distinct_from(tenant)
        )
        foreign.extend(tuple(row) for row in conn.execute(query))
    if not foreign:
        return
    named = ", ".join(repr(key[0] if len(key) == 1 else key) for key in foreign[:_NAMED_KEYS])
    more = f" and {len(foreign) - _NAMED_KEYS} more" if len(foreign) > _NAMED_KEYS else ""
    raise TenantContextError(
        f"table {table.name}: an ORM bulk update by primary key in {_scope_label(tenant)} "
        f"names {len(foreign)} row(s) of another tenant (primary key {named}{more}), so "
        f"nothing was written. Its values are sealed under tenant {tenant!r} and may only "
        "go to that tenant's rows. Write each tenant's rows inside its own tenant_scope(), "
        f"or, outside any scope, put each row's {tenant_column.key!r} in its parameter dict"
    )
