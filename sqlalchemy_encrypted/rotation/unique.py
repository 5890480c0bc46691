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
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapper, Session, sessionmaker

from ..row_tenant import tenant_column_of
from ..tenancy import current_tenant
from .unique_lookup import (
    Lookup,
    check_lookups,
    dialect_of,
    needs_check,
    other_row,
    unique_constraints,
    unique_groups,
)
from .unique_statements import check_statement

__all__ = [
    "check_unique_values",
    "install_unique_guard",
    "remove_unique_guard",
    "unique_groups",
]

GuardTarget = Session | sessionmaker[Any] | type[Session] | AsyncSession | async_sessionmaker[Any]

# The persistent rows of one flush that change a unique group, by table:
# each row's primary key and its values after the flush.
_Changes = dict[sa.Table, list[tuple[tuple[Any, ...], dict[str, Any]]]]


def check_unique_values(session: Session, obj: Any, changes: _Changes | None = None) -> None:
    """Raise :class:`DuplicateValueError` if another row contains the values of
    one of ``obj``'s unique deterministic constraints under any decryptable
    key version of its tenant.

    ``changes`` lists the rows that the same flush updates. A row that the
    flush changes away from the value no longer contains it afterwards, so
    the lookup leaves it out.
    """
    check_lookups(session, _lookups(session, obj, changes))


def _lookups(session: Session, obj: Any, changes: _Changes | None) -> list[Lookup]:
    """Return the lookups that :func:`check_unique_values` runs for ``obj``."""
    lookups: list[Lookup] = []
    state = sa.inspect(obj)
    mapper: Mapper[Any] = state.mapper
    table = mapper.local_table
    if not isinstance(table, sa.Table):
        return lookups
    groups = unique_constraints(table)
    if not groups:
        return lookups

    values, changed = _row_values(mapper, state)
    tenant_name = tenant_column_of(table)
    tenant = values.get(tenant_name) if tenant_name else None
    if not isinstance(tenant, str) or not tenant:
        tenant = current_tenant(table.name)
    dialect = dialect_of(session, table)

    for group in groups:
        names = group.names
        if not changed.intersection(names):
            continue
        if dialect in group.nulls_not_distinct:
            if all(values[name] is None for name in names):
                continue
        elif any(values[name] is None for name in names):
            continue
        if not needs_check(table, names, tenant):
            continue
        left_out = [] if state.key is None else [state.key[1]]
        for identity, after in (changes or {}).get(table, []):
            if any(name in after and after[name] != values[name] for name in names):
                left_out.append(identity)
        exclude = (
            sa.and_(*(other_row(table, identity) for identity in left_out)) if left_out else None
        )
        lookup = Lookup(
            table, names, values, tenant, exclude=exclude, predicate=group.predicate(dialect)
        )
        lookups.append(lookup)
    return lookups


def _row_values(mapper: Mapper[Any], state: Any) -> tuple[dict[str, Any], set[str]]:
    """Return the column values of ``state`` by column name, and the names of
    the columns that the flush writes."""
    values: dict[str, Any] = {}
    changed: set[str] = set()
    for column in mapper.local_table.columns:
        prop = mapper.get_property_by_column(column)
        values[column.name] = state.dict.get(prop.key)
        if state.key is None or prop.key in state.committed_state:
            changed.add(column.name)
    return values, changed


def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    written = [
        obj
        for obj in list(session.new) + list(session.dirty)
        if obj in session.new or session.is_modified(obj)
    ]
    changes: _Changes = {}
    for obj in written:
        state = sa.inspect(obj)
        table = state.mapper.local_table
        if state.key is not None and isinstance(table, sa.Table):
            # Only loaded attributes: an expired one is not known to change.
            after = {
                column.name: state.dict[prop.key]
                for column in table.columns
                if (prop := state.mapper.get_property_by_column(column)).key in state.dict
            }
            changes.setdefault(table, []).append((state.key[1], after))
    lookups: list[Lookup] = []
    for obj in written:
        lookups.extend(_lookups(session, obj, changes))
    check_lookups(session, lookups)


def _sync_target(
    target: GuardTarget, *, create: bool = False
) -> Session | sessionmaker[Any] | type[Session] | None:
    """Return the synchronous session, sessionmaker or class whose events
    the guard listens to for ``target``, or None for an async_sessionmaker
    that has no guard and ``create`` is not set.

    An :class:`AsyncSession` runs its work in its ``sync_session``. An
    :class:`async_sessionmaker` gets its own subclass of its
    ``sync_session_class`` when ``create`` is set, so the guard does not
    apply to every Session.
    """
    if isinstance(target, AsyncSession):
        return target.sync_session
    if isinstance(target, async_sessionmaker):
        sync_class: type[Session] = target.kw.get("sync_session_class") or Session
        if create and getattr(sync_class, "_unique_guard_maker", None) is not target:
            sync_class = type(
                "UniqueGuardedSession", (sync_class,), {"_unique_guard_maker": target}
            )
            # event.contains() can report the listeners of a collected class
            # whose id() the new class reuses, so listen without asking it.
            event.listen(sync_class, "before_flush", _before_flush)
            event.listen(sync_class, "do_orm_execute", check_statement)
            target.configure(sync_session_class=sync_class)
        if getattr(sync_class, "_unique_guard_maker", None) is not target:
            return None
        return sync_class
    if isinstance(target, (Session, sessionmaker)) or (
        isinstance(target, type) and issubclass(target, Session)
    ):
        return target
    raise TypeError(
        f"install_unique_guard() expects a Session, sessionmaker, Session class, "
        f"AsyncSession or async_sessionmaker, not {type(target).__name__}"
    )


def install_unique_guard(target: GuardTarget) -> None:
    """Check unique deterministic constraints before every flush of ``target``
    (a Session, a sessionmaker, a Session class, an AsyncSession or an
    async_sessionmaker) and before each INSERT and UPDATE statement it
    executes.

    The statements checked are ORM bulk INSERT and UPDATE by primary key
    (``session.execute(insert(Model), [...])``), ``insert().values()`` with
    one or many rows, ``update().where(...).values()``, and the PostgreSQL
    and SQLite ``on_conflict_do_update()`` and ``on_conflict_do_nothing()``,
    on a mapped class or a :class:`~sqlalchemy.Table`. Not checked:
    statements run on a Connection, raw SQL, ``insert().from_select()``, a
    value given as a SQL expression instead of a Python value, and the
    legacy ``Session.bulk_insert_mappings()``, ``bulk_update_mappings()``
    and ``bulk_save_objects()``, which fire no session event.
    """
    sync_target = _sync_target(target, create=True)
    assert sync_target is not None
    if not event.contains(sync_target, "before_flush", _before_flush):
        event.listen(sync_target, "before_flush", _before_flush)
    if not event.contains(sync_target, "do_orm_execute", check_statement):
        event.listen(sync_target, "do_orm_execute", check_statement)


def remove_unique_guard(target: GuardTarget) -> None:
    """Undo :func:`install_unique_guard` for ``target``."""
    sync_target = _sync_target(target)
    if sync_target is None:
        return
    target = sync_target
    if event.contains(target, "before_flush", _before_flush):
        event.remove(target, "before_flush", _before_flush)
    if event.contains(target, "do_orm_execute", check_statement):
        event.remove(target, "do_orm_execute", check_statement)
