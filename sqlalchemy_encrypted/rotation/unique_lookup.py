"""Find the row that already contains a value of a unique deterministic constraint.

Shared by the flush check and the statement check of the unique guard.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import BindParameter

from ..errors import DuplicateValueError
from ..keys import KeyPurpose
from ..row_tenant import tenant_column_of
from ..tenancy import tenant_scope
from ..types import DeterministicEncrypted

__all__ = [
    "Lookup",
    "UniqueGroup",
    "check_lookups",
    "dialect_of",
    "duplicate_error",
    "find_holder",
    "needs_check",
    "other_row",
    "unique_constraints",
    "unique_groups",
]


@dataclass(frozen=True)
class UniqueGroup:
    """A unique constraint or unique index that includes a deterministic column.

    ``where`` maps a dialect name to the predicate of a partial index
    (``postgresql_where=``, ``sqlite_where=``). ``nulls_not_distinct``
    names the dialects on which NULL equals NULL in the constraint
    (``postgresql_nulls_not_distinct=True``).
    """

    names: tuple[str, ...]
    constraint_name: str | None = None
    where: Mapping[str, Any] = field(default_factory=dict)
    nulls_not_distinct: frozenset[str] = frozenset()

    def predicate(self, dialect: str) -> Any:
        """Return the partial index predicate on ``dialect``, or None for a
        constraint that covers every row there."""
        return self.where.get(dialect)


def _dialect_options(item: sa.Index | sa.UniqueConstraint) -> tuple[dict[str, Any], frozenset[str]]:
    where: dict[str, Any] = {}
    nulls_not_distinct: set[str] = set()
    for dialect, options in item.dialect_options.items():
        if options.get("where") is not None:
            where[dialect] = options["where"]
        if options.get("nulls_not_distinct"):
            nulls_not_distinct.add(dialect)
    return where, frozenset(nulls_not_distinct)


def unique_constraints(table: sa.Table) -> list[UniqueGroup]:
    """Return ``table``'s unique constraints and unique indexes that include
    a deterministic encrypted column, one per column tuple. A constraint
    that covers every row wins over a partial index on the same columns."""
    candidates: list[tuple[Sequence[sa.Column[Any]], UniqueGroup]] = []
    for constraint in table.constraints:
        if isinstance(constraint, sa.UniqueConstraint):
            columns = list(constraint.columns)
            _, nulls = _dialect_options(constraint)
            group = UniqueGroup(tuple(c.name for c in columns), _name(constraint.name), {}, nulls)
            candidates.append((columns, group))
    for index in table.indexes:
        if index.unique:
            columns = [c for c in index.columns if isinstance(c, sa.Column)]
            where, nulls = _dialect_options(index)
            group = UniqueGroup(tuple(c.name for c in columns), _name(index.name), where, nulls)
            candidates.append((columns, group))
    for column in table.columns:
        if column.unique:
            candidates.append(([column], UniqueGroup((column.name,))))

    groups: dict[tuple[str, ...], UniqueGroup] = {}
    for group_columns, group in candidates:
        if not any(isinstance(column.type, DeterministicEncrypted) for column in group_columns):
            continue
        known = groups.get(group.names)
        if known is None or (known.where and not group.where):
            groups[group.names] = group
    return list(groups.values())


def _name(name: Any) -> str | None:
    return name if isinstance(name, str) else None


def unique_groups(table: sa.Table) -> list[tuple[str, ...]]:
    """Return the column-name tuples of ``table``'s unique constraints and
    unique indexes that include a deterministic encrypted column."""
    return [group.names for group in unique_constraints(table)]


def dialect_of(session: Session, table: sa.Table) -> str:
    """Return the name of the dialect that ``session`` uses for ``table``."""
    return session.get_bind(clause=table).dialect.name


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
    predicate: Any = None,
    database_conflicts: bool = False,
) -> tuple[Any, ...] | None:
    """Return the primary key of a row of ``tenant`` that contains
    ``values`` in the columns ``names`` under any decryptable key version,
    or None.

    ``exclude`` leaves out the rows being written. ``parameters`` are the
    statement's own, for the bound parameters that ``exclude`` uses.
    ``predicate``, the WHERE clause of a partial unique index, limits the
    lookup to the rows the index contains. A None value matches NULL, for
    constraints whose NULLs are not distinct. ``database_conflicts`` leaves
    out the rows that store the values under the active key version,
    because the database's own ON CONFLICT handling detects those.
    """
    conditions: list[Any] = _row_conditions(table, names, values, exclude, database_conflicts)
    conditions.extend(_shared_conditions(table, names, tenant, predicate))
    query = sa.select(*table.primary_key.columns).where(*conditions).limit(1)
    with tenant_scope(tenant), session.no_autoflush:
        found = session.execute(query, dict(parameters or {})).first()
    return None if found is None else tuple(found)


# Bound parameters that one batched lookup may send. SQLite before 3.32
# allows 999 per statement (SQLITE_MAX_VARIABLE_NUMBER), later versions
# 32766, and PostgreSQL's wire protocol 65535, so staying below the
# smallest keeps every supported database in bounds.
MAX_BATCH_PARAMETERS = 900

# Parameters left for the parts of a batched lookup that all its rows
# share: the tenant and the partial index predicate.
_SHARED_PARAMETERS = 50


@dataclass(frozen=True)
class Lookup:
    """The arguments of one :func:`find_holder` call, and the error it
    raises when it finds a row.

    ``statement_row`` is passed on to :func:`duplicate_error`.
    """

    table: sa.Table
    names: tuple[str, ...]
    values: Mapping[str, Any]
    tenant: str
    exclude: sa.ColumnElement[bool] | None = None
    parameters: Mapping[str, Any] | None = None
    predicate: Any = None
    database_conflicts: bool = False
    statement_row: str = ""

    def find_holder(self, session: Session) -> tuple[Any, ...] | None:
        return find_holder(
            session,
            self.table,
            self.names,
            self.values,
            self.tenant,
            exclude=self.exclude,
            parameters=self.parameters,
            predicate=self.predicate,
            database_conflicts=self.database_conflicts,
        )


def check_lookups(session: Session, lookups: Sequence[Lookup]) -> None:
    """Raise :class:`DuplicateValueError` for the first of ``lookups`` that
    finds a row, as running them one by one in order would.

    The lookups are sent in batches: one SELECT per table, unique group and
    tenant of each batch, which matches the values of all its rows. Only
    when such a SELECT finds a row are the lookups of that batch repeated
    one by one, to name the first row of the statement that contains a
    duplicate.
    """
    for batch in _batches(lookups):
        if len(batch) > 1 and not _any_holder(session, batch):
            continue
        for lookup in batch:
            existing = lookup.find_holder(session)
            if existing is not None:
                raise duplicate_error(
                    lookup.table,
                    lookup.names,
                    lookup.tenant,
                    existing,
                    statement_row=lookup.statement_row,
                )


def _batches(lookups: Sequence[Lookup]) -> Iterator[list[Lookup]]:
    """Split ``lookups`` in order into batches whose SELECTs stay below
    :data:`MAX_BATCH_PARAMETERS`.

    A lookup with statement parameters gets a batch of its own, because the
    parameters of two rows may use the same names.
    """
    batch: list[Lookup] = []
    size = 0
    for lookup in lookups:
        cost = _parameter_count(lookup)
        if lookup.parameters or (batch and size + cost > MAX_BATCH_PARAMETERS - _SHARED_PARAMETERS):
            if batch:
                yield batch
            batch, size = [], 0
        if lookup.parameters:
            yield [lookup]
            continue
        batch.append(lookup)
        size += cost
    if batch:
        yield batch


def _parameter_count(lookup: Lookup) -> int:
    """Estimate the bound parameters that ``lookup`` adds to a batched SELECT.

    A deterministic value is searched under every decryptable key version,
    so it takes one parameter per version.
    """
    versions = 1
    count = 0
    for name in lookup.names:
        column_type = lookup.table.c[name].type
        if isinstance(column_type, DeterministicEncrypted):
            keys = column_type.key_provider.decryptable_keys(
                lookup.tenant, KeyPurpose.DETERMINISTIC
            )
            versions = max(versions, len(keys))
            count += len(keys)
        else:
            count += 1
    if lookup.database_conflicts:
        count += len(lookup.names)
    if lookup.exclude is not None:
        # NOTE: an estimate. An expanding IN inside ``exclude`` counts as one
        # value per key version, though it may contain more values.
        bind_count = sum(
            1 for element in visitors.iterate(lookup.exclude) if isinstance(element, BindParameter)
        )
        count += bind_count * versions
    return count


def _any_holder(session: Session, batch: Sequence[Lookup]) -> bool:
    """Return True if one of the lookups of ``batch`` would find a row."""
    groups: dict[tuple[Any, ...], list[Lookup]] = {}
    for lookup in batch:
        key = (lookup.table, lookup.names, id(lookup.predicate), lookup.tenant)
        groups.setdefault(key, []).append(lookup)
    for (table, names, _, tenant), group in groups.items():
        row_conditions = _batched_row_conditions(table, names, group)
        conditions = _shared_conditions(table, names, tenant, group[0].predicate)
        conditions.append(sa.or_(*row_conditions))
        query = sa.select(*table.primary_key.columns).where(*conditions).limit(1)
        with tenant_scope(tenant), session.no_autoflush:
            if session.execute(query).first() is not None:
                return True
    return False


def _batched_row_conditions(
    table: sa.Table, names: tuple[str, ...], lookups: Sequence[Lookup]
) -> list[Any]:
    """Return one condition per row of ``lookups``, or per set of rows that
    differ only in the value of one deterministic column, which one IN
    matches.

    Rows that leave out stored rows or ON CONFLICT targets keep a
    condition of their own.
    """
    conditions: list[Any] = []
    searches: dict[tuple[Any, ...], list[Any]] = {}
    for lookup in lookups:
        searched = [
            name
            for name in names
            if isinstance(table.c[name].type, DeterministicEncrypted)
            and lookup.values[name] is not None
        ]
        other = tuple((name, lookup.values[name]) for name in names if name not in searched)
        mergeable = len(searched) == 1 and lookup.exclude is None and not lookup.database_conflicts
        if mergeable:
            try:
                hash(other)
            except TypeError:
                mergeable = False
        if mergeable:
            searches.setdefault((searched[0], other), []).append(lookup.values[searched[0]])
            continue
        row = _row_conditions(
            table, names, lookup.values, lookup.exclude, lookup.database_conflicts
        )
        conditions.append(sa.and_(*row))
    for (name, other), values in searches.items():
        matched = [_value_condition(table, other_name, value) for other_name, value in other]
        conditions.append(sa.and_(*matched, table.c[name].in_(values)))
    return conditions


def _row_conditions(
    table: sa.Table,
    names: tuple[str, ...],
    values: Mapping[str, Any],
    exclude: sa.ColumnElement[bool] | None,
    database_conflicts: bool,
) -> list[Any]:
    """Return the conditions of :func:`find_holder` that depend on the written row."""
    conditions: list[Any] = [_value_condition(table, name, values[name]) for name in names]
    if database_conflicts:
        conditions.append(sa.not_(sa.and_(*_same_bytes(table, names, values))))
    if exclude is not None:
        conditions.append(exclude)
    return conditions


def _shared_conditions(
    table: sa.Table, names: tuple[str, ...], tenant: str, predicate: Any
) -> list[Any]:
    """Return the conditions of :func:`find_holder` that every row of a
    unique group and tenant shares: the partial index predicate and the
    tenant column."""
    conditions: list[Any] = []
    if predicate is not None:
        # NOTE: the predicate limits the stored rows only. A written row that
        # falls outside the partial index is still checked.
        conditions.append(predicate)
    tenant_name = tenant_column_of(table)
    if tenant_name is not None and tenant_name not in names:
        conditions.append(table.c[tenant_name] == tenant)
    return conditions


def _value_condition(table: sa.Table, name: str, value: Any) -> Any:
    return table.c[name].is_(None) if value is None else table.c[name] == value


def _same_bytes(
    table: sa.Table, names: tuple[str, ...], values: Mapping[str, Any]
) -> list[sa.ColumnElement[bool]]:
    """Return conditions that the deterministic columns of ``names`` store
    the bytes that sealing ``values`` now gives, under the active version."""
    conditions: list[sa.ColumnElement[bool]] = []
    for name in names:
        column = table.c[name]
        if isinstance(column.type, DeterministicEncrypted) and values[name] is not None:
            # The column is compared as stored bytes, so the comparison is
            # not expanded to every decryptable version. The column type
            # seals the bound value under the active version.
            stored = sa.type_coerce(column, column.type.impl_instance)
            conditions.append(stored == sa.bindparam(None, values[name], type_=column.type))
    return conditions


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
