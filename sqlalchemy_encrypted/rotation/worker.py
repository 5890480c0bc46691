"""One re-encryption worker: pages through one table and rewrites stale values.

Each batch is one short transaction:

1. select up to ``batch_size`` rows after the cursor whose stored header
   names a stale key, in primary key order (keyset pagination, so memory
   stays bounded and no OFFSET scan grows). On PostgreSQL the rows are
   locked with ``FOR UPDATE SKIP LOCKED``, so concurrent workers never take
   the same row and skip rows another worker has locked instead of waiting.
   A re-encoding worker locks with ``FOR UPDATE`` and waits instead, because
   a skipped row under the active key version would not be read again.
2. decrypt each stale value with the column type and seal it again under the
   active DEK of the tenant that sealed it. With moves, a value sealed under
   another tenant's key than its row's tenant column names is sealed under
   the active DEK of the row's tenant instead. With re-encoding, the
   plaintext is decoded and encoded again before it is sealed;
3. write back with compare-and-swap, ``UPDATE ... WHERE pk = :pk AND
   col = :old``: a value an application changed meanwhile is left as the
   application wrote it;
4. save the checkpoint in the same transaction, then commit.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from ..errors import (
    EncryptionError,
    KeyNotFoundError,
    KeyUsageLimitError,
    KmsError,
    ReencryptionError,
    TenantContextError,
)
from ..keys import DataKey
from .census import CensusEntry
from .checkpoint import Checkpoint, CheckpointStore
from .columns import EncryptedColumn, raw_table
from .headers import HeaderPrefix, header_prefix, prefix_of
from .integrity import describe_rejection
from .ratelimit import RateLimiter

__all__ = [
    "BatchReport",
    "MoveHeaders",
    "RowFailure",
    "StaleHeaders",
    "TableWorker",
    "WorkerStats",
]

# Per column name, the stored headers to rewrite, each with the census entry
# naming the tenant and key version it stands for.
StaleHeaders = dict[str, dict[HeaderPrefix, CensusEntry]]
# Per column name, the stored headers of values to move to their row's
# tenant, each with the tenant of the key that sealed them.
MoveHeaders = dict[str, dict[HeaderPrefix, str]]

logger = logging.getLogger("sqlalchemy_encrypted.rotation")


@dataclass(frozen=True)
class RowFailure:
    """A value the job could not re-encrypt. ``message`` contains no plaintext."""

    table: str
    column: str
    primary_key: tuple[Any, ...]
    error_class: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "column": self.column,
            "primary_key": [str(value) for value in self.primary_key],
            "error_class": self.error_class,
            "message": self.message,
        }


@dataclass
class WorkerStats:
    """Counters of one worker's pass over a table."""

    rows_scanned: int = 0
    values_reencrypted: int = 0
    # Of values_reencrypted, the values moved to their row's tenant.
    values_moved: int = 0
    rows_skipped: int = 0
    # Rows that failed. With count_new_failures, only those new to the run.
    rows_failed: int = 0
    batches: int = 0

    def add(self, other: WorkerStats) -> None:
        self.rows_scanned += other.rows_scanned
        self.values_reencrypted += other.values_reencrypted
        self.values_moved += other.values_moved
        self.rows_skipped += other.rows_skipped
        self.rows_failed += other.rows_failed
        self.batches += other.batches


@dataclass
class BatchReport:
    """The counters and failures of one committed batch, passed to the job's progress hook."""

    slot: int
    stats: WorkerStats
    failures: list[RowFailure] = field(default_factory=list)


@dataclass
class _RowUpdate:
    primary_key: tuple[Any, ...]
    # column name -> (stored value read, new stored value)
    values: dict[str, tuple[Any, Any]]
    # Names of the columns whose value moves to the row's tenant.
    moved: frozenset[str] = frozenset()


class TableWorker:
    """Re-encrypts the stale values of one table's columns, batch by batch.

    ``moves`` names the headers of values to move to their row's tenant. A
    value under one of them is moved when its row's tenant column names
    another tenant than the key's, and, with ``move_tenants``, when the
    key's tenant or the row's tenant is one of them.

    ``reencode`` decodes and encodes every value it rewrites again (see
    :meth:`EncryptedType.reencode`). Its headers may then include the active
    key version: such a value is written only when its encoding changes.
    """

    def __init__(
        self,
        conn: Connection,
        columns: Sequence[EncryptedColumn],
        stale_headers: StaleHeaders,
        *,
        batch_size: int,
        slot: int,
        cursor: tuple[Any, ...] | None,
        owns_transactions: bool,
        checkpoint_store: CheckpointStore | None = None,
        checkpoint: Checkpoint | None = None,
        rate_limiter: RateLimiter | None = None,
        stop: threading.Event | None = None,
        on_batch: Callable[[BatchReport], None] | None = None,
        count_new_failures: Callable[[str, set[tuple[Any, ...]]], int] | None = None,
        moves: MoveHeaders | None = None,
        move_tenants: Collection[str] | None = None,
        reencode: bool = False,
    ) -> None:
        moves = moves or {}
        self.conn = conn
        self.columns = [c for c in columns if stale_headers.get(c.name) or moves.get(c.name)]
        self.table = columns[0].table
        self.label = columns[0].qualified_table
        self.headers = {name: values for name, values in stale_headers.items() if values}
        self.moves = {name: values for name, values in moves.items() if values}
        self.move_tenants = None if move_tenants is None else frozenset(move_tenants)
        self.reencode = reencode
        self.batch_size = batch_size
        self.slot = slot
        self.cursor = cursor
        self.owns_transactions = owns_transactions
        self.checkpoint_store = checkpoint_store
        self.checkpoint = checkpoint
        self.rate_limiter = rate_limiter
        self.stop = stop or threading.Event()
        self.on_batch = on_batch
        # Returns how many of a batch's failed rows are new to the job's run.
        self.count_new_failures = count_new_failures
        self.stats = WorkerStats()
        self.failures: list[RowFailure] = []
        self._dialect = conn.dialect.name
        self._raw = raw_table(self.table, [c.name for c in self.columns])
        self._pk_names = [column.name for column in self.table.primary_key.columns]
        self._tenant_name = self.columns[0].tenant_column if self.columns else None
        self._updates: dict[tuple[str, ...], sa.Update] = {}
        self._array_sqls: dict[tuple[str, ...], str] = {}
        self._active_keys: dict[tuple[str, Any], DataKey] = {}

    # -- statements -------------------------------------------------------------

    def _select(self) -> sa.Select[Any]:
        raw = self._raw
        row_conditions: list[sa.ColumnElement[bool]] = []
        for column in self.columns:
            prefix = header_prefix(raw.c[column.name], column.is_base64)
            if self.headers.get(column.name):
                row_conditions.append(prefix.in_(sorted(self.headers[column.name])))
            row_conditions.extend(self._move_conditions(column, prefix))
        pk = [raw.c[name] for name in self._pk_names]
        query = sa.select(raw).where(sa.or_(*row_conditions))
        if self.cursor is not None:
            if len(pk) == 1:
                query = query.where(pk[0] > self.cursor[0])
            else:
                query = query.where(sa.tuple_(*pk) > sa.tuple_(*self.cursor))
        query = query.order_by(*pk).limit(self.batch_size)
        if self._dialect == "postgresql":
            query = query.with_for_update(skip_locked=not self.reencode)
        return query

    def _move_conditions(
        self, column: EncryptedColumn, prefix: sa.ColumnElement[Any]
    ) -> list[sa.ColumnElement[bool]]:
        """Return the conditions selecting the rows whose value of ``column``
        is to move to the row's tenant, one per tenant of a key."""
        if not self.moves.get(column.name) or self._tenant_name is None:
            return []
        row_tenant = self._raw.c[self._tenant_name]
        by_tenant: dict[str, list[HeaderPrefix]] = {}
        for stored, key_tenant in self.moves[column.name].items():
            by_tenant.setdefault(key_tenant, []).append(stored)
        conditions = []
        for key_tenant, prefixes in sorted(by_tenant.items()):
            if self.move_tenants is None or key_tenant in self.move_tenants:
                elsewhere = row_tenant.is_distinct_from(key_tenant)
            else:
                elsewhere = row_tenant.in_(sorted(self.move_tenants))
            conditions.append(sa.and_(prefix.in_(sorted(prefixes)), elsewhere))
        return conditions

    def _moves_value(self, column: EncryptedColumn, prefix: HeaderPrefix, row_tenant: Any) -> bool:
        key_tenant = self.moves.get(column.name, {}).get(prefix)
        if key_tenant is None or row_tenant == key_tenant:
            return False
        selected = self.move_tenants
        return selected is None or key_tenant in selected or row_tenant in selected

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        if self.owns_transactions:
            with self.conn.begin():
                yield self.conn
        elif self._dialect == "sqlite":
            # pysqlite's own transaction handling breaks SAVEPOINT (releasing the
            # outermost one commits), and SQLite undoes a failed statement alone,
            # so batches run directly in the caller's transaction.
            yield self.conn
        else:
            with self.conn.begin_nested():
                yield self.conn

    # -- the loop -----------------------------------------------------------------

    def run(self) -> WorkerStats:
        """Process batches until no stale row is left after the cursor, or
        until another worker of the job stops on an error."""
        if not self.columns:
            return self.stats
        while not self.stop.is_set():
            if not self._run_batch():
                break
        return self.stats

    def _run_batch(self) -> bool:
        batch = WorkerStats(batches=1)
        failures: list[RowFailure] = []
        retry_rows: list[_RowUpdate] | None = None
        try:
            with self._transaction() as conn:
                rows = conn.execute(self._select()).all()
                if not rows:
                    return False
                batch.rows_scanned = len(rows)
                last_key = self._primary_key(rows[-1])
                updates = self._reseal(rows, failures)
                try:
                    written = self._write(conn, updates) if updates else (0, 0, 0)
                except IntegrityError:
                    # A row collides with a unique index (one value under two key
                    # versions): roll the batch back, then write row by row.
                    retry_rows = updates
                    raise
                self._count(batch, updates, written, failures)
                self.cursor = last_key
                self._save_checkpoint(conn, batch)
        except IntegrityError:
            if retry_rows is None:
                raise
            self.cursor = last_key
            self._write_one_by_one(retry_rows, batch, failures)
            return True
        self._finish_batch(batch, failures)
        return True

    def _finish_batch(self, batch: WorkerStats, failures: list[RowFailure]) -> None:
        self.stats.add(batch)
        self.failures.extend(failures)
        for failure in failures:
            logger.warning(
                "re-encryption failed for %s primary key %s: %s",
                f"{failure.table}.{failure.column}",
                failure.primary_key,
                failure.error_class,
            )
        if self.on_batch is not None:
            self.on_batch(BatchReport(self.slot, batch, failures))
        if self.rate_limiter is not None:
            self.rate_limiter.acquire(batch.rows_scanned)

    def _count(
        self,
        batch: WorkerStats,
        updates: list[_RowUpdate],
        written: tuple[int, int, int],
        failures: list[RowFailure],
    ) -> None:
        rows, values, moved = written
        batch.values_reencrypted = values
        batch.values_moved = moved
        batch.rows_skipped = len(updates) - rows
        batch.rows_failed = self._failed_row_count(failures)

    def _failed_row_count(self, failures: list[RowFailure]) -> int:
        primary_keys = {failure.primary_key for failure in failures}
        if self.count_new_failures is None:
            return len(primary_keys)
        return self.count_new_failures(self.label, primary_keys)

    def _save_checkpoint(self, conn: Connection, batch: WorkerStats) -> None:
        if self.checkpoint_store is None or self.checkpoint is None:
            return
        checkpoint = self.checkpoint
        checkpoint.cursor = self.cursor
        checkpoint.rows_scanned += batch.rows_scanned
        checkpoint.values_reencrypted += batch.values_reencrypted
        checkpoint.rows_skipped += batch.rows_skipped
        checkpoint.rows_failed += batch.rows_failed
        self.checkpoint_store.save(conn, checkpoint)

    # -- re-sealing -------------------------------------------------------------

    def _primary_key(self, row: Row[Any]) -> tuple[Any, ...]:
        mapping = row._mapping
        return tuple(mapping[name] for name in self._pk_names)

    def _reseal(self, rows: Sequence[Row[Any]], failures: list[RowFailure]) -> list[_RowUpdate]:
        # One active-key lookup per tenant and purpose per batch, whatever the
        # key provider's own caching.
        self._active_keys = {}
        updates = []
        for row in rows:
            mapping = row._mapping
            primary_key = self._primary_key(row)
            row_tenant = mapping[self._tenant_name] if self._tenant_name else None
            values: dict[str, tuple[Any, Any]] = {}
            moved: set[str] = set()
            for column in self.columns:
                stored = mapping[column.name]
                prefix = prefix_of(stored, column.is_base64)
                if prefix is None:
                    continue
                entry = self.headers.get(column.name, {}).get(prefix)
                moves = self._moves_value(column, prefix, row_tenant)
                if entry is None and not moves:
                    continue
                try:
                    if moves:
                        new = self._move_value(column, stored, row_tenant)
                        moved.add(column.name)
                    else:
                        assert entry is not None
                        new = self._reseal_value(column, stored, entry, row_tenant)
                except (KmsError, ReencryptionError):
                    # Not the row's fault: stop the job rather than fail every row.
                    raise
                except EncryptionError as exc:
                    failures.append(
                        RowFailure(
                            self.label, column.name, primary_key, type(exc).__name__, str(exc)
                        )
                    )
                    continue
                if new is not None:
                    values[column.name] = (stored, new)
            if values:
                updates.append(_RowUpdate(primary_key, values, frozenset(moved & set(values))))
        return updates

    def _reseal_value(
        self, column: EncryptedColumn, stored: Any, entry: CensusEntry, row_tenant: Any
    ) -> Any:
        """Return the value re-sealed under its tenant's active DEK, or None when
        the active key is not newer than the one that sealed it.

        :meth:`EncryptedType.reseal` authenticates the value and seals its
        encoded plaintext again without decoding it, so no value changes
        through a codec round trip.

        The tenant is the owner of the key named in the value's header (from
        the keyring's metadata, through the census). A successful decryption
        proves it, because the AAD binds the key's tenant; a tenant column that
        disagrees fails the row, unless the job moves such values (see
        :meth:`_move_value`). The job runs outside any ``tenant_scope``.
        """
        tenant = entry.tenant_id
        if tenant is None:
            raise KeyNotFoundError(
                f"encrypted column {column.label}: key id {entry.key_id} is not in the keyring"
            )
        if isinstance(row_tenant, str) and row_tenant != tenant:
            raise TenantContextError(
                f"encrypted column {column.label}: the value is sealed under key id "
                f"{entry.key_id} of tenant {tenant!r}, but the row belongs to tenant "
                f"{row_tenant!r}; it is left as it is"
            )
        return self._with_active_key(
            column, tenant, lambda active: self._reseal_under(column, stored, entry, tenant, active)
        )

    def _move_value(self, column: EncryptedColumn, stored: Any, row_tenant: Any) -> Any:
        """Return the value sealed under the active DEK of its row's tenant.

        The value is opened with the key its header names, whatever tenant
        owns that key, so the tenant column decides who can read it from now on.
        """
        if not isinstance(row_tenant, str) or not row_tenant:
            raise TenantContextError(
                f"encrypted column {column.label}: the value is sealed under another tenant's "
                f"key, and tenant column {self._tenant_name!r} of its row holds no tenant to "
                "move it to; it is left as it is"
            )

        def move(active: DataKey) -> Any:
            column_type = column.column_type
            if self.reencode:
                sealed = column_type.reencode(stored, active, move_tenant=True)
                # A value moves to another tenant's key, so it always changes.
                assert sealed is not None
            else:
                sealed = column_type.reseal(stored, active, move_tenant=True)
            return _stored_form(column, sealed)

        return self._with_active_key(column, row_tenant, move)

    def _with_active_key(
        self, column: EncryptedColumn, tenant: str, seal: Callable[[DataKey], Any]
    ) -> Any:
        """Call ``seal`` with the active DEK of ``tenant`` for the column's purpose."""
        column_type = column.column_type
        slot = (tenant, column_type.purpose)
        active = self._active_keys.get(slot)
        if active is None:
            active = column_type.key_provider.active_key(tenant, column_type.purpose)
            self._active_keys[slot] = active
        try:
            return seal(active)
        except KeyUsageLimitError as exc:
            if not exc.replaced:
                raise
        # The active DEK reached its usage limit and the key provider made a
        # newer version active: the value goes to that one.
        active = column_type.key_provider.active_key(tenant, column_type.purpose)
        self._active_keys[slot] = active
        return seal(active)

    def _reseal_under(
        self,
        column: EncryptedColumn,
        stored: Any,
        entry: CensusEntry,
        tenant: str,
        active: DataKey,
    ) -> Any:
        column_type = column.column_type
        if active.version < entry.key_version:
            raise ReencryptionError(
                f"encrypted column {column.label}: tenant {tenant!r} has key version "
                f"{entry.key_version} in use, but this process sees version "
                f"{active.version} as active; wait for the active-key cache to expire "
                "and run the job again"
            )
        if self.reencode:
            # None when the value is under the active key with the current encoding.
            sealed = column_type.reencode(stored, active)
            return None if sealed is None else _stored_form(column, sealed)
        if active.version == entry.key_version:
            return None
        return _stored_form(column, column_type.reseal(stored, active))

    # -- writing ----------------------------------------------------------------

    def _write(self, conn: Connection, updates: list[_RowUpdate]) -> tuple[int, int, int]:
        """Write ``updates`` with compare-and-swap; return the rows, the
        values and the moved values written.

        Rows are grouped by the columns they change and the columns whose
        value moves to the row's tenant. On PostgreSQL with psycopg each group
        is one statement taking arrays (see :meth:`_write_arrays`); elsewhere
        it is an executemany of single-row updates.
        """
        groups: dict[tuple[tuple[str, ...], frozenset[str]], list[_RowUpdate]] = {}
        for update in updates:
            groups.setdefault((tuple(sorted(update.values)), update.moved), []).append(update)
        rows = values = moved = 0
        for (names, moved_names), group in groups.items():
            if self._dialect == "postgresql" and conn.dialect.driver == "psycopg":
                written = self._write_arrays(conn, names, group)
            else:
                parameters = []
                for update in group:
                    row = {f"pk_{i}": value for i, value in enumerate(update.primary_key)}
                    for name in names:
                        row[f"old_{name}"], row[f"new_{name}"] = update.values[name]
                    parameters.append(row)
                written = conn.execute(self._update_statement(names), parameters).rowcount
            rows += written
            values += written * len(names)
            moved += written * len(moved_names)
        return rows, values, moved

    def _array_sql(self, conn: Connection, names: tuple[str, ...]) -> str:
        """Return ``UPDATE t SET col = v.new FROM unnest(%(pk_0)b, ...) AS v(...)
        WHERE t.pk = v.pk AND t.col = v.old RETURNING t.pk`` for one set of columns.

        Each field of the batch travels as one array in psycopg's binary
        format, so the whole batch is one statement and one round trip, and
        no byte is escaped as text. The planner joins the arrays to the table
        through its primary key index.
        """
        sql = self._array_sqls.get(names)
        if sql is not None:
            return sql
        dialect = conn.dialect
        preparer = dialect.identifier_preparer

        def quote(name: str) -> str:
            return preparer.quote(name).replace("%", "%%")

        raw = self._raw
        fields: list[tuple[str, str]] = []
        for i, name in enumerate(self._pk_names):
            fields.append((f"pk_{i}", raw.c[name].type.compile(dialect=dialect)))
        for name in names:
            storage = raw.c[name].type.compile(dialect=dialect)
            fields += [(f"old_{name}", storage), (f"new_{name}", storage)]
        arrays = ", ".join(f"%({key})b::{sql_type}[]" for key, sql_type in fields)
        aliases = ", ".join(f"f{i}" for i in range(len(fields)))
        position = {key: f"v.f{i}" for i, (key, _) in enumerate(fields)}
        table = preparer.format_table(self.table).replace("%", "%%")
        assignments = ", ".join(f"{quote(name)} = {position[f'new_{name}']}" for name in names)
        conditions = [
            f"t.{quote(name)} = {position[f'pk_{i}']}" for i, name in enumerate(self._pk_names)
        ]
        conditions += [f"t.{quote(name)} = {position[f'old_{name}']}" for name in names]
        returning = ", ".join(f"t.{quote(name)}" for name in self._pk_names)
        # Every name in the text is a quoted identifier or generated here.
        sql = (
            f"UPDATE {table} AS t SET {assignments} FROM unnest({arrays}) AS v({aliases}) "  # noqa: S608
            f"WHERE {' AND '.join(conditions)} RETURNING {returning}"
        )
        self._array_sqls[names] = sql
        return sql

    def _write_arrays(
        self, conn: Connection, names: tuple[str, ...], group: list[_RowUpdate]
    ) -> int:
        parameters: dict[str, list[Any]] = {}
        for i in range(len(self._pk_names)):
            parameters[f"pk_{i}"] = [update.primary_key[i] for update in group]
        for name in names:
            parameters[f"old_{name}"] = [update.values[name][0] for update in group]
            parameters[f"new_{name}"] = [update.values[name][1] for update in group]
        return len(conn.exec_driver_sql(self._array_sql(conn, names), parameters).all())

    def _update_statement(self, names: tuple[str, ...]) -> sa.Update:
        """Return ``UPDATE t SET col = :new WHERE pk = :pk AND col = :old`` for one
        set of columns, built once so that SQLAlchemy compiles it once."""
        statement = self._updates.get(names)
        if statement is None:
            raw = self._raw
            conditions = [
                raw.c[name] == sa.bindparam(f"pk_{i}") for i, name in enumerate(self._pk_names)
            ]
            conditions += [raw.c[name] == sa.bindparam(f"old_{name}") for name in names]
            statement = (
                sa.update(raw)
                .where(*conditions)
                .values({name: sa.bindparam(f"new_{name}") for name in names})
            )
            self._updates[names] = statement
        return statement

    def _write_row(self, conn: Connection, update: _RowUpdate) -> bool:
        return self._write(conn, [update])[0] == 1

    def _rejected_row(self, update: _RowUpdate, error: IntegrityError) -> RowFailure:
        """Return the one failure of a row whose update the database rejected.

        It names the re-encrypted columns of the constraint that the
        database names, or every re-encrypted column of the row when the
        database names no constraint or columns (a driver this module does
        not read, for example).
        """
        rejection = describe_rejection(error, self.table)
        blamed = [name for name in rejection.columns if name in update.values]
        column = ",".join(blamed or sorted(update.values))
        return RowFailure(
            self.label, column, update.primary_key, "IntegrityError", rejection.message()
        )

    def _write_one_by_one(
        self, updates: list[_RowUpdate], batch: WorkerStats, failures: list[RowFailure]
    ) -> None:
        """Write each row in its own transaction, recording the rows the
        database rejects, then save the checkpoint past the whole batch."""
        written: set[tuple[Any, ...]] = set()
        rejected: set[tuple[Any, ...]] = set()
        for update in updates:
            try:
                with self._transaction() as conn:
                    if self._write_row(conn, update):
                        written.add(update.primary_key)
            except IntegrityError as exc:
                rejected.add(update.primary_key)
                failures.append(self._rejected_row(update, exc))
        batch.values_reencrypted = sum(
            len(update.values) for update in updates if update.primary_key in written
        )
        batch.values_moved = sum(
            len(update.moved) for update in updates if update.primary_key in written
        )
        batch.rows_failed = self._failed_row_count(failures)
        batch.rows_skipped = len(updates) - len(written) - len(rejected)
        with self._transaction() as conn:
            self._save_checkpoint(conn, batch)
        self._finish_batch(batch, failures)


def _stored_form(column: EncryptedColumn, sealed: bytes) -> Any:
    """Return an envelope as the column stores it: bytes, or base64 text."""
    if column.is_base64:
        return base64.b64encode(sealed).decode("ascii")
    return sealed
