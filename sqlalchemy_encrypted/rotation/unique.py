"""Keep unique deterministic columns unique while two key versions are in use.

A unique index on a :class:`DeterministicEncrypted` column compares stored
bytes. After a rotation the same value sealed under the old and the new key
version gives two different byte strings, so the index accepts a duplicate.
The re-encryption job finds it later, when the old row fails with an
integrity error, and reports it.

:func:`install_unique_guard` closes that gap for ORM writes: before each
flush it looks up every new or changed value of a unique constraint that
includes a deterministic column, matching it under every decryptable key
version of the row's tenant, and raises :class:`DuplicateValueError` when
another row holds it. The lookup runs only while the tenant has more than
one decryptable version; otherwise the database index is enough.

Limits: Core statements and raw SQL bypass the guard, and two transactions
that insert the same value at the same moment can both pass the check
unless they run under SERIALIZABLE isolation. Finishing the re-encryption
and retiring the old version ends the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Mapper, Session, sessionmaker

from ..errors import DuplicateValueError
from ..keys import KeyPurpose
from ..row_tenant import tenant_column_of
from ..tenancy import current_tenant, tenant_scope
from ..types import DeterministicEncrypted

__all__ = [
    "check_unique_values",
    "install_unique_guard",
    "remove_unique_guard",
    "unique_groups",
]

GuardTarget = Session | sessionmaker[Any] | type[Session]


def unique_groups(table: sa.Table) -> list[tuple[str, ...]]:
    """Return the column-name tuples of ``table``'s unique constraints and
    unique indexes that include a deterministic encrypted column."""
    groups: list[tuple[str, ...]] = []
    candidates: list[Sequence[sa.Column[Any]]] = []
    for constraint in table.constraints:
        if isinstance(constraint, sa.UniqueConstraint):
            candidates.append(list(constraint.columns))
    for index in table.indexes:
        if index.unique:
            candidates.append([c for c in index.columns if isinstance(c, sa.Column)])
    for column in table.columns:
        if column.unique:
            candidates.append([column])
    for columns in candidates:
        names = tuple(column.name for column in columns)
        if names in groups:
            continue
        if any(isinstance(column.type, DeterministicEncrypted) for column in columns):
            groups.append(names)
    return groups


def _needs_check(table: sa.Table, names: tuple[str, ...], tenant_id: str) -> bool:
    for name in names:
        column_type = table.c[name].type
        if isinstance(column_type, DeterministicEncrypted):
            keys = column_type.key_provider.decryptable_keys(tenant_id, KeyPurpose.DETERMINISTIC)
            if len(keys) > 1:
                return True
    return False


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
        if not _needs_check(table, names, tenant):
            continue
        conditions = [table.c[name] == values[name] for name in names]
        if tenant_name is not None and tenant_name not in names:
            conditions.append(table.c[tenant_name] == tenant)
        if state.key is not None:
            conditions.append(_other_row(table, state.key[1]))
        query = sa.select(*table.primary_key.columns).where(*conditions).limit(1)
        with tenant_scope(tenant), session.no_autoflush:
            found = session.execute(query).first()
        if found is not None:
            raise DuplicateValueError(
                f"table {table.name}: the value of unique column(s) {', '.join(names)} for "
                f"tenant {tenant!r} already exists in the row with primary key "
                f"{tuple(found)}, possibly sealed under an older key version"
            )


def _other_row(table: sa.Table, identity: Sequence[Any]) -> Any:
    pk = list(table.primary_key.columns)
    if len(pk) == 1:
        return pk[0] != identity[0]
    return sa.tuple_(*pk) != sa.tuple_(*identity)


def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    for obj in list(session.new) + list(session.dirty):
        if session.is_modified(obj) or obj in session.new:
            check_unique_values(session, obj)


def install_unique_guard(target: GuardTarget) -> None:
    """Check unique deterministic constraints before every flush of ``target``
    (a Session, a sessionmaker or a Session class)."""
    if not event.contains(target, "before_flush", _before_flush):
        event.listen(target, "before_flush", _before_flush)


def remove_unique_guard(target: GuardTarget) -> None:
    """Undo :func:`install_unique_guard` for ``target``."""
    if event.contains(target, "before_flush", _before_flush):
        event.remove(target, "before_flush", _before_flush)
