"""Seal each row under its own tenant when its table has a tenant column.

A table names its tenant column in ``Table.info``::

    class Person(Base):
        __tablename__ = "persons"
        __table_args__ = {"info": {"tenant_column": "tenant_id"}}

Then every INSERT or UPDATE that carries the tenant column (ORM flushes,
ORM bulk statements, Core ``executemany`` and values given to
``insert().values()``) seals each row's encrypted values under that row's
tenant. ORM updates that do not change the tenant column take it from the
loaded object. A row whose tenant differs from an active
:func:`tenant_scope` raises :class:`TenantContextError`.

An INSERT row that sets encrypted columns but not the tenant column raises
:class:`TenantContextError` before any SQL is sent, because the row would
get a NULL tenant. A scalar default of the tenant column (``default="acme"``)
is the row's tenant. A callable or SQL default, or a ``server_default``, is
computed only when the row is written: the values are sealed under the
tenant of the active scope, else the default tenant, and the column's
default must give that same tenant.

An upsert (``INSERT ... ON CONFLICT DO UPDATE`` of the PostgreSQL and SQLite
dialects) whose SET clause gives encrypted columns a value other than NULL
gets ``tenant_column = excluded.tenant_column`` added to its DO UPDATE's
WHERE clause, joined by AND to the WHERE clause it has. A value written in
the SET clause itself, rather than taken from ``stmt.excluded``, is sealed
under the tenant of the active scope, else the default tenant, so
``tenant_column = :tenant`` is added too, and with no tenant at all it
raises :class:`TenantContextError`. A conflicting row of another tenant is
then left as it is and the new row is not inserted, without an error.
``.returning()`` returns no row for it. An ``ON DUPLICATE KEY UPDATE``
(MySQL and MariaDB) that sets encrypted columns raises
:class:`UnsupportedOperationError`, because it has no WHERE clause.

An UPDATE that sets encrypted columns but not the tenant column seals its
values under one tenant, and touches only rows of that tenant:

* when its WHERE clause requires ``tenant_column == value`` (a term joined
  by AND), under that tenant, also outside any scope;
* otherwise under the tenant of the active scope, else the default tenant,
  and ``tenant_column = :tenant`` is added to its WHERE clause. Rows of
  other tenants are left as they are, and ``rowcount`` counts only the rows
  changed. With no tenant at all it raises :class:`TenantContextError`.

This applies to Core and ORM statements, ``executemany``, ``lambda_stmt()``
and statements with ``.returning()``. An UPDATE that only sets encrypted
columns to NULL needs no tenant and is not limited. An ORM bulk UPDATE by
primary key (``session.execute(update(Model), [...])``) first looks up its
primary keys, one SELECT per 500 rows, and raises
:class:`TenantContextError` before anything is written when one of them is
a row of another tenant. The legacy ``Session.bulk_update_mappings()`` has
no such lookup: SQLAlchemy raises ``StaleDataError`` and rolls back the
session's transaction.

NOTE: an ORM UPDATE with ``synchronize_session="evaluate"`` (the first
choice of the default, ``"auto"``) also sets the new values on matching
objects of other tenants already loaded in the session, although their rows
were not changed. Use ``synchronize_session="fetch"`` in a session that
holds objects of several tenants.

An ORM flush that changes an object's tenant column seals every encrypted
value of the object again under the new tenant. The row then stays readable
and searchable for its new tenant, and a shred of the old tenant leaves it
intact. A statement that changes only the tenant column does not do this:
its values stay sealed under the old tenant. ``sqlalchemy-encrypted status``
counts such values, and ``sqlalchemy-encrypted reencrypt
--move-to-row-tenant`` seals them under their row's tenant.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapper, attributes
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.lambdas import StatementLambdaElement

from ._statement_tenant import (
    bind_statement,
    dml_statement,
    encrypted_keys,
    resolve_lambda,
    row_tenant,
    target_table,
)
from .errors import TenantContextError
from .tenancy import TenantBound
from .types import EncryptedType

__all__ = ["TENANT_COLUMN_INFO_KEY", "tenant_column_of"]

TENANT_COLUMN_INFO_KEY = "tenant_column"


def tenant_column_of(table: Any) -> str | None:
    """Return the name of the table's tenant column, or None."""
    info = getattr(table, "info", None)
    if not info:
        return None
    name = info.get(TENANT_COLUMN_INFO_KEY)
    return name if isinstance(name, str) else None


@event.listens_for(Engine, "before_execute", retval=True)
def _before_execute(
    conn: Connection,
    clauseelement: Any,
    multiparams: Any,
    params: Any,
    execution_options: Any,
) -> tuple[Any, Any, Any]:
    statement = dml_statement(clauseelement)
    if statement is None:
        return clauseelement, multiparams, params
    table = target_table(statement)
    tenant_name = tenant_column_of(table)
    if tenant_name is None or not isinstance(table, sa.Table) or not encrypted_keys(table):
        return clauseelement, multiparams, params
    if isinstance(clauseelement, StatementLambdaElement):
        statement = resolve_lambda(clauseelement)
    bound, multiparams, params = bind_statement(
        conn, statement, table, tenant_name, multiparams, params
    )
    if bound is not statement:
        # A lambda_stmt() is replaced by the statement it resolved to.
        clauseelement = bound
    return clauseelement, multiparams, params


def _reseal_moved_row(
    mapper: Mapper[Any], state: InstanceState[Any], table: sa.Table, tenant_key: str, tenant: str
) -> None:
    """Mark every encrypted attribute of an object whose tenant column
    changed as modified, so the flush seals it under the new tenant."""
    if tenant_key not in state.committed_state:
        return
    # The previous tenant, or a loader sentinel when it was never loaded.
    previous = state.committed_state[tenant_key]
    if previous == tenant:
        return
    for column in table.columns:
        if not isinstance(column.type, EncryptedType):
            continue
        key = mapper.get_property_by_column(column).key
        if key not in state.dict:
            was = f"tenant {previous!r}" if isinstance(previous, str) else "an unknown tenant"
            raise TenantContextError(
                f"table {table.name}: a row moves from {was} to tenant {tenant!r}, but "
                f"encrypted column {column.type.column_identity} is not loaded, so its value "
                "cannot be sealed under the new tenant's key; load the object's encrypted "
                "attributes (for example with session.refresh()) before changing its tenant"
            )
        if state.dict[key] is not None and key not in state.committed_state:
            obj = state.obj()
            if obj is not None:
                attributes.flag_modified(obj, key)


def _wrap_changed(mapper: Mapper[Any], state: InstanceState[Any]) -> None:
    """Bind the changed encrypted attributes of an updated object to its tenant."""
    table = mapper.local_table
    tenant_key = _tenant_key(mapper)
    if tenant_key is None or not isinstance(table, sa.Table):
        return
    tenant = row_tenant(table, state.dict.get(tenant_key))
    _reseal_moved_row(mapper, state, table, tenant_key, tenant)
    for column in table.columns:
        if not isinstance(column.type, EncryptedType):
            continue
        prop = mapper.get_property_by_column(column)
        if prop.key in state.committed_state:
            value = state.dict.get(prop.key)
            if value is not None and not isinstance(value, TenantBound):
                state.dict[prop.key] = TenantBound(value, tenant)


def _tenant_key(mapper: Mapper[Any]) -> str | None:
    """Return the attribute key of the tenant column of the mapper's table, or None."""
    table = mapper.local_table
    tenant_name = tenant_column_of(table)
    if tenant_name is None or not isinstance(table, sa.Table):
        return None
    return mapper.get_property_by_column(table.columns[tenant_name]).key


def _unwrap(state: InstanceState[Any]) -> None:
    for key, value in list(state.dict.items()):
        if isinstance(value, TenantBound):
            state.dict[key] = value.value


def _keep_previous_tenant(target: Any, value: Any, oldvalue: Any, initiator: Any) -> None:
    """Do nothing: registered only for its ``active_history``."""


@event.listens_for(Mapper, "mapper_configured")
def _track_tenant_changes(mapper: Mapper[Any], class_: type[Any]) -> None:
    """Make setting the tenant column load the previous tenant (and the
    object's other expired attributes), so a flush can tell a moved row."""
    table = mapper.local_table
    tenant_name = tenant_column_of(table)
    if tenant_name is None or not isinstance(table, sa.Table) or not encrypted_keys(table):
        return
    if tenant_name not in table.columns:
        return
    key = mapper.get_property_by_column(table.columns[tenant_name]).key
    attribute = getattr(class_, key)
    if not event.contains(attribute, "set", _keep_previous_tenant):
        event.listen(attribute, "set", _keep_previous_tenant, active_history=True)


@event.listens_for(sa.orm.Session, "before_flush")
def _load_unloaded_tenants(session: sa.orm.Session, flush_context: Any, instances: Any) -> None:
    """Load the tenant column of each changed object that has not loaded it.

    ``commit()`` expires every attribute and ``load_only()`` or ``defer()``
    leave columns unloaded, so an object can carry new encrypted values
    without its tenant. The mapper's ``before_update`` hook cannot load
    attributes, so they are loaded here, where the ORM still may.
    """
    for obj in list(session.dirty):
        state = sa.inspect(obj)
        if state.key is None:
            continue
        mapper = state.mapper
        table = mapper.local_table
        tenant_name = tenant_column_of(table)
        # A misnamed tenant column is left to the update hook, which reports it.
        if tenant_name is None or tenant_name not in table.columns:
            continue
        tenant_key = _tenant_key(mapper)
        if tenant_key is None or tenant_key in state.dict:
            continue
        changed = any(
            mapper.get_property_by_column(column).key in state.committed_state
            for column in table.columns
            if isinstance(column.type, EncryptedType)
        )
        if changed:
            # Loads the expired or deferred tenant column, and with it the
            # object's other expired attributes. Changed values are kept.
            getattr(obj, tenant_key)


@event.listens_for(Mapper, "before_update")
def _before_update(mapper: Mapper[Any], connection: Connection, target: Any) -> None:
    _wrap_changed(mapper, sa.inspect(target))


@event.listens_for(Mapper, "after_update")
def _after_update(mapper: Mapper[Any], connection: Connection, target: Any) -> None:
    _unwrap(sa.inspect(target))


@event.listens_for(sa.orm.Session, "after_soft_rollback")
def _after_soft_rollback(session: sa.orm.Session, previous_transaction: Any) -> None:
    # A failed flush may leave wrapped values on objects it did not finish.
    for obj in list(session.identity_map.values()) + list(session.new):
        _unwrap(sa.inspect(obj))
