"""The re-encryption job: census, workers, passes and the verifying census.

A run takes a census of the selected columns, re-encrypts every stale value
table by table (with several workers on PostgreSQL), and takes the census
again. It reports success only when that last census finds no stale value
in its scope and no row failed. Rows an application changed while the job
ran, or rows another worker held, are picked up by a further pass, up to
``max_passes``.

With ``move_to_row_tenant``, the job also seals values found under another
tenant's key than their row's tenant column names under the row's tenant,
which the census counts as tenant mismatches.

With ``reencode``, the first pass also reads the values already under the
active key version, decodes each with the column's codec and encodes it
again, so values stored before a codec rule existed get today's encoding.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import ConfigurationError, ReencryptionError
from ..statement_errors import database_message
from .census import Census, census
from .checkpoint import (
    DEFAULT_CHECKPOINT_TABLE,
    CheckpointStatus,
    CheckpointStore,
    SlotLease,
    check_cursor_types,
)
from .columns import EncryptedColumn, Target, resolve_columns
from .ratelimit import RateLimiter
from .worker import BatchReport, MoveHeaders, RowFailure, StaleHeaders, TableWorker, WorkerStats

__all__ = [
    "ReencryptionJob",
    "ReencryptionProgress",
    "ReencryptionResult",
    "RowFailure",
    "reencrypt",
]

logger = logging.getLogger("sqlalchemy_encrypted.rotation")
audit = logging.getLogger("sqlalchemy_encrypted.audit")

# Appended to the checkpoint's column list by a run with reencode, so that
# such a run does not resume after rows that a run without it left in their
# old encoding.
_REENCODE_MARK = " (reencode)"

# Failures kept in a result; the count of all failures is kept apart.
MAX_REPORTED_FAILURES = 1000

Status = Literal["succeeded", "failed", "dry_run"]


@dataclass(frozen=True)
class ReencryptionProgress:
    """Running totals of a job, passed to the progress callback after each batch."""

    table: str
    slot: int
    pass_number: int
    rows_scanned: int
    values_reencrypted: int
    rows_skipped: int
    rows_failed: int
    values_planned: int
    elapsed: float
    values_moved: int = 0


@dataclass
class ReencryptionResult:
    """The outcome of a run.

    ``planned`` and ``remaining`` map ``table.column`` to stale values before
    and after the run. With ``reencode``, ``planned`` also counts the values
    under the active key version, which the run decodes and encodes again,
    and ``values_reencrypted`` counts only the values it wrote.
    ``rows_skipped`` counts rows an application changed between read and
    write (its write was kept). ``failures`` lists at most 1,000 failures:
    one per value that could not be re-encrypted, and one per row that the
    database rejected as a whole, such as a duplicate in a unique index,
    listed under the column of the constraint it names. ``failures_total``
    counts all of them.

    ``tenant_mismatches`` maps ``table.column`` to values sealed under
    another tenant's key than their row's tenant column names: after the
    run, or before it for a dry run. ``moves_planned`` counts those the run
    set out to move (with ``move_to_row_tenant`` only), and
    ``values_moved`` those it moved, which ``values_reencrypted`` includes.
    """

    status: Status
    before: Census
    after: Census | None
    planned: dict[str, int]
    remaining: dict[str, int]
    rows_scanned: int = 0
    values_reencrypted: int = 0
    rows_skipped: int = 0
    failures: list[RowFailure] = field(default_factory=list)
    failures_total: int = 0
    passes: int = 0
    elapsed: float = 0.0
    tenant_mismatches: dict[str, int] = field(default_factory=dict)
    moves_planned: dict[str, int] = field(default_factory=dict)
    values_moved: int = 0

    @property
    def ok(self) -> bool:
        """True when the run succeeded (or was a dry run).

        Values whose key id no keyring row has (see :attr:`unknown_keys`)
        cannot be moved and do not make a run fail, but
        :meth:`raise_for_failures` reports them.
        """
        return self.status != "failed"

    @property
    def unknown_keys(self) -> dict[str, int]:
        """``{table.column: count}`` of values left under key ids missing from the keyring.

        Such values usually mean that the keyring table was restored from a
        backup older than the data, or belongs to another environment.
        """
        return self.after.unknown_keys if self.after is not None else {}

    def raise_for_failures(self) -> None:
        """Raise :class:`ReencryptionError` unless the run succeeded, no
        value is left under a key id missing from the keyring, and no value
        is left under another tenant's key than its row's tenant column names."""
        unknown = self.unknown_keys
        if self.ok and not unknown and not self.tenant_mismatches:
            return
        parts = []
        if self.remaining:
            left = ", ".join(f"{label}: {count}" for label, count in sorted(self.remaining.items()))
            parts.append(f"values still under an old key version ({left})")
        if self.failures_total:
            first = self.failures[0]
            parts.append(
                f"{self.failures_total} failure(s), the first in {first.table}."
                f"{first.column} primary key {first.primary_key} ({first.error_class})"
            )
        if unknown:
            left = ", ".join(f"{label}: {count}" for label, count in sorted(unknown.items()))
            parts.append(
                f"values under key ids missing from the keyring table ({left}); restore the "
                "keyring table that matches the data before rotating or re-encrypting again"
            )
        if self.tenant_mismatches:
            left = ", ".join(
                f"{label}: {count}" for label, count in sorted(self.tenant_mismatches.items())
            )
            parts.append(
                f"values under another tenant's key than their row's tenant column names "
                f"({left}); check those tenant columns, then run with move_to_row_tenant=True "
                "to seal each value under its row's tenant"
            )
        raise ReencryptionError("re-encryption did not finish: " + "; ".join(parts))

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "planned": self.planned,
            "remaining": self.remaining,
            "rows_scanned": self.rows_scanned,
            "values_reencrypted": self.values_reencrypted,
            "values_moved": self.values_moved,
            "moves_planned": self.moves_planned,
            "tenant_mismatches": self.tenant_mismatches,
            "rows_skipped": self.rows_skipped,
            "failures_total": self.failures_total,
            "failures": [failure.to_dict() for failure in self.failures],
            "passes": self.passes,
            "elapsed_seconds": round(self.elapsed, 3),
        }


class ReencryptionJob:
    """Move stale values to their tenant's active key version.

    ``bind`` is an Engine (each batch commits on its own, and the job keeps
    a checkpoint) or a Connection (batches run in savepoints of the caller's
    transaction, without checkpoint, one worker). ``target`` names the
    columns as in :func:`~sqlalchemy_encrypted.rotation.census`.

    ``tenants`` limits the job to some tenants, ``versions`` to values under
    some key versions. ``rate`` caps rows per second over all workers.

    ``move_to_row_tenant`` also seals every value found under another
    tenant's key than its row's tenant column names under the active key of
    the row's tenant. The tenant column decides who can read the value from
    then on, so check those columns first (``plan()`` counts the values per
    key tenant and row tenant). With ``tenants``, a value moves when the
    tenant of its key or of its row is one of them. ``versions`` does not
    limit moves.

    ``reencode`` makes the first pass over each table decode every selected
    value, stale or under the active version, with the column's codec and
    encode it again before sealing it under the tenant's active key (see
    :meth:`EncryptedType.reencode`). Values stored before a codec rule
    existed, such as ``1.5`` in a ``Numeric(10, 2)`` column that now stores
    ``1.50``, then match lookups again. A value whose encoding is already
    current and whose key is active is not written. A value that no longer
    fits the column (over the precision, for example) is reported as a
    failure. A job that resumes a checkpoint saved without ``reencode``
    starts that table over, because the rows before its cursor were not
    re-encoded.

    ``progress`` is called after every committed batch, from the worker's
    thread but never concurrently. Raises the error that stopped a worker
    (for example a :class:`KmsError`); rows that fail alone are reported in
    the result instead.

    Usage from a scheduler::

        result = ReencryptionJob(engine, Base.metadata, workers=4).run()
        result.raise_for_failures()
    """

    def __init__(
        self,
        bind: Engine | Connection,
        target: Target | Sequence[EncryptedColumn],
        *,
        tables: Iterable[str] | None = None,
        columns: Iterable[str] | None = None,
        tenants: Iterable[str] | None = None,
        versions: Iterable[int] | None = None,
        batch_size: int = 500,
        workers: int = 1,
        rate: float | None = None,
        dry_run: bool = False,
        job_name: str = "default",
        checkpoint: bool | None = None,
        checkpoint_table: str = DEFAULT_CHECKPOINT_TABLE,
        checkpoint_schema: str | None = None,
        max_passes: int = 3,
        progress: Callable[[ReencryptionProgress], None] | None = None,
        peer_poll_interval: float = 1.0,
        move_to_row_tenant: bool = False,
        reencode: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError(f"invalid batch size {batch_size}: it must be at least 1")
        if workers < 1:
            raise ConfigurationError(f"invalid worker count {workers}: it must be at least 1")
        if max_passes < 1:
            raise ConfigurationError(f"invalid max_passes {max_passes}: it must be at least 1")
        if reencode and workers > 1:
            raise ConfigurationError(
                f"{workers} workers cannot re-encode: a re-encoding job waits for each "
                "locked row rather than skipping it, so it runs one worker"
            )
        is_connection = isinstance(bind, Connection)
        if workers > 1 and (is_connection or bind.dialect.name != "postgresql"):
            raise ConfigurationError(
                f"{workers} workers need PostgreSQL and an Engine: other databases, and a "
                "job inside one transaction, run a single worker"
            )
        if checkpoint is None:
            checkpoint = not is_connection
        if checkpoint and is_connection:
            raise ConfigurationError(
                "a job bound to a Connection runs inside the caller's transaction and "
                "cannot keep a checkpoint: pass checkpoint=False or bind an Engine"
            )
        self.bind = bind
        self.target = target
        self.tables = None if tables is None else list(tables)
        self.columns = None if columns is None else list(columns)
        self.tenants = None if tenants is None else list(tenants)
        self.versions = None if versions is None else list(versions)
        self.batch_size = batch_size
        self.workers = workers
        self.dry_run = dry_run
        self.job_name = job_name
        self.max_passes = max_passes
        self.progress = progress
        self.peer_poll_interval = peer_poll_interval
        self.move_to_row_tenant = move_to_row_tenant
        self.reencode = reencode
        self.rate_limiter = RateLimiter(rate) if rate is not None else None
        self.store = CheckpointStore(checkpoint_table, checkpoint_schema) if checkpoint else None

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._totals = WorkerStats()
        self._failures: dict[tuple[str, str, tuple[Any, ...]], RowFailure] = {}
        # Per table, the primary keys of the rows that failed in this run, and
        # the worker slots this run used.
        self._failed_rows: dict[str, set[tuple[Any, ...]]] = {}
        self._run_slots: dict[str, set[int]] = {}
        self._started = 0.0
        self._run_started = dt.datetime.now(dt.UTC)
        self._planned_total = 0

    # -- public -----------------------------------------------------------------

    def selected_columns(self) -> list[EncryptedColumn]:
        """Return the encrypted columns this job covers."""
        target = self.target
        if isinstance(target, Sequence) and all(isinstance(c, EncryptedColumn) for c in target):
            chosen = [c for c in target if isinstance(c, EncryptedColumn)]
            return [
                c
                for c in chosen
                if (
                    self.tables is None
                    or c.qualified_table in self.tables
                    or c.table.name in self.tables
                )
                and (self.columns is None or c.name in self.columns or c.label in self.columns)
            ]
        return resolve_columns(target, self.tables, self.columns)  # type: ignore[arg-type]

    def plan(self) -> Census:
        """Take the census of the job's columns; nothing is written."""
        return census(self.bind, self.selected_columns(), tenants=self.tenants)

    def run(self) -> ReencryptionResult:
        """Run the job to the end and return what it did."""
        self._started = time.monotonic()
        self._run_started = dt.datetime.now(dt.UTC)
        selected = self.selected_columns()
        before = census(self.bind, selected, tenants=self.tenants)
        planned = before.stale(self.tenants, self.versions, include_current=self.reencode)
        moves_planned = before.mismatched() if self.move_to_row_tenant else {}
        self._planned_total = sum(planned.values()) + sum(moves_planned.values())
        result = ReencryptionResult(
            status="dry_run",
            before=before,
            after=None,
            planned=planned,
            remaining=planned,
            tenant_mismatches=before.mismatched(),
            moves_planned=moves_planned,
        )
        if self.dry_run:
            result.elapsed = time.monotonic() - self._started
            return result

        audit.info(
            "re-encryption job %r started: %d %s value(s) in %d column(s), "
            "%d value(s) to move to their row's tenant",
            self.job_name,
            sum(planned.values()),
            "stale or re-encoded" if self.reencode else "stale",
            len(planned),
            sum(moves_planned.values()),
        )
        if self.store is not None and (planned or moves_planned):
            assert isinstance(self.bind, Engine)
            self.store.create(self.bind)
            for column in selected:
                check_cursor_types(column.table)

        passes = 0
        after_columns = []
        for group in _group_by_table(selected):
            table_passes, table_census = self._run_table(group, before)
            passes = max(passes, table_passes)
            after_columns.extend(table_census.columns)
        after = Census(after_columns)
        remaining = after.stale(self.tenants, self.versions)
        result.after = after
        result.remaining = remaining
        result.tenant_mismatches = after.mismatched()
        result.passes = passes
        result.rows_scanned = self._totals.rows_scanned
        result.values_reencrypted = self._totals.values_reencrypted
        result.values_moved = self._totals.values_moved
        result.rows_skipped = self._totals.rows_skipped
        failures = list(self._failures.values())
        result.failures_total = len(failures)
        result.failures = failures[:MAX_REPORTED_FAILURES]
        unmoved = self.move_to_row_tenant and result.tenant_mismatches
        result.status = "succeeded" if not remaining and not failures and not unmoved else "failed"
        result.elapsed = time.monotonic() - self._started
        self._finish_checkpoints(selected, result)
        self._log_result(result)
        return result

    # -- per table ----------------------------------------------------------------

    def _stale_headers(
        self, group: list[EncryptedColumn], table_census: Census, pass_number: int
    ) -> StaleHeaders:
        # Re-encoding takes one pass over every value: values written later by
        # an application already have the current encoding, so further passes
        # only rewrite what is still stale.
        include_current = self.reencode and pass_number == 1
        return {
            column.name: table_census.column(column.label).stale_headers(
                self.tenants, self.versions, include_current=include_current
            )
            for column in group
        }

    def _move_headers(self, group: list[EncryptedColumn], table_census: Census) -> MoveHeaders:
        if not self.move_to_row_tenant:
            return {}
        return {
            column.name: dict(table_census.column(column.label).mismatch_headers)
            for column in group
        }

    def _run_table(self, group: list[EncryptedColumn], initial: Census) -> tuple[int, Census]:
        """Run passes over one table until its census is clean; return the pass
        count and the table's last census."""
        table_census = Census([initial.column(column.label) for column in group])
        passes = 0
        for pass_number in range(1, self.max_passes + 1):
            headers = self._stale_headers(group, table_census, pass_number)
            moves = self._move_headers(group, table_census)
            if not any(headers.values()) and not any(moves.values()):
                break
            passes = pass_number
            stats, resumed = self._run_workers(group, headers, moves, pass_number)
            self._wait_for_peers(group[0].qualified_table)
            table_census = census(self.bind, group, tenants=self.tenants)
            if stats.values_reencrypted == 0 and not resumed:
                # A full pass changed nothing: what is left failed, and would again.
                break
        return passes, table_census

    def _run_workers(
        self,
        group: list[EncryptedColumn],
        headers: StaleHeaders,
        moves: MoveHeaders,
        pass_number: int,
    ) -> tuple[WorkerStats, bool]:
        outcomes: list[tuple[WorkerStats, bool]] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                outcomes.append(self._work(group, headers, moves, pass_number))
            except BaseException as exc:
                self._stop.set()
                errors.append(exc)

        if self.workers == 1:
            # An empty context, like a new thread's: no tenant_scope of the caller
            # applies to the values of every tenant the job handles.
            contextvars.Context().run(work)
        else:
            threads = [
                threading.Thread(target=work, name=f"reencrypt-{i}", daemon=True)
                for i in range(self.workers)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        if errors:
            raise errors[0]
        total = WorkerStats()
        resumed = False
        for stats, from_cursor in outcomes:
            total.add(stats)
            resumed = resumed or from_cursor
        return total, resumed

    def _work(
        self,
        group: list[EncryptedColumn],
        headers: StaleHeaders,
        moves: MoveHeaders,
        pass_number: int,
    ) -> tuple[WorkerStats, bool]:
        label = group[0].qualified_table

        def on_batch(report: BatchReport) -> None:
            self._record(label, pass_number, report)

        if isinstance(self.bind, Connection):
            worker = TableWorker(
                self.bind,
                group,
                headers,
                batch_size=self.batch_size,
                slot=0,
                cursor=None,
                owns_transactions=False,
                rate_limiter=self.rate_limiter,
                stop=self._stop,
                on_batch=on_batch,
                count_new_failures=self._count_new_failures,
                moves=moves,
                move_tenants=self.tenants,
                reencode=self.reencode,
            )
            return worker.run(), False

        with self.bind.connect() as conn:
            lease = SlotLease(self.job_name, label)
            slot = lease.acquire(conn)
            try:
                return self._work_in_slot(conn, slot, group, headers, moves, pass_number, on_batch)
            finally:
                lease.release()

    def _work_in_slot(
        self,
        conn: Connection,
        slot: int,
        group: list[EncryptedColumn],
        headers: StaleHeaders,
        moves: MoveHeaders,
        pass_number: int,
        on_batch: Callable[[BatchReport], None],
    ) -> tuple[WorkerStats, bool]:
        label = group[0].qualified_table
        store = self.store
        checkpoint = None
        cursor = None
        if store is not None:
            with self._lock:
                used = self._run_slots.setdefault(label, set())
                new_run = slot not in used
                used.add(slot)
            columns = ",".join(c.name for c in group)
            if self.reencode:
                columns += _REENCODE_MARK
            with conn.begin():
                earlier = store.load(conn, self.job_name, label, slot)
                checkpoint = store.start(conn, self.job_name, label, slot, columns, new_run=new_run)
            if pass_number == 1:
                cursor = checkpoint.cursor
                if (
                    cursor is not None
                    and self.reencode
                    and earlier is not None
                    and not earlier.columns.endswith(_REENCODE_MARK)
                ):
                    logger.info(
                        "re-encryption of %s starts worker slot %d over: its checkpoint "
                        "was saved by a run without re-encoding",
                        label,
                        slot,
                    )
                    cursor = None
                if cursor is not None:
                    logger.info(
                        "re-encryption of %s resumes worker slot %d after primary key %s",
                        label,
                        slot,
                        cursor,
                    )
            checkpoint.cursor = None if pass_number > 1 else cursor
            checkpoint.pass_number = pass_number
        worker = TableWorker(
            conn,
            group,
            headers,
            batch_size=self.batch_size,
            slot=slot,
            cursor=cursor,
            owns_transactions=True,
            checkpoint_store=store,
            checkpoint=checkpoint,
            rate_limiter=self.rate_limiter,
            stop=self._stop,
            on_batch=on_batch,
            count_new_failures=self._count_new_failures,
            moves=moves,
            move_tenants=self.tenants,
            reencode=self.reencode,
        )
        try:
            stats = worker.run()
        except BaseException as exc:
            summary = _failure_summary(exc)
            if store is not None and checkpoint is not None:
                self._mark_failed(conn, store, checkpoint, summary)
            logger.error("re-encryption of %s stopped in worker slot %d: %s", label, slot, summary)
            raise
        if store is not None and checkpoint is not None:
            with conn.begin():
                checkpoint.status = CheckpointStatus.IDLE
                store.save(conn, checkpoint)
        return stats, cursor is not None

    def _mark_failed(
        self, conn: Connection, store: CheckpointStore, checkpoint: Any, summary: str
    ) -> None:
        try:
            conn.rollback()
            with conn.begin():
                checkpoint.status = CheckpointStatus.FAILED
                checkpoint.error = summary[:2000]
                store.save(conn, checkpoint)
        except Exception:  # the database may be what failed
            logger.warning("could not record the failure in the re-encryption checkpoint")

    def _count_new_failures(self, table: str, primary_keys: set[tuple[Any, ...]]) -> int:
        """Record rows of ``table`` that failed, and return how many of them
        had not failed before in this run.

        A later pass tries a failed row again, maybe in another worker slot,
        so the checkpoints count each failed row once per run.
        NOTE: each process keeps its own record, so when processes on
        several machines share a job, a row that fails in each is counted
        by each.
        """
        with self._lock:
            failed = self._failed_rows.setdefault(table, set())
            new = primary_keys - failed
            failed |= new
        return len(new)

    def _record(self, label: str, pass_number: int, report: BatchReport) -> None:
        with self._lock:
            self._totals.add(report.stats)
            for failure in report.failures:
                self._failures[(failure.table, failure.column, failure.primary_key)] = failure
            if self.progress is not None:
                totals = self._totals
                self.progress(
                    ReencryptionProgress(
                        table=label,
                        slot=report.slot,
                        pass_number=pass_number,
                        rows_scanned=totals.rows_scanned,
                        values_reencrypted=totals.values_reencrypted,
                        rows_skipped=totals.rows_skipped,
                        rows_failed=len(self._failures),
                        values_planned=self._planned_total,
                        elapsed=time.monotonic() - self._started,
                        values_moved=totals.values_moved,
                    )
                )

    def _wait_for_peers(self, label: str) -> None:
        """Wait while workers of this job in other processes still scan the table."""
        if self.store is None or not isinstance(self.bind, Engine):
            return
        if self.bind.dialect.name != "postgresql":
            return
        lease = SlotLease(self.job_name, label)
        while True:
            with self.bind.connect() as conn:
                checkpoints = self.store.list(conn, self.job_name, label)
            busy = [
                cp.slot
                for cp in checkpoints
                if cp.status == CheckpointStatus.RUNNING and lease.is_held(self.bind, cp.slot)
            ]
            if not busy:
                return
            logger.info("waiting for %d other worker(s) re-encrypting %s", len(busy), label)
            time.sleep(self.peer_poll_interval)

    def _finish_checkpoints(
        self, selected: list[EncryptedColumn], result: ReencryptionResult
    ) -> None:
        if self.store is None or not isinstance(self.bind, Engine):
            return
        if not result.planned and not result.moves_planned:
            return
        for group in _group_by_table(selected):
            label = group[0].qualified_table
            labels = {column.label for column in group}
            unmoved = labels & set(result.tenant_mismatches) if self.move_to_row_tenant else set()
            clean = (
                not (labels & set(result.remaining))
                and not unmoved
                and not any(failure.table == label for failure in result.failures)
            )
            status = CheckpointStatus.SUCCEEDED if clean else CheckpointStatus.FAILED
            keys = (
                "an old key version or another tenant's key," if unmoved else "an old key version"
            )
            error = None if clean else f"values left under {keys} or failed rows"
            with self.bind.begin() as conn:
                self.store.finish_all(
                    conn,
                    self.job_name,
                    label,
                    status,
                    error,
                    run_slots=self._run_slots.get(label, set()),
                    run_started=self._run_started,
                )

    def _log_result(self, result: ReencryptionResult) -> None:
        message = (
            "re-encryption job %r %s: %d value(s) re-encrypted (%d moved to their row's "
            "tenant), %d row(s) changed by the application meanwhile, %d failed, %d still "
            "stale, in %.1f s"
        )
        args = (
            self.job_name,
            result.status,
            result.values_reencrypted,
            result.values_moved,
            result.rows_skipped,
            result.failures_total,
            sum(result.remaining.values()),
            result.elapsed,
        )
        if result.ok:
            audit.info(message, *args)
        else:
            audit.warning(message, *args)


def _failure_summary(exc: BaseException) -> str:
    """Return the text that a slot stopped by ``exc`` stores and logs.

    For a database error that is the exception class, the database's
    primary message and the SQLSTATE. Its full text would also list the
    statement and its parameters (ciphertexts and primary keys), and
    PostgreSQL's DETAIL line, which can quote the values of a row.
    """
    if isinstance(exc, sa.exc.DBAPIError):
        return f"{type(exc).__name__}: {database_message(exc)}"
    return f"{type(exc).__name__}: {exc}"


def _group_by_table(columns: Sequence[EncryptedColumn]) -> list[list[EncryptedColumn]]:
    groups: dict[str, list[EncryptedColumn]] = {}
    for column in columns:
        groups.setdefault(column.qualified_table, []).append(column)
    return list(groups.values())


def reencrypt(
    bind: Engine | Connection,
    target: Target | Sequence[EncryptedColumn],
    **options: Any,
) -> ReencryptionResult:
    """Run a :class:`ReencryptionJob` with ``options`` and return its result."""
    return ReencryptionJob(bind, target, **options).run()
