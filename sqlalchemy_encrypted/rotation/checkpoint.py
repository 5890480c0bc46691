"""The checkpoint table: where each re-encryption worker has got to.

One row per (job name, table, worker slot) stores the primary key of the
last row the worker committed, its counters and its status. A worker writes its
row in the same transaction as the batch it describes, so after a crash the
checkpoint never claims work that was rolled back.

A run that resumes a slot keeps the values re-encrypted, rows scanned and
rows skipped of the earlier run, because that work stays done. It counts
failed rows afresh, because it tries them again, and keeps in ``error`` a
note that the earlier run failed (see :func:`earlier_run_note`).

The checkpoint only saves rescanning: which values still need work is always
decided from the stored headers, and the job ends with a census, so a lost
or stale checkpoint costs time, never correctness.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import socket
import uuid
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import ConfigurationError

__all__ = [
    "DEFAULT_CHECKPOINT_TABLE",
    "Checkpoint",
    "CheckpointStatus",
    "CheckpointStore",
    "SlotLease",
    "checkpoint_table",
    "earlier_run_note",
    "held_slot_locks",
    "owner_is_running",
]

DEFAULT_CHECKPOINT_TABLE = "encryption_reencrypt_checkpoints"

# Worker slots a job may use per table; more workers than this is a mistake.
MAX_SLOTS = 256


class CheckpointStatus:
    """Values of the checkpoint's ``status`` column."""

    RUNNING = "running"  # scanning the table
    IDLE = "idle"  # finished its scan, waiting for the other workers
    SUCCEEDED = "succeeded"  # the census after the run found nothing left
    FAILED = "failed"  # stopped by an error, or rows were left behind


def checkpoint_table(
    metadata: sa.MetaData | None = None,
    name: str = DEFAULT_CHECKPOINT_TABLE,
    schema: str | None = None,
) -> sa.Table:
    """Define the checkpoint table in ``metadata`` (a new MetaData if None).

    Add it to the application's own MetaData to create it with the rest of
    the schema or through Alembic. Otherwise the job creates it on first use.
    """
    metadata = metadata if metadata is not None else sa.MetaData()
    return sa.Table(
        name,
        metadata,
        sa.Column("job_name", sa.String(200), primary_key=True),
        sa.Column("table_name", sa.String(255), primary_key=True),
        sa.Column("slot", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("columns", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("pass_number", sa.Integer, nullable=False),
        sa.Column("cursor", sa.Text, nullable=True),
        sa.Column("rows_scanned", sa.BigInteger, nullable=False),
        sa.Column("values_reencrypted", sa.BigInteger, nullable=False),
        sa.Column("rows_skipped", sa.BigInteger, nullable=False),
        sa.Column("rows_failed", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        schema=schema,
    )


@dataclass
class Checkpoint:
    """One worker's checkpoint row."""

    job_name: str
    table_name: str
    slot: int
    columns: str
    status: str
    pass_number: int
    cursor: tuple[Any, ...] | None
    rows_scanned: int
    values_reencrypted: int
    rows_skipped: int
    rows_failed: int
    owner: str
    error: str | None
    started_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_name": self.job_name,
            "table": self.table_name,
            "slot": self.slot,
            "columns": self.columns,
            "status": self.status,
            "pass_number": self.pass_number,
            "cursor": None if self.cursor is None else [str(v) for v in self.cursor],
            "rows_scanned": self.rows_scanned,
            "values_reencrypted": self.values_reencrypted,
            "rows_skipped": self.rows_skipped,
            "rows_failed": self.rows_failed,
            "owner": self.owner,
            "error": self.error,
            "started_at": self.started_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "finished_at": None if self.finished_at is None else self.finished_at.isoformat(),
        }


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _saved_before(checkpoint: Checkpoint, moment: dt.datetime) -> bool:
    """Return True when the checkpoint was last saved before ``moment``.

    SQLite and MariaDB return the stored UTC time without a time zone.
    NOTE: MariaDB's DATETIME keeps whole seconds, so there a slot saved
    shortly after ``moment``, within the same second, counts as saved
    before it. So does a slot saved by a host whose clock runs behind.
    """
    saved = checkpoint.updated_at
    if saved.tzinfo is None:
        saved = saved.replace(tzinfo=dt.UTC)
    return saved < moment


def earlier_run_note(checkpoint: Checkpoint) -> str | None:
    """Return the ``error`` that a slot keeps when a new run takes it over.

    The note names the earlier run's failure, or its interruption after
    rows failed, with its count of failed rows. Otherwise the slot keeps the
    note it had, so a failure stays visible over several resumptions.
    """
    failed = checkpoint.rows_failed
    if checkpoint.status == CheckpointStatus.FAILED:
        note = "an earlier run failed"
        if checkpoint.error:
            note += f": {checkpoint.error}"
        if failed:
            note += f" ({failed} row(s) failed)"
        return note[:2000]
    if failed:
        return f"an earlier run was interrupted after {failed} row(s) failed"
    return checkpoint.error


def owner_name() -> str:
    """Return ``host:pid``, naming the process that owns a slot."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_running(owner: str) -> bool | None:
    """Return whether the process named by an ``owner_name()`` runs, or None
    when it runs on another host, where this process cannot tell.

    NOTE: a process id reused by an unrelated process counts as running.
    """
    host, _, pid_text = owner.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


# -- primary key cursors ------------------------------------------------------

_CURSOR_TYPES: dict[type, str] = {
    int: "int",
    str: "str",
    uuid.UUID: "uuid",
    dt.datetime: "datetime",
    dt.date: "date",
    decimal.Decimal: "decimal",
}


def check_cursor_types(table: sa.Table) -> None:
    """Raise :class:`ConfigurationError` when a primary key column has a type
    the checkpoint cannot store."""
    for column in table.primary_key.columns:
        try:
            python_type = column.type.python_type
        except NotImplementedError:
            python_type = object
        if python_type not in _CURSOR_TYPES:
            raise ConfigurationError(
                f"table {table.name}: primary key column {column.name} has type "
                f"{column.type}, which the re-encryption checkpoint cannot store; "
                "supported are integers, strings, UUIDs, dates, datetimes and decimals, "
                "or run without a checkpoint"
            )


def encode_cursor(values: Sequence[Any]) -> str:
    encoded = []
    for value in values:
        kind = _CURSOR_TYPES.get(type(value))
        if kind is None and isinstance(value, int):
            kind, value = "int", int(value)
        if kind is None:
            raise ConfigurationError(
                f"cannot store a primary key value of type {type(value).__name__} "
                "in the re-encryption checkpoint"
            )
        text = value.isoformat() if isinstance(value, dt.date) else str(value)
        encoded.append([kind, text if kind != "int" else int(value)])
    return json.dumps(encoded)


def decode_cursor(text: str) -> tuple[Any, ...]:
    decoded: list[Any] = []
    for kind, value in json.loads(text):
        if kind == "int":
            decoded.append(int(value))
        elif kind == "str":
            decoded.append(str(value))
        elif kind == "uuid":
            decoded.append(uuid.UUID(value))
        elif kind == "datetime":
            decoded.append(dt.datetime.fromisoformat(value))
        elif kind == "date":
            decoded.append(dt.date.fromisoformat(value))
        elif kind == "decimal":
            decoded.append(decimal.Decimal(value))
        else:
            raise ConfigurationError(f"unknown primary key type {kind!r} in a checkpoint")
    return tuple(decoded)


# -- the store ---------------------------------------------------------------


class CheckpointStore:
    """Reads and writes checkpoint rows of one checkpoint table."""

    def __init__(self, name: str = DEFAULT_CHECKPOINT_TABLE, schema: str | None = None) -> None:
        self.table = checkpoint_table(name=name, schema=schema)

    def create(self, bind: Engine | Connection) -> None:
        """Create the checkpoint table if it does not exist."""
        try:
            self.table.create(bind, checkfirst=True)
        except sa.exc.DBAPIError:
            # Another worker created it between the check and the CREATE.
            if not sa.inspect(bind).has_table(self.table.name, schema=self.table.schema):
                raise

    def exists(self, conn: Connection) -> bool:
        return sa.inspect(conn).has_table(self.table.name, schema=self.table.schema)

    def _key(self, job_name: str, table_name: str, slot: int) -> Any:
        c = self.table.c
        return sa.and_(c.job_name == job_name, c.table_name == table_name, c.slot == slot)

    def _from_row(self, row: Any) -> Checkpoint:
        return Checkpoint(
            job_name=row.job_name,
            table_name=row.table_name,
            slot=row.slot,
            columns=row.columns,
            status=row.status,
            pass_number=row.pass_number,
            cursor=None if row.cursor is None else decode_cursor(row.cursor),
            rows_scanned=row.rows_scanned,
            values_reencrypted=row.values_reencrypted,
            rows_skipped=row.rows_skipped,
            rows_failed=row.rows_failed,
            owner=row.owner,
            error=row.error,
            started_at=row.started_at,
            updated_at=row.updated_at,
            finished_at=row.finished_at,
        )

    def load(
        self, conn: Connection, job_name: str, table_name: str, slot: int
    ) -> Checkpoint | None:
        row = conn.execute(
            sa.select(self.table).where(self._key(job_name, table_name, slot))
        ).first()
        return None if row is None else self._from_row(row)

    def list(
        self, conn: Connection, job_name: str | None = None, table_name: str | None = None
    ) -> list[Checkpoint]:
        """Return the checkpoints of a job (or of every job), ordered by table and slot."""
        query = sa.select(self.table)
        if job_name is not None:
            query = query.where(self.table.c.job_name == job_name)
        if table_name is not None:
            query = query.where(self.table.c.table_name == table_name)
        query = query.order_by(self.table.c.job_name, self.table.c.table_name, self.table.c.slot)
        return [self._from_row(row) for row in conn.execute(query)]

    def start(
        self,
        conn: Connection,
        job_name: str,
        table_name: str,
        slot: int,
        columns: str,
        *,
        new_run: bool = True,
    ) -> Checkpoint:
        """Take over the slot's checkpoint, or create it.

        A checkpoint left running, idle or failed is resumed from its
        cursor, and a succeeded one starts afresh. ``new_run`` is True when the
        caller's run has not used the slot before: the failed rows of the
        earlier run then turn into the note of :func:`earlier_run_note`, and
        the count starts at 0. A later pass of the same run keeps counting.
        """
        now = _now()
        existing = self.load(conn, job_name, table_name, slot)
        if existing is not None and existing.status != CheckpointStatus.SUCCEEDED:
            if new_run:
                existing.error = earlier_run_note(existing)
                existing.rows_failed = 0
            existing.status = CheckpointStatus.RUNNING
            existing.owner = owner_name()
            existing.columns = columns
            existing.finished_at = None
            self.save(conn, existing)
            return existing
        checkpoint = Checkpoint(
            job_name=job_name,
            table_name=table_name,
            slot=slot,
            columns=columns,
            status=CheckpointStatus.RUNNING,
            pass_number=1,
            cursor=None,
            rows_scanned=0,
            values_reencrypted=0,
            rows_skipped=0,
            rows_failed=0,
            owner=owner_name(),
            error=None,
            started_at=now,
            updated_at=now,
            finished_at=None,
        )
        values = self._values(checkpoint)
        if existing is None:
            conn.execute(sa.insert(self.table).values(**values))
        else:
            conn.execute(
                sa.update(self.table).where(self._key(job_name, table_name, slot)).values(**values)
            )
        return checkpoint

    def _values(self, checkpoint: Checkpoint) -> dict[str, Any]:
        return {
            "job_name": checkpoint.job_name,
            "table_name": checkpoint.table_name,
            "slot": checkpoint.slot,
            "columns": checkpoint.columns,
            "status": checkpoint.status,
            "pass_number": checkpoint.pass_number,
            "cursor": None if checkpoint.cursor is None else encode_cursor(checkpoint.cursor),
            "rows_scanned": checkpoint.rows_scanned,
            "values_reencrypted": checkpoint.values_reencrypted,
            "rows_skipped": checkpoint.rows_skipped,
            "rows_failed": checkpoint.rows_failed,
            "owner": checkpoint.owner,
            "error": checkpoint.error,
            "started_at": checkpoint.started_at,
            "updated_at": checkpoint.updated_at,
            "finished_at": checkpoint.finished_at,
        }

    def save(self, conn: Connection, checkpoint: Checkpoint) -> None:
        """Write ``checkpoint`` back; call it inside the batch's transaction."""
        checkpoint.updated_at = _now()
        conn.execute(
            sa.update(self.table)
            .where(self._key(checkpoint.job_name, checkpoint.table_name, checkpoint.slot))
            .values(**self._values(checkpoint))
        )

    def finish_all(
        self,
        conn: Connection,
        job_name: str,
        table_name: str,
        status: str,
        error: str | None,
        *,
        run_slots: Collection[int] | None = None,
        run_started: dt.datetime | None = None,
    ) -> None:
        """Mark every slot of the job's table finished, ready for a new run.

        ``run_slots`` are the slots the finishing run used, and ``run_started``
        is when it began. Another slot that is failed, or was last saved before
        then, belongs to an earlier run, for example one with more workers,
        or to a worker of another process that failed. Its failed rows turn
        into the note of :func:`earlier_run_note`, as when a run resumes a
        slot. ``error`` is stored when ``status`` is failed; otherwise each
        slot keeps its note.
        """
        now = _now()
        for checkpoint in self.list(conn, job_name, table_name):
            if (
                run_slots is not None
                and checkpoint.slot not in run_slots
                and (
                    checkpoint.status == CheckpointStatus.FAILED
                    or run_started is None
                    or _saved_before(checkpoint, run_started)
                )
            ):
                checkpoint.error = earlier_run_note(checkpoint)
                checkpoint.rows_failed = 0
            if status == CheckpointStatus.FAILED:
                checkpoint.error = error
            checkpoint.status = status
            checkpoint.cursor = None
            checkpoint.finished_at = now
            self.save(conn, checkpoint)


# -- slot leases ---------------------------------------------------------------


def held_slot_locks(conn: Connection) -> set[tuple[int, int]] | None:
    """Return the advisory locks with two int4 keys that live sessions of the
    database hold, as (first key, second key) pairs, or None on a database
    without slot locks.

    It reads ``pg_locks`` and takes no lock, so a worker that starts
    meanwhile never has to pick another slot. ``pg_locks`` shows the two keys
    as ``classid`` and ``objid``, with ``objsubid`` 2. Both are oids, so a
    negative key appears as its unsigned 32-bit value.
    """
    if conn.dialect.name != "postgresql":
        return None
    rows = conn.execute(
        sa.text(
            "SELECT classid, objid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 2 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    )
    return {(int(row.classid), int(row.objid)) for row in rows}


def _lock_class(job_name: str, table_name: str) -> int:
    """Return a signed 32-bit advisory lock namespace for one job and table."""
    digest = zlib.crc32(f"sqlalchemy_encrypted:{job_name}:{table_name}".encode())
    return digest - (1 << 32) if digest >= (1 << 31) else digest


class SlotLease:
    """Ownership of one worker slot of a job's table.

    On PostgreSQL the lease is a session advisory lock taken on the worker's
    own connection, so it keeps no transaction open. The server releases it
    as soon as the owning process dies, and a restarted worker can take the
    slot over. Other databases run one worker, which always has slot 0.
    """

    def __init__(self, job_name: str, table_name: str) -> None:
        self._lock_class = _lock_class(job_name, table_name)
        self._conn: Connection | None = None
        self.slot: int | None = None

    def acquire(self, conn: Connection) -> int:
        """Take the lowest free slot on ``conn`` and return it."""
        if conn.dialect.name != "postgresql":
            self.slot = 0
            return 0
        for slot in range(MAX_SLOTS):
            taken = conn.execute(
                sa.select(sa.func.pg_try_advisory_lock(self._lock_class, slot))
            ).scalar_one()
            conn.commit()
            if taken:
                self._conn = conn
                self.slot = slot
                return slot
        raise ConfigurationError(f"all {MAX_SLOTS} worker slots of the job are taken")

    def release(self) -> None:
        """Give the slot back; a connection that cannot unlock is discarded."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.rollback()
            conn.execute(sa.select(sa.func.pg_advisory_unlock(self._lock_class, self.slot)))
            conn.commit()
        except sa.exc.DBAPIError:
            conn.invalidate()

    def lock_key(self, slot: int) -> tuple[int, int]:
        """Return the lock of ``slot`` as :func:`held_slot_locks` lists it."""
        return (self._lock_class & 0xFFFFFFFF, slot)

    def is_held(self, engine: Engine, slot: int) -> bool:
        """Return True when a live session has the lock of ``slot``."""
        if engine.dialect.name != "postgresql":
            return False
        with engine.connect() as conn:
            taken = conn.execute(
                sa.select(sa.func.pg_try_advisory_lock(self._lock_class, slot))
            ).scalar_one()
            if taken:
                conn.execute(sa.select(sa.func.pg_advisory_unlock(self._lock_class, slot)))
            conn.commit()
        return not taken
