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

Statements that do not carry the tenant column (a Core ``update()`` by
primary key, an ORM bulk update without the tenant key, a ``lambda_stmt``)
seal under the tenant of the active scope, else the default tenant. Such a
statement must only touch rows of that tenant, for example by filtering on
the tenant column.

An ORM flush that changes an object's tenant column seals every encrypted
value of the object again under the new tenant. The row then stays readable
and searchable for its new tenant, and a shred of the old tenant leaves it
intact. A statement that changes only the tenant column does not do this:
its values stay sealed under the old tenant.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapper, attributes
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.sql.elements import BindParameter

from .errors import TenantContextError
from .tenancy import TenantBound, get_default_tenant, scoped_tenant
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


def _row_tenant(table: sa.Table, tenant: Any) -> str:
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


def _encrypted_keys(table: sa.Table) -> list[str]:
    return [column.key for column in table.columns if isinstance(column.type, EncryptedType)]


def _bind_row(
    table: sa.Table, tenant_key: str, keys: list[str], row: dict[str, Any]
) -> dict[str, Any]:
    if tenant_key not in row:
        return row
    tenant = _row_tenant(table, row[tenant_key])
    bound = dict(row)
    for key in keys:
        value = bound.get(key)
        if value is not None and not isinstance(value, TenantBound) and key in bound:
            bound[key] = TenantBound(value, tenant)
    return bound


def _key_of(column: Any) -> Any:
    return getattr(column, "key", column)


def _bind_statement_values(
    statement: Insert | Update, table: sa.Table, tenant_key: str, keys: list[str]
) -> Insert | Update:
    """Bind values given to ``.values()`` to the tenant given there too."""
    values = statement._values
    if values:
        params = {_key_of(column): (column, param) for column, param in values.items()}
        tenant_param = params.get(tenant_key, (None, None))[1]
        if isinstance(tenant_param, BindParameter) and tenant_param.callable is None:
            tenant = _row_tenant(table, tenant_param.value)
            replacements = {}
            for key in keys:
                column, param = params.get(key, (None, None))
                if (
                    isinstance(param, BindParameter)
                    and param.callable is None
                    and param.value is not None
                    and not isinstance(param.value, TenantBound)
                ):
                    replacements[column] = TenantBound(param.value, tenant)
            if replacements:
                statement = statement.values(replacements)
    multi_values = getattr(statement, "_multi_values", None)
    if multi_values:
        _check_multi_values(multi_values, table, tenant_key, keys)
    return statement


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
            if tenant_key not in by_key or not any(by_key.get(key) is not None for key in keys):
                continue
            tenant = _row_tenant(table, by_key[tenant_key])
            if tenant != sealing_tenant:
                raise TenantContextError(
                    f"table {table.name}: a multi-row insert().values([...]) holds a row of "
                    f"tenant {tenant!r}, but its encrypted values would be sealed under "
                    f"{sealing_tenant!r}; pass the rows as a list of parameter dicts to "
                    "execute() instead, which seals each row under its own tenant"
                )


@event.listens_for(Engine, "before_execute", retval=True)
def _before_execute(
    conn: Connection,
    clauseelement: Any,
    multiparams: Any,
    params: Any,
    execution_options: Any,
) -> tuple[Any, Any, Any]:
    if not isinstance(clauseelement, (Insert, Update)):
        return clauseelement, multiparams, params
    table = clauseelement.table
    tenant_name = tenant_column_of(table)
    if tenant_name is None or not isinstance(table, sa.Table):
        return clauseelement, multiparams, params
    tenant_key = table.columns[tenant_name].key
    keys = _encrypted_keys(table)
    if not keys:
        return clauseelement, multiparams, params
    clauseelement = _bind_statement_values(clauseelement, table, tenant_key, keys)
    if multiparams:
        multiparams = [
            _bind_row(table, tenant_key, keys, row) if isinstance(row, dict) else row
            for row in multiparams
        ]
    if params:
        params = _bind_row(table, tenant_key, keys, params)
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
    tenant_name = tenant_column_of(table)
    if tenant_name is None or not isinstance(table, sa.Table):
        return
    tenant_prop = mapper.get_property_by_column(table.columns[tenant_name])
    tenant = _row_tenant(table, state.dict.get(tenant_prop.key))
    _reseal_moved_row(mapper, state, table, tenant_prop.key, tenant)
    for column in table.columns:
        if not isinstance(column.type, EncryptedType):
            continue
        prop = mapper.get_property_by_column(column)
        if prop.key in state.committed_state:
            value = state.dict.get(prop.key)
            if value is not None and not isinstance(value, TenantBound):
                state.dict[prop.key] = TenantBound(value, tenant)


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
    if tenant_name is None or not isinstance(table, sa.Table) or not _encrypted_keys(table):
        return
    if tenant_name not in table.columns:
        return
    key = mapper.get_property_by_column(table.columns[tenant_name]).key
    attribute = getattr(class_, key)
    if not event.contains(attribute, "set", _keep_previous_tenant):
        event.listen(attribute, "set", _keep_previous_tenant, active_history=True)


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
