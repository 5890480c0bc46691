"""Convert one column between plaintext and encrypted form, in batches.

Converted values go into a shadow column next to the source column, which
stays untouched until the final swap. So at every moment each row is
either unconverted (shadow NULL or stale) or converted and checkable
(shadow authenticates and matches the source), and running the operation
again after a crash or a KMS failure simply continues.

Rows are read by keyset pagination on the primary key, ``batch_size`` at a
time, so memory does not grow with the table. The passes are:

``scan``
    Classify every source value, without writing. Used for ``strict=True``
    and to find out whether a column of the target type needs any work.
``fill``
    Write the shadow value of every row whose shadow is missing or stale,
    optionally committing after each batch.
``verify``
    Under a lock that blocks writers: check every row's shadow against the
    current source value, fix rows the application changed meanwhile, and
    read the fixed rows back. Its counts are the ones reported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row
from sqlalchemy.types import NullType

from sqlalchemy_encrypted.errors import (
    ConversionBatchError,
    MigrationError,
    MixedValuesError,
    TenantContextError,
)
from sqlalchemy_encrypted.tenancy import get_default_tenant, scoped_tenant

from .ddl import TableInfo, database_message
from .directions import RowState, SourceValue, Strategy

__all__ = ["ColumnConversion", "Counts", "Target"]

logger = logging.getLogger("sqlalchemy_encrypted.alembic")

# Primary keys listed in a strict-mode error.
_MAX_LISTED_KEYS = 10


@dataclass(frozen=True)
class Target:
    """The column to convert and how to find each row's tenant."""

    table: TableInfo
    column: str
    primary_key: tuple[str, ...]
    tenant_column: str | None
    tenant_id: str | None
    batch_size: int

    @property
    def label(self) -> str:
        return f"{self.table.qualified_name}.{self.column}"


@dataclass
class Counts:
    """Rows seen by one pass, by the state of their source value."""

    converted: int = 0
    already: int = 0
    null: int = 0
    resumed: int = 0
    written: int = 0
    already_keys: list[tuple[Any, ...]] = field(default_factory=list)

    def add(self, state: RowState, key: tuple[Any, ...]) -> None:
        if state is RowState.NULL:
            self.null += 1
        elif state is RowState.ALREADY:
            self.already += 1
            if len(self.already_keys) < _MAX_LISTED_KEYS:
                self.already_keys.append(key)
        else:
            self.converted += 1


@dataclass
class _Progress:
    """The position of a pass, for the error raised when the database fails it."""

    rows_done: int = 0
    first_key: tuple[Any, ...] | None = None
    last_key: tuple[Any, ...] | None = None
    last_done_key: tuple[Any, ...] | None = None

    def start(self, first_key: tuple[Any, ...], last_key: tuple[Any, ...]) -> None:
        self.first_key, self.last_key = first_key, last_key

    def finish(self, rows: int) -> None:
        self.rows_done += rows
        self.last_done_key = self.last_key
        self.first_key = self.last_key = None


def _shown(key: tuple[Any, ...]) -> str:
    return repr(key[0] if len(key) == 1 else key)


class ColumnConversion:
    """The passes over one table for one column and direction."""

    def __init__(self, conn: Connection, target: Target, strategy: Strategy, shadow: str) -> None:
        self.conn = conn
        self.target = target
        self.strategy = strategy
        self.shadow = shadow
        info = target.table
        self._fixed_tenant = self._resolve_fixed_tenant()
        columns: list[sa.ColumnClause[Any]] = [
            sa.column(name, info.column(name).type) for name in target.primary_key
        ]
        self._tenant_index: int | None = None
        if target.tenant_column is not None:
            info.column(target.tenant_column)
            self._tenant_index = len(columns)
            columns.append(sa.column(target.tenant_column, NullType()))
        self._source_index = len(columns)
        columns.append(sa.column(target.column, NullType()))
        self._shadow_index = len(columns)
        columns.append(sa.column(shadow, NullType()))
        self._table = sa.table(info.name, *columns, schema=info.schema)
        self._keys = [self._table.c[name] for name in target.primary_key]

    def _resolve_fixed_tenant(self) -> str | None:
        target = self.target
        if target.tenant_column is not None:
            return None
        if target.tenant_id is not None:
            return target.tenant_id
        tenant = scoped_tenant() or get_default_tenant()
        if tenant is None:
            raise TenantContextError(
                f"no tenant is set for encrypted column {target.label}: pass tenant_id= to "
                "the operation for the one tenant of a single-tenant table, or tenant_column= "
                "naming the column that contains each row's tenant. set_default_tenant() in "
                "env.py, or an enclosing tenant_scope(tenant_id), also sets the tenant"
            )
        return tenant

    # -- reading ------------------------------------------------------------

    def _batches(self, with_shadow: bool) -> Iterator[Sequence[Row[Any]]]:
        columns = list(self._table.c)
        if not with_shadow:
            columns = columns[: self._shadow_index]
        last: tuple[Any, ...] | None = None
        while True:
            query = sa.select(*columns).order_by(*self._keys).limit(self.target.batch_size)
            if last is not None:
                if len(self._keys) == 1:
                    query = query.where(self._keys[0] > last[0])
                else:
                    query = query.where(sa.tuple_(*self._keys) > sa.tuple_(*last))
            rows = self.conn.execute(query).all()
            if not rows:
                return
            yield rows
            last = tuple(rows[-1][: len(self._keys)])

    def _key(self, row: Row[Any]) -> tuple[Any, ...]:
        return tuple(row[: len(self._keys)])

    def _where(self, key: tuple[Any, ...]) -> str:
        shown = key[0] if len(key) == 1 else key
        return f"{self.target.label} (primary key {shown!r})"

    def _tenant(self, row: Row[Any]) -> str | None:
        if self._tenant_index is None:
            return self._fixed_tenant
        tenant = row[self._tenant_index]
        if not isinstance(tenant, str) or not tenant:
            raise TenantContextError(
                f"{self._where(self._key(row))}: tenant column "
                f"{self.target.tenant_column!r} must hold a non-empty string"
            )
        return tenant

    def _source(self, row: Row[Any]) -> tuple[SourceValue, str | None, str]:
        where = self._where(self._key(row))
        raw = row[self._source_index]
        if raw is None:
            return SourceValue(RowState.NULL), None, where
        tenant = self._tenant(row)
        return self.strategy.read_source(raw, tenant, where), tenant, where

    # -- writing ------------------------------------------------------------

    def _update(self, values: list[dict[str, Any]]) -> None:
        if not values:
            return
        statement = sa.update(self._table).values(
            {self.shadow: sa.bindparam("_value", type_=self.strategy.shadow_bind_type)}
        )
        for index, key in enumerate(self._keys):
            statement = statement.where(key == sa.bindparam(f"_key{index}", type_=key.type))
        self.conn.execute(statement, values)

    def _params(self, key: tuple[Any, ...], value: Any) -> dict[str, Any]:
        params = {f"_key{index}": part for index, part in enumerate(key)}
        params["_value"] = value
        return params

    # -- passes -------------------------------------------------------------

    def scan(self) -> Counts:
        """Classify every source value without writing anything.

        A database error raises :class:`ConversionBatchError`.
        """
        counts = Counts()
        progress = _Progress()
        try:
            for rows in self._batches(with_shadow=False):
                for row in rows:
                    source, _, _ = self._source(row)
                    counts.add(source.state, self._key(row))
                progress.start(self._key(rows[0]), self._key(rows[-1]))
                progress.finish(len(rows))
        except sa.exc.DBAPIError as exc:
            raise self._batch_error(exc, progress, committed=False, wrote=False) from None
        return counts

    def check_strict(self, counts: Counts) -> None:
        """Raise :class:`MixedValuesError` if any source value is already converted."""
        if not counts.already:
            return
        form = "encrypted" if self.strategy.direction == "encrypt" else "plaintext"
        keys = ", ".join(repr(key[0] if len(key) == 1 else key) for key in counts.already_keys)
        more = " (first 10 shown)" if counts.already > len(counts.already_keys) else ""
        raise MixedValuesError(
            f"{self.target.label}: {counts.already} value(s) are already {form} and "
            f"strict=True, so nothing was written. Primary keys{more}: {keys}. Run "
            "without strict=True to convert only the other values",
            count=counts.already,
            primary_keys=list(counts.already_keys),
        )

    def fill(self, commit_each_batch: bool) -> Counts:
        """Write every missing or stale shadow value.

        A database error raises :class:`ConversionBatchError`.
        """
        counts = Counts()
        progress = _Progress()
        try:
            for number, rows in enumerate(self._batches(with_shadow=True), start=1):
                progress.start(self._key(rows[0]), self._key(rows[-1]))
                updates: list[dict[str, Any]] = []
                for row in rows:
                    key = self._key(row)
                    source, tenant, where = self._source(row)
                    counts.add(source.state, key)
                    shadow_raw = row[self._shadow_index]
                    if self.strategy.shadow_matches(source, shadow_raw, tenant, where):
                        if source.state is not RowState.NULL:
                            counts.resumed += 1
                        continue
                    value = self.strategy.shadow_value(source, tenant, where)
                    updates.append(self._params(key, value))
                self._update(updates)
                counts.written += len(updates)
                if commit_each_batch:
                    self.conn.commit()
                progress.finish(len(rows))
                logger.debug(
                    "%s: batch %d, %d row(s) written", self.target.label, number, len(updates)
                )
        except sa.exc.DBAPIError as exc:
            # Not chained: the database's text can quote the row, plaintext included.
            raise self._batch_error(exc, progress, committed=commit_each_batch) from None
        return counts

    def _batch_error(
        self, error: sa.exc.DBAPIError, progress: _Progress, committed: bool, wrote: bool = True
    ) -> ConversionBatchError:
        """Describe a database error of a pass: where it stopped, what is kept, what to do."""
        if progress.first_key is not None and progress.last_key is not None:
            where = (
                f"writing the batch of primary keys {_shown(progress.first_key)} to "
                f"{_shown(progress.last_key)}"
            )
        elif progress.last_done_key is not None:
            where = f"reading the batch after primary key {_shown(progress.last_done_key)}"
        else:
            where = "reading the first batch"
        if not wrote:
            outcome = "Nothing was written, so the original column is unchanged"
        elif committed:
            outcome = (
                f"The {progress.rows_done} row(s) of the earlier batches are converted and "
                f"committed in the temporary column {self.shadow!r}, and the next run keeps "
                "them. The original column is unchanged"
            )
        else:
            outcome = (
                f"{progress.rows_done} row(s) of the earlier batches were done in the "
                "migration's transaction, which is rolled back, so the original column "
                "is unchanged"
            )
        label = self.target.label
        return ConversionBatchError(
            f"{label}: the database failed while {where}: {database_message(error)}. "
            f"{outcome}. Fix the cause and run the migration again",
            table=self.target.table.qualified_name,
            column=self.target.column,
            first_key=progress.first_key,
            last_key=progress.last_key,
            rows_done=progress.rows_done,
        )

    def verify(self) -> Counts:
        """Check every shadow value against its source and fix the ones that differ.

        Call it while writers are blocked. Fixed rows are read back and
        checked again; a row that still differs raises :class:`MigrationError`.
        """
        counts = Counts()
        progress = _Progress()
        try:
            for rows in self._batches(with_shadow=True):
                progress.start(self._key(rows[0]), self._key(rows[-1]))
                self._verify_batch(rows, counts)
                progress.finish(len(rows))
        except sa.exc.DBAPIError as exc:
            raise self._batch_error(exc, progress, committed=False) from None
        return counts

    def _verify_batch(self, rows: Sequence[Row[Any]], counts: Counts) -> None:
        fixes: dict[tuple[Any, ...], dict[str, Any]] = {}
        for row in rows:
            key = self._key(row)
            source, tenant, where = self._source(row)
            counts.add(source.state, key)
            if self.strategy.shadow_matches(source, row[self._shadow_index], tenant, where):
                if source.state is not RowState.NULL:
                    counts.resumed += 1
                continue
            value = self.strategy.shadow_value(source, tenant, where)
            fixes[key] = self._params(key, value)
        if fixes:
            self._update(list(fixes.values()))
            counts.written += len(fixes)
            self._check_fixed(rows[0], rows[-1], set(fixes))

    def _check_fixed(self, first: Row[Any], last: Row[Any], fixed: set[tuple[Any, ...]]) -> None:
        low, high = self._key(first), self._key(last)
        condition: sa.ColumnElement[bool]
        if len(self._keys) == 1:
            condition = self._keys[0].between(low[0], high[0])
        else:
            row_key = sa.tuple_(*self._keys)
            condition = sa.and_(row_key >= sa.tuple_(*low), row_key <= sa.tuple_(*high))
        query = sa.select(*self._table.c).where(condition)
        for row in self.conn.execute(query):
            key = self._key(row)
            if key not in fixed:
                continue
            source, tenant, where = self._source(row)
            if not self.strategy.shadow_matches(source, row[self._shadow_index], tenant, where):
                raise MigrationError(
                    f"{where}: the converted value does not read back as the source value "
                    f"in the column type {self.strategy.target_type!r}; the conversion is "
                    "not lossless for this value, so the column was not swapped"
                )
