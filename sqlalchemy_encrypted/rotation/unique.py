"""Keep unique deterministic columns unique while two key versions are in use.

A unique index on a :class:`DeterministicEncrypted` column compares stored
bytes. After a rotation the same value sealed under the old and the new key
version gives two different byte strings, so the index accepts a duplicate.
The re-encryption job finds it later, when the old row fails with an
integrity error, and reports it.

:func:`install_unique_guard` closes that gap for writes through a
session. Before each flush, and before each INSERT or UPDATE statement the
session executes, it looks up every new or changed value of a unique
constraint that includes a deterministic column. The lookup matches the
value under every decryptable key version of the row's tenant and raises
:class:`DuplicateValueError` when another row contains it. It runs only
while the tenant has more than one decryptable version, because otherwise
the database index is enough.

Limits: the writes that :func:`install_unique_guard` lists as not checked
bypass the guard. Two transactions that insert the same value at the same
moment can both pass the check unless they run under SERIALIZABLE
isolation. Finishing the re-encryption and retiring the old version ends
the window.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Mapper, Session, sessionmaker

from ..row_tenant import tenant_column_of
from ..tenancy import current_tenant
from .unique_lookup import duplicate_error, find_holder, needs_check, other_row, unique_groups
from .unique_statements import check_statement

__all__ = [
    "check_unique_values",
    "install_unique_guard",
    "remove_unique_guard",
    "unique_groups",
]

GuardTarget = Session | sessionmaker[Any] | type[Session]


def check_unique_values(session: Session, obj: Any) -> None:
    """Raise :class:`DuplicateValueError` if another row contains the values of
    one of ``obj``'s unique deterministic constraints under any decryptable
    key version of its tenant."""
    state = sa.inspect(obj)
    mapper: Mapper[Any] = state.mapper
    table = mapper.local_table
    if not isinstance(table, sa.Table):
        return
    groups = unique_groups(table)
    if not groups:
        return

    tenant_name = tenant_column_of(table)
    values: dict[str, Any] = {}
    changed: set[str] = set()
    for column in table.columns:
        prop = mapper.get_property_by_column(column)
        values[column.name] = state.dict.get(prop.key)
        if state.key is None or prop.key in state.committed_state:
            changed.add(column.name)
    tenant = values.get(tenant_name) if tenant_name else None
    if not isinstance(tenant, str) or not tenant:
        tenant = current_tenant(table.name)

    for names in groups:
        if not changed.intersection(names) or any(values[name] is None for name in names):
            continue
        if not needs_check(table, names, tenant):
            continue
        exclude = None if state.key is None else other_row(table, state.key[1])
        existing = find_holder(session, table, names, values, tenant, exclude=exclude)
        if existing is not None:
            raise duplicate_error(table, names, tenant, existing)


def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    for obj in list(session.new) + list(session.dirty):
        if session.is_modified(obj) or obj in session.new:
            check_unique_values(session, obj)


def install_unique_guard(target: GuardTarget) -> None:
    """Check unique deterministic constraints before every flush of ``target``
    (a Session, a sessionmaker or a Session class) and before each INSERT
    and UPDATE statement it executes.

    The statements checked are ORM bulk INSERT and UPDATE by primary key
    (``session.execute(insert(Model), [...])``), ``insert().values()`` with
    one or many rows, and ``update().where(...).values()``, on a mapped
    class or a :class:`~sqlalchemy.Table`. Not checked: statements run on a
    Connection, raw SQL, ``insert().from_select()``, a value given as a SQL
    expression instead of a Python value, and the legacy
    ``Session.bulk_insert_mappings()``, ``bulk_update_mappings()`` and
    ``bulk_save_objects()``, which fire no session event.
    """
    if not event.contains(target, "before_flush", _before_flush):
        event.listen(target, "before_flush", _before_flush)
    if not event.contains(target, "do_orm_execute", check_statement):
        event.listen(target, "do_orm_execute", check_statement)


def remove_unique_guard(target: GuardTarget) -> None:
    """Undo :func:`install_unique_guard` for ``target``."""
    if event.contains(target, "before_flush", _before_flush):
        event.remove(target, "before_flush", _before_flush)
    if event.contains(target, "do_orm_execute", check_statement):
        event.remove(target, "do_orm_execute", check_statement)
