"""Keep the UPDATE part of an upsert on the rows of the inserted row's tenant.

``INSERT ... ON CONFLICT DO UPDATE`` (PostgreSQL and SQLite) updates the row
that already has the conflicting key, whatever its tenant. Its SET clause
writes the inserted row's values, sealed under the inserted row's tenant
(``excluded.column``), or values given in the statement, sealed under the
tenant of the active scope or the default tenant. :func:`limit_upsert` adds
to the DO UPDATE's WHERE clause that the existing row has the inserted row's
tenant, and for values given in the statement also that it has the sealing
tenant. A conflicting row of another tenant is then left as it is and the
inserted row is not stored, as with ``DO NOTHING``.

MySQL and MariaDB give ``ON DUPLICATE KEY UPDATE`` no WHERE clause, so an
upsert there that writes encrypted columns raises
:class:`UnsupportedOperationError`.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql.dml import OnDuplicateClause
from sqlalchemy.dialects.postgresql.dml import OnConflictDoUpdate as PostgresDoUpdate
from sqlalchemy.dialects.sqlite.dml import OnConflictDoUpdate as SqliteDoUpdate
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import BindParameter, Null

from .errors import TenantContextError, UnsupportedOperationError
from .tenancy import TenantBound, get_default_tenant, scoped_tenant

__all__ = ["limit_upsert"]


def limit_upsert(statement: Insert, table: sa.Table, tenant_name: str, keys: list[str]) -> Insert:
    """Return ``statement`` with its DO UPDATE limited to rows of the
    tenants its encrypted values are sealed under.

    Raises :class:`UnsupportedOperationError` for an ``ON DUPLICATE KEY
    UPDATE`` that writes encrypted columns, and :class:`TenantContextError`
    for a DO UPDATE that seals values given in the statement while no tenant
    is set.
    """
    clause = getattr(statement, "_post_values_clause", None)
    if isinstance(clause, OnDuplicateClause):
        _reject_on_duplicate_key(clause, table, tenant_name, keys)
        return statement
    if not isinstance(clause, (PostgresDoUpdate, SqliteDoUpdate)):
        return statement
    sealed = _sealed_values(clause.update_values_to_set, table, keys)
    if not sealed:
        return statement

    tenant_column = table.columns[tenant_name]
    excluded = statement.excluded  # type: ignore[attr-defined]  # PostgreSQL and SQLite Insert
    terms: list[Any] = [tenant_column == excluded[tenant_column.key]]
    literal_keys = [key for key, value in sealed.items() if _holds_bound_value(value)]
    if literal_keys:
        tenant = scoped_tenant() or get_default_tenant()
        if tenant is None:
            raise _no_tenant_error(table, tenant_column, literal_keys)
        terms.append(tenant_column == tenant)
    if clause.update_whereclause is not None:
        terms.append(clause.update_whereclause)

    limited = clause._clone()
    limited.update_whereclause = sa.and_(*terms)
    statement = statement._clone()
    statement._post_values_clause = limited
    return statement


def _column_key(table: sa.Table, key: Any) -> str | None:
    """Return the key of the table column that a SET key names, matched as
    SQLAlchemy's compilers match it: by column key, or by the column itself."""
    if isinstance(key, str):
        return key if key in table.columns else None
    column = getattr(key, "_deannotate", lambda: key)()
    for candidate in table.columns:
        if candidate is column:
            return str(candidate.key)
    return None


def _sealed_values(set_values: Any, table: sa.Table, keys: list[str]) -> dict[str, Any]:
    """Return ``{column key: expression}`` for the encrypted columns that the
    SET clause gives a value other than NULL."""
    sealed = {}
    for key, value in dict(set_values).items():
        column_key = _column_key(table, key)
        if column_key is None or column_key not in keys or _is_null(value):
            continue
        sealed[column_key] = value
    return sealed


def _is_null(value: Any) -> bool:
    if value is None or isinstance(value, Null):
        return True
    return isinstance(value, BindParameter) and value.callable is None and value.value is None


def _holds_bound_value(value: Any) -> bool:
    """Return True when an expression contains a bound value, which the
    column type seals under the scope's or the default tenant."""
    if not isinstance(value, sa.ClauseElement):
        return not isinstance(value, TenantBound)
    for element in visitors.iterate(value):
        if not isinstance(element, BindParameter):
            continue
        if element.callable is not None or not isinstance(element.value, TenantBound):
            return True
    return False


def _no_tenant_error(
    table: sa.Table, tenant_column: sa.Column[Any], literal_keys: list[str]
) -> TenantContextError:
    columns = ", ".join(f"{table.name}.{key}" for key in literal_keys)
    return TenantContextError(
        f"table {table.name}: the DO UPDATE SET of an upsert gives encrypted column(s) "  # noqa: S608
        f"{columns} a value of its own, which is sealed under the tenant of the active "
        "tenant_scope() or the default tenant, and neither is set. Run it inside "
        "tenant_scope(tenant_id), or set the column from the inserted row with "
        f"stmt.excluded.<column>, which is sealed under the tenant in {tenant_column.key!r}"
    )


def _reject_on_duplicate_key(
    clause: OnDuplicateClause, table: sa.Table, tenant_name: str, keys: list[str]
) -> None:
    sealed = _sealed_values(clause.update, table, keys)
    if not sealed:
        return
    columns = ", ".join(f"{table.name}.{key}" for key in sealed)
    raise UnsupportedOperationError(
        f"table {table.name}: INSERT ... ON DUPLICATE KEY UPDATE sets encrypted column(s) "  # noqa: S608
        f"{columns}, but MySQL and MariaDB give it no WHERE clause, so it cannot be limited "
        f"to an existing row of the same tenant in {tenant_name!r} and could store values "
        "sealed under one tenant's key in another tenant's row. Update only plain columns "
        "there, or look the row up inside tenant_scope() and INSERT or UPDATE it"
    )
