"""Check the INSERT and UPDATE statements that a guarded session executes.

ORM bulk statements (``session.execute(insert(Model), [row, ...])``) and
statements with ``.values()`` never reach the flush, so the unique guard
also listens to the session's ``do_orm_execute`` event and looks up the
values such a statement carries before it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import ColumnProperty, Mapper, ORMExecuteState, QueryableAttribute, Session
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.sql.elements import BindParameter

from ..row_tenant import tenant_column_of
from ..tenancy import current_tenant, tenant_scope
from .unique_lookup import (
    Lookup,
    UniqueGroup,
    check_lookups,
    dialect_of,
    needs_check,
    other_row,
    unique_constraints,
)

__all__ = ["check_statement"]


class _Unknown:
    """A value given as a SQL expression, which the guard cannot look up."""

    def __repr__(self) -> str:
        return "<SQL expression>"


UNKNOWN = _Unknown()


def check_statement(state: ORMExecuteState) -> None:
    """Raise :class:`DuplicateValueError` before an INSERT or UPDATE that
    writes a value of a unique deterministic constraint which another row
    already contains under any decryptable key version of the row's tenant."""
    if not (state.is_insert or state.is_update):
        return
    statement = state.statement
    mapper = state.bind_mapper
    table = mapper.local_table if mapper is not None else getattr(statement, "table", None)
    if not isinstance(table, sa.Table):
        return
    groups = unique_constraints(table)
    if not groups:
        return

    check = _StatementCheck(state.session, table, mapper, groups)
    if isinstance(statement, Insert):
        check.insert(statement, state.parameters)
    elif isinstance(statement, Update):
        check.update(statement, state.parameters)
    check_lookups(state.session, check.lookups)


class _StatementCheck:
    """The unique constraints of one table, checked for the rows of one statement."""

    def __init__(
        self,
        session: Session,
        table: sa.Table,
        mapper: Mapper[Any] | None,
        groups: list[UniqueGroup],
    ) -> None:
        self.session = session
        self.table = table
        self.mapper = mapper
        self.groups = groups
        self.dialect = dialect_of(session, table)
        self.tenant_name = tenant_column_of(table)
        self._needed: dict[tuple[tuple[str, ...], str], bool] = {}
        # Collected in row order and run in batches once every row is read.
        self.lookups: list[Lookup] = []

    # -- INSERT ---------------------------------------------------------------

    def insert(self, statement: Insert, parameters: Any) -> None:
        if statement._select_names:
            # insert().from_select(): the values come from a query.
            return
        base = self._values_clause(statement)
        rows: list[dict[str, Any]] = []
        for batch in statement._multi_values:
            for entry in batch:
                # A row is a dict, or a tuple of values in the table's column order.
                mapping: Mapping[Any, Any]
                if isinstance(entry, Mapping):
                    mapping = entry
                else:
                    mapping = dict(zip(self.table.columns, entry, strict=False))
                rows.append(self._resolve({**base, **self._by_column(mapping)}, {}))
        parameter_rows = _parameter_rows(parameters)
        if parameter_rows:
            rows = [self._resolve({**base, **self._by_column(row)}, row) for row in parameter_rows]
        elif not rows:
            rows = [self._resolve(base, {})]

        on_conflict = getattr(statement, "_post_values_clause", None)
        for index, row in enumerate(rows, start=1):
            label = (
                f"row {index} of the INSERT statement" if len(rows) > 1 else "the INSERT statement"
            )
            # A row that names its primary key is left out of the lookup, so
            # an upsert of a row onto itself is no duplicate. A plain INSERT
            # of an existing key fails on the primary key anyway.
            identity = self._identity(row)
            exclude = other_row(self.table, identity) if identity is not None else None
            target = self._conflict_target(on_conflict)
            conflicting = self._conflicting_rows(on_conflict, target, row)
            if conflicting is not None:
                # The row that the ON CONFLICT clause updates or keeps.
                conflict_free = sa.not_(conflicting)
                exclude = conflict_free if exclude is None else sa.and_(exclude, conflict_free)
            for group in self._groups_set_by(row):
                values = {name: row.get(name, self._default(name)) for name in group.names}
                if self._cannot_match(group, values):
                    continue
                if on_conflict is not None and (target is None or group in target):
                    # The database resolves a conflict on the ON CONFLICT
                    # target with the row that stores the same bytes. A row
                    # under an older version is no conflict to it, so the
                    # INSERT would add a duplicate.
                    self._add_lookup(
                        group, values, self._tenant(row), None, label, database_conflicts=True
                    )
                    continue
                self._add_lookup(group, values, self._tenant(row), exclude, label)
            set_values = getattr(on_conflict, "update_values_to_set", None)
            if set_values and conflicting is not None:
                set_row = self._resolve(self._by_column(dict(set_values)), {})
                if self.tenant_name is not None and self.tenant_name in row:
                    set_row.setdefault(self.tenant_name, row[self.tenant_name])
                self._update_rows(conflicting, set_row, {}, f"the DO UPDATE SET of {label}")

    def _conflict_target(self, on_conflict: Any) -> list[UniqueGroup] | None:
        """Return the unique groups an ON CONFLICT clause names, or None
        when it names none (DO NOTHING on any conflict)."""
        if on_conflict is None:
            return None
        constraint = getattr(on_conflict, "constraint_target", None)
        elements = getattr(on_conflict, "inferred_target_elements", None) or []
        names = {element if isinstance(element, str) else element.name for element in elements}
        if constraint is None and not names:
            return None
        return [
            group
            for group in self.groups
            if (constraint is not None and group.constraint_name == constraint)
            or (names and set(group.names) == names)
        ]

    def _conflicting_rows(
        self, on_conflict: Any, target: list[UniqueGroup] | None, row: dict[str, Any]
    ) -> sa.ColumnElement[bool] | None:
        """Return a condition for the stored row that an INSERT row meets on
        its ON CONFLICT target, or None when a target value is unknown."""
        if on_conflict is None:
            return None
        elements = getattr(on_conflict, "inferred_target_elements", None) or []
        names = [element if isinstance(element, str) else element.name for element in elements]
        if not names and target:
            names = list(target[0].names)
        if not names or any(name not in self.table.c for name in names):
            return None
        values = {name: row.get(name, self._default(name)) for name in names}
        if _cannot_match(values):
            return None
        return sa.and_(*(self.table.c[name] == values[name] for name in names))

    def _default(self, name: str) -> Any:
        """Return the value an INSERT stores in a column it does not name."""
        column = self.table.c[name]
        if column.default is None and column.server_default is None:
            return None
        default = column.default
        if isinstance(default, sa.ColumnDefault) and default.is_scalar:
            return default.arg
        return UNKNOWN

    # -- UPDATE ---------------------------------------------------------------

    def update(self, statement: Update, parameters: Any) -> None:
        base = self._values_clause(statement)
        if parameters is None or isinstance(parameters, Mapping):
            # SET values given to .values() or as execute() parameters, for
            # every row the WHERE clause matches.
            given = dict(parameters or {})
            row = self._resolve({**base, **self._by_column(given)}, given)
            self._update_where(statement, row, given, "the UPDATE statement")
            return
        # An ORM bulk UPDATE names each row by its primary key. A Core
        # executemany instead matches rows with bound parameters in its WHERE.
        parameter_rows = _parameter_rows(parameters)
        rows = [
            self._resolve({**base, **self._by_column(parameter_row)}, parameter_row)
            for parameter_row in parameter_rows
        ]
        for index, (parameter_row, row) in enumerate(
            zip(parameter_rows, rows, strict=True), start=1
        ):
            if len(parameter_rows) > 1:
                label = f"row {index} of the UPDATE statement"
            else:
                label = "the UPDATE statement"
            if self._identity(row) is not None:
                self._update_by_primary_key(row, rows, label)
            else:
                self._update_where(statement, row, dict(parameter_row), label)

    def _update_by_primary_key(
        self, row: dict[str, Any], statement_rows: list[dict[str, Any]], label: str
    ) -> None:
        identity = self._identity(row)
        if identity is None:
            return
        for group in self._groups_set_by(row):
            names = group.names
            values = self._set_values(group, row)
            if values is None:
                continue
            # The rows of the same statement that change away from the value
            # no longer contain it once the statement has run.
            left_out = [identity]
            for other in statement_rows:
                other_identity = self._identity(other)
                if other_identity is None or other_identity == identity:
                    continue
                if any(
                    name in other and other[name] is not UNKNOWN and other[name] != values[name]
                    for name in values
                ):
                    left_out.append(other_identity)
            exclude = sa.and_(*(other_row(self.table, key) for key in left_out))
            tenant = self._tenant(row)
            unset = [name for name in names if name not in values]
            if unset:
                # The row keeps its stored value in the columns the UPDATE does not set.
                query = sa.select(*(self.table.c[name] for name in unset)).where(
                    _primary_key(self.table) == _key(identity)
                )
                with tenant_scope(tenant), self.session.no_autoflush:
                    stored = self.session.execute(query).first()
                if stored is None:
                    continue
                values.update(zip(unset, stored, strict=True))
            self._add_lookup(group, values, tenant, exclude, label)

    def _update_where(
        self, statement: Update, row: dict[str, Any], parameters: dict[str, Any], label: str
    ) -> None:
        where = statement.whereclause
        if where is None:
            # Every row gets the value, so no row outside the UPDATE can hold it.
            return
        self._update_rows(where, row, parameters, label)

    def _update_rows(
        self,
        where: sa.ColumnElement[bool],
        row: dict[str, Any],
        parameters: dict[str, Any],
        label: str,
    ) -> None:
        """Check the SET values ``row`` of an UPDATE of the rows ``where`` matches."""
        bind_names = {
            element.key for element in visitors.iterate(where) if isinstance(element, BindParameter)
        }
        where_parameters = {name: value for name, value in parameters.items() if name in bind_names}
        matched = sa.select(*self.table.primary_key.columns).where(where)
        exclude = sa.not_(_primary_key(self.table).in_(matched))
        matches_a_row: bool | None = None
        for group in self._groups_set_by(row):
            names = group.names
            values = self._set_values(group, row)
            if values is None:
                continue
            tenant = self._tenant(row)
            unset = [name for name in names if name not in values]
            if not unset:
                if not self._needs_check(names, tenant):
                    continue
                if matches_a_row is None:
                    # An UPDATE that matches no row writes nothing.
                    with tenant_scope(tenant), self.session.no_autoflush:
                        found = self.session.execute(matched.limit(1), where_parameters).first()
                    matches_a_row = found is not None
                if matches_a_row:
                    self._add_lookup(group, values, tenant, exclude, label, where_parameters)
                continue
            # Each matched row keeps its stored value in the columns the
            # UPDATE does not set, so every combination of them is checked.
            query = sa.select(*(self.table.c[name] for name in unset)).where(where).distinct()
            with tenant_scope(tenant), self.session.no_autoflush:
                combinations = self.session.execute(query, where_parameters).all()
            for stored in combinations:
                combined = {**values, **dict(zip(unset, stored, strict=True))}
                self._add_lookup(group, combined, tenant, exclude, label, where_parameters)

    def _set_values(self, group: UniqueGroup, row: dict[str, Any]) -> dict[str, Any] | None:
        """Return the values of ``names`` that an UPDATE row sets, or None
        when one of them cannot match a stored value.

        A row that does not set the tenant column seals under the active
        scope or default tenant, and only rows of that tenant may be
        updated that way, so that tenant is the stored one.
        """
        names = group.names
        values = {name: row[name] for name in names if name in row}
        if self._cannot_match(group, values):
            return None
        if self.tenant_name in names and self.tenant_name not in values:
            values[self.tenant_name] = self._tenant(row)
        return values

    # -- shared ---------------------------------------------------------------

    def _add_lookup(
        self,
        group: UniqueGroup,
        values: dict[str, Any],
        tenant: str,
        exclude: sa.ColumnElement[bool] | None,
        label: str,
        parameters: dict[str, Any] | None = None,
        *,
        database_conflicts: bool = False,
    ) -> None:
        names = group.names
        if self._cannot_match(group, values) or not self._needs_check(names, tenant):
            return
        lookup = Lookup(
            self.table,
            names,
            values,
            tenant,
            exclude=exclude,
            parameters=parameters,
            predicate=group.predicate(self.dialect),
            database_conflicts=database_conflicts,
            statement_row=label,
        )
        self.lookups.append(lookup)

    def _cannot_match(self, group: UniqueGroup, values: Mapping[str, Any]) -> bool:
        """Return True if ``values`` cannot match a stored row of ``group``:
        a SQL expression, or NULL unless the constraint treats NULLs as
        equal. Values that are all NULL are left to the database."""
        if self.dialect not in group.nulls_not_distinct:
            return _cannot_match(values)
        if any(value is UNKNOWN for value in values.values()):
            return True
        return all(value is None for value in values.values())

    def _needs_check(self, names: tuple[str, ...], tenant: str) -> bool:
        key = (names, tenant)
        if key not in self._needed:
            self._needed[key] = needs_check(self.table, names, tenant)
        return self._needed[key]

    def _groups_set_by(self, row: dict[str, Any]) -> list[UniqueGroup]:
        return [group for group in self.groups if row.keys() & set(group.names)]

    def _tenant(self, row: dict[str, Any]) -> str:
        """Return the tenant whose keys seal the row's values: the row's
        tenant column, else the active scope or the default tenant."""
        tenant = row.get(self.tenant_name) if self.tenant_name else None
        if isinstance(tenant, str) and tenant:
            return tenant
        return current_tenant(self.table.name)

    def _identity(self, row: dict[str, Any]) -> tuple[Any, ...] | None:
        identity = tuple(row.get(column.name) for column in self.table.primary_key.columns)
        if any(value is None or value is UNKNOWN for value in identity):
            return None
        return identity

    def _values_clause(self, statement: Insert | Update) -> dict[str, Any]:
        """Return the entries given to ``.values()``, by column name."""
        pairs: list[tuple[Any, Any]] = list((statement._values or {}).items())
        pairs.extend(getattr(statement, "_ordered_values", None) or ())
        return self._by_column(dict(pairs))

    def _by_column(self, row: Mapping[Any, Any]) -> dict[str, Any]:
        """Return ``row`` keyed by column name.

        Its keys may be attribute names, column keys, columns or mapped
        attributes. Keys that name no column of the table, such as bound
        parameter names, are dropped.
        """
        by_name: dict[str, Any] = {}
        for key, value in row.items():
            column = self._column_of(key)
            if column is not None:
                by_name[column.name] = value
        return by_name

    def _column_of(self, key: Any) -> sa.ColumnElement[Any] | None:
        if isinstance(key, QueryableAttribute):
            key = key.key
        if isinstance(key, str):
            prop = self.mapper.attrs.get(key) if self.mapper is not None else None
            if isinstance(prop, ColumnProperty):
                for column in prop.columns:
                    found = self.table.c.corresponding_column(column)
                    if found is not None:
                        return found
            return self.table.c.get(key)
        if isinstance(key, sa.ColumnElement):
            return self.table.c.corresponding_column(key)
        return None

    @staticmethod
    def _resolve(row: dict[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
        return {name: _python_value(value, parameters) for name, value in row.items()}


def _cannot_match(values: Mapping[str, Any]) -> bool:
    """Return True if a value is NULL, which equals no stored value, or a SQL
    expression, which cannot be looked up before the statement runs."""
    return any(value is None or value is UNKNOWN for value in values.values())


def _python_value(value: Any, parameters: Mapping[str, Any]) -> Any:
    """Return the Python value of a ``.values()`` entry or a parameter, or
    UNKNOWN for a SQL expression."""
    if isinstance(value, BindParameter):
        if value.key in parameters:
            return parameters[value.key]
        return value.effective_value
    if isinstance(value, sa.Null):
        return None
    if isinstance(value, sa.ClauseElement):
        return UNKNOWN
    return value


def _parameter_rows(parameters: Any) -> list[Mapping[str, Any]]:
    if parameters is None:
        return []
    if isinstance(parameters, Mapping):
        return [parameters]
    return [row for row in parameters if isinstance(row, Mapping)]


def _primary_key(table: sa.Table) -> sa.ColumnElement[Any]:
    columns = list(table.primary_key.columns)
    return columns[0] if len(columns) == 1 else sa.tuple_(*columns)


def _key(identity: tuple[Any, ...]) -> Any:
    return identity[0] if len(identity) == 1 else sa.tuple_(*identity)
