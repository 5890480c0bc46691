"""Find the row that already contains a value of a unique deterministic constraint.

Shared by the flush check and the statement check of the unique guard.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..errors import DuplicateValueError
from ..keys import KeyPurpose
from ..row_tenant import tenant_column_of
from ..tenancy import tenant_scope
from ..types import DeterministicEncrypted

__all__ = ["duplicate_error", "find_holder", "needs_check", "other_row", "unique_groups"]


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


def needs_check(table: sa.Table, names: tuple[str, ...], tenant_id: str) -> bool:
    """Return True while a deterministic column of ``names`` has more than
    one decryptable key version for the tenant. With one version the
    database index rejects every duplicate itself."""
    for name in names:
        column_type = table.c[name].type
        if isinstance(column_type, DeterministicEncrypted):
            keys = column_type.key_provider.decryptable_keys(tenant_id, KeyPurpose.DETERMINISTIC)
            if len(keys) > 1:
                return True
    return False


def other_row(table: sa.Table, identity: Sequence[Any]) -> Any:
    """Return a condition that leaves out the row whose primary key is ``identity``."""
    pk = list(table.primary_key.columns)
    if len(pk) == 1:
        return pk[0] != identity[0]
    return sa.tuple_(*pk) != sa.tuple_(*identity)


def find_holder(
    session: Session,
    table: sa.Table,
    names: tuple[str, ...],
    values: Mapping[str, Any],
    tenant: str,
    *,
    exclude: sa.ColumnElement[bool] | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[Any, ...] | None:
    """Return the primary key of a row of ``tenant`` that contains
    ``values`` in the columns ``names`` under any decryptable key version,
    or None.

    ``exclude`` leaves out the rows being written. ``parameters`` are the
    statement's own, for the bound parameters that ``exclude`` uses.
    """
    conditions = [table.c[name] == values[name] for name in names]
    tenant_name = tenant_column_of(table)
    if tenant_name is not None and tenant_name not in names:
        conditions.append(table.c[tenant_name] == tenant)
    if exclude is not None:
        conditions.append(exclude)
    query = sa.select(*table.primary_key.columns).where(*conditions).limit(1)
    with tenant_scope(tenant), session.no_autoflush:
        found = session.execute(query, dict(parameters or {})).first()
    return None if found is None else tuple(found)


def duplicate_error(
    table: sa.Table,
    names: tuple[str, ...],
    tenant: str,
    existing: tuple[Any, ...],
    *,
    statement_row: str = "",
) -> DuplicateValueError:
    """Build the error for a value that the row ``existing`` already contains.

    ``statement_row`` names the row of a statement, such as "row 3 of the
    INSERT statement"; it is empty for a flushed object.
    """
    written = f" in {statement_row}" if statement_row else ""
    return DuplicateValueError(
        f"table {table.name}: the value of unique column(s) {', '.join(names)} for tenant "
        f"{tenant!r}{written} already exists in the row with primary key {existing}, possibly "
        "sealed under an older key version"
    )
