"""Reading and writing keyring rows; no KMS calls and no caching here."""

from __future__ import annotations

import contextlib
import datetime
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa

from ..errors import ConfigurationError, KeyNotFoundError, KeyStateError
from ..keys import KeyPurpose
from ..kms.base import WrapContext
from . import connections
from .schema import SEALED_COUNT, KeyState

__all__ = ["KeyInfo", "KeyRow", "KeyStore", "utcnow"]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class KeyInfo:
    """Metadata of one DEK, without any key bytes."""

    key_id: uuid.UUID
    tenant_id: str
    purpose: KeyPurpose
    version: int
    state: KeyState
    kms_provider: str
    kek_id: str
    created_at: datetime.datetime
    activated_at: datetime.datetime | None
    retired_at: datetime.datetime | None
    destroyed_at: datetime.datetime | None
    rewrapped_at: datetime.datetime | None


@dataclass(frozen=True, repr=False)
class KeyRow:
    """One keyring row as read from the database, wrapped DEK included."""

    key_id: uuid.UUID
    tenant_id: str
    purpose: KeyPurpose
    version: int
    state: KeyState
    wrapped_dek: bytes | None
    kms_provider: str
    kek_id: str
    key_check: bytes
    created_at: datetime.datetime
    activated_at: datetime.datetime | None
    retired_at: datetime.datetime | None
    destroyed_at: datetime.datetime | None
    rewrapped_at: datetime.datetime | None
    row_version: int

    def __repr__(self) -> str:
        return (
            f"<KeyRow {self.key_id} tenant={self.tenant_id!r} purpose={self.purpose.value} "
            f"version={self.version} state={self.state.value} kek={self.kek_id}>"
        )

    @property
    def context(self) -> WrapContext:
        return WrapContext(self.key_id, self.tenant_id, self.purpose, self.version)

    def describe(self) -> str:
        return self.context.describe()

    def info(self) -> KeyInfo:
        return KeyInfo(
            key_id=self.key_id,
            tenant_id=self.tenant_id,
            purpose=self.purpose,
            version=self.version,
            state=self.state,
            kms_provider=self.kms_provider,
            kek_id=self.kek_id,
            created_at=self.created_at,
            activated_at=self.activated_at,
            retired_at=self.retired_at,
            destroyed_at=self.destroyed_at,
            rewrapped_at=self.rewrapped_at,
        )

    def evolve(self, **changes: Any) -> KeyRow:
        return replace(self, **changes)


_ENUM_COLUMNS = {"purpose", "state"}
# Atomic reservations tried before giving up; each loses only to another process
# that reserved in between.
_RESERVE_ATTEMPTS = 20
# States of keys that another process may still hold in its cache, but that
# must not seal anything more.
_NO_SEALS = (KeyState.RETIRED.value, KeyState.DESTROYED.value)
# Milliseconds a usage counter update waits for a SQLite write lock.
SQLITE_COUNTER_WAIT_MS = 200


class KeyStore:
    """SQL access to one keyring table through one engine."""

    def __init__(self, engine: sa.Engine, table: sa.Table) -> None:
        self.engine = engine
        self.table = table

    def connect(self) -> contextlib.AbstractContextManager[sa.Connection]:
        """Open a connection; see :func:`connections.connect`."""
        return connections.connect(self.engine, self.table)

    def begin(self) -> contextlib.AbstractContextManager[sa.Connection]:
        """Open a connection inside a transaction; see :func:`connections.begin`."""
        return connections.begin(self.engine, self.table)

    def _row(self, mapping: Any) -> KeyRow:
        data = dict(mapping)
        wrapped = data["wrapped_dek"]
        return KeyRow(
            key_id=data["key_id"],
            tenant_id=data["tenant_id"],
            purpose=KeyPurpose(data["purpose"]),
            version=data["key_version"],
            state=KeyState(data["state"]),
            wrapped_dek=None if wrapped is None else bytes(wrapped),
            kms_provider=data["kms_provider"],
            kek_id=data["kek_id"],
            key_check=bytes(data["key_check"]),
            created_at=data["created_at"],
            activated_at=data["activated_at"],
            retired_at=data["retired_at"],
            destroyed_at=data["destroyed_at"],
            rewrapped_at=data["rewrapped_at"],
            row_version=data["row_version"],
        )

    def _select(self, conn: sa.Connection, where: Any, for_update: bool = False) -> list[KeyRow]:
        # Every column but the usage counter, so that a keyring table made
        # before that column existed stays readable.
        columns = [column for column in self.table.c if column.name != SEALED_COUNT]
        stmt = sa.select(*columns).where(where)
        stmt = stmt.order_by(self.table.c.tenant_id, self.table.c.purpose, self.table.c.key_version)
        if for_update and conn.dialect.name != "sqlite":
            stmt = stmt.with_for_update()
        try:
            result = conn.execute(stmt)
        except (sa.exc.OperationalError, sa.exc.ProgrammingError):
            self._raise_if_table_missing()
            raise
        return [self._row(mapping) for mapping in result.mappings()]

    def _raise_if_table_missing(self) -> None:
        """Turn the driver's "no such table" into an error that says what to do."""
        with self.connect() as conn:
            exists = sa.inspect(conn).has_table(self.table.name, schema=self.table.schema)
        if not exists:
            raise ConfigurationError(
                f"keyring table {self.table.fullname} does not exist in the keyring's "
                "database: create it with keyring.create_table(), with "
                "op.create_keyring_table() in an Alembic migration, or with "
                "'sqlalchemy-encrypted init'"
            ) from None

    def sample_keks(self, limit: int) -> list[tuple[str, str]]:
        """Return (provider name, KEK id) of up to ``limit`` rows that hold a wrapped DEK."""
        table = self.table
        stmt = (
            sa.select(table.c.kms_provider, table.c.kek_id)
            .where(table.c.wrapped_dek.is_not(None))
            .limit(limit)
        )
        try:
            with self.connect() as conn:
                return [(row[0], row[1]) for row in conn.execute(stmt)]
        except (sa.exc.OperationalError, sa.exc.ProgrammingError):
            self._raise_if_table_missing()
            raise

    def get(self, key_id: uuid.UUID) -> KeyRow | None:
        with self.connect() as conn:
            rows = self._select(conn, self.table.c.key_id == key_id)
        return rows[0] if rows else None

    def tenant_rows(
        self, tenant_id: str, conn: sa.Connection | None = None, for_update: bool = False
    ) -> list[KeyRow]:
        where = self.table.c.tenant_id == tenant_id
        if conn is not None:
            return self._exact_tenant(self._select(conn, where, for_update), tenant_id)
        with self.connect() as own:
            return self._exact_tenant(self._select(own, where), tenant_id)

    def _exact_tenant(self, rows: list[KeyRow], tenant_id: str) -> list[KeyRow]:
        """Return ``rows`` after checking that they all belong to ``tenant_id``.

        A tenant_id column whose collation ignores case or trailing spaces
        (the MySQL default, or a table made before this library used a
        binary type there) would return other tenants' keys.
        """
        others = sorted({row.tenant_id for row in rows if row.tenant_id != tenant_id})
        if not others:
            return rows
        raise ConfigurationError(
            f"keyring table {self.table.fullname} returned the keys of tenant(s) "
            f"{', '.join(repr(other) for other in others)} for tenant {tenant_id!r}: its "
            "tenant_id column compares ids without regard to case or trailing spaces. Change "
            "the column to an exact type before using these tenants (on MySQL and MariaDB: "
            f"ALTER TABLE {self.table.fullname} MODIFY tenant_id VARBINARY(1020) NOT NULL)"
        )

    def rows(
        self, tenant_id: str | None = None, states: Iterable[KeyState] | None = None
    ) -> list[KeyRow]:
        clauses: list[Any] = []
        if tenant_id is not None:
            clauses.append(self.table.c.tenant_id == tenant_id)
        if states is not None:
            clauses.append(self.table.c.state.in_([state.value for state in states]))
        with self.connect() as conn:
            rows = self._select(conn, sa.and_(sa.true(), *clauses))
        return rows if tenant_id is None else self._exact_tenant(rows, tenant_id)

    def insert(self, conn: sa.Connection, row: KeyRow) -> None:
        conn.execute(
            self.table.insert().values(
                key_id=row.key_id,
                tenant_id=row.tenant_id,
                purpose=row.purpose.value,
                key_version=row.version,
                state=row.state.value,
                wrapped_dek=row.wrapped_dek,
                kms_provider=row.kms_provider,
                kek_id=row.kek_id,
                key_check=row.key_check,
                created_at=row.created_at,
                activated_at=row.activated_at,
                retired_at=row.retired_at,
                destroyed_at=row.destroyed_at,
                rewrapped_at=row.rewrapped_at,
                row_version=row.row_version,
            )
        )

    def compare_and_set(self, conn: sa.Connection, row: KeyRow, **changes: Any) -> KeyRow | None:
        """Update ``row`` if its row version is unchanged; return the new row or None."""
        values = {
            ("key_version" if name == "version" else name): (
                value.value if name in _ENUM_COLUMNS else value
            )
            for name, value in changes.items()
        }
        values["row_version"] = row.row_version + 1
        result = conn.execute(
            self.table.update()
            .where(self.table.c.key_id == row.key_id)
            .where(self.table.c.row_version == row.row_version)
            .values(**values)
        )
        if result.rowcount != 1:
            return None
        return row.evolve(row_version=row.row_version + 1, **changes)

    def reserve_seals(
        self, key_id: uuid.UUID, requested: int, limit: int
    ) -> tuple[int, KeyState | None]:
        """Add up to ``requested`` seals to the usage counter of ``key_id``
        without passing ``limit``.

        Returns how many were added, and None or, when none could be added,
        the key's state: 0 with an active or decrypt-only state means the key
        has reached its limit, and a retired or destroyed key gets no seals.
        Each attempt is one atomic ``UPDATE``, so processes reserving at the
        same time never hand out the same seals twice.
        """
        counter = self.table.c[SEALED_COUNT]
        key_column = self.table.c.key_id
        granted = requested
        for _ in range(_RESERVE_ATTEMPTS):
            with self._counting() as conn:
                result = conn.execute(
                    self.table.update()
                    .where(key_column == key_id)
                    .where(self.table.c.state.not_in(_NO_SEALS))
                    .where(counter <= limit - granted)
                    .values({SEALED_COUNT: counter + granted})
                )
                if result.rowcount == 1:
                    return granted, None
                found = conn.execute(
                    sa.select(counter, self.table.c.state).where(key_column == key_id)
                ).one_or_none()
            if found is None:
                raise KeyNotFoundError(
                    f"key id {key_id} is not in keyring table {self.table.fullname}: its usage "
                    "cannot be counted"
                )
            state = KeyState(found[1])
            if state.value in _NO_SEALS:
                return 0, state
            granted = min(requested, limit - found[0])
            if granted <= 0:
                return 0, state
        raise KeyStateError(
            f"could not reserve seals for key id {key_id} in keyring table "
            f"{self.table.fullname}: its usage counter changed on each of "
            f"{_RESERVE_ATTEMPTS} attempts"
        )

    def add_seals(self, key_id: uuid.UUID, count: int) -> None:
        """Add ``count`` seals that were made already to the usage counter of ``key_id``."""
        counter = self.table.c[SEALED_COUNT]
        with self._counting() as conn:
            conn.execute(
                self.table.update()
                .where(self.table.c.key_id == key_id)
                .values({SEALED_COUNT: counter + count})
            )

    def sealed_count(self, key_id: uuid.UUID) -> int | None:
        """Return the usage counter of ``key_id``, or None if the key is not in the table."""
        counter = self.table.c[SEALED_COUNT]
        with self.connect() as conn:
            value = conn.execute(
                sa.select(counter).where(self.table.c.key_id == key_id)
            ).scalar_one_or_none()
        return None if value is None else int(value)

    def sealed_counts(self, tenant_id: str | None = None) -> dict[uuid.UUID, int] | None:
        """Return the usage counter of every key (of one tenant), or None when
        the table has no usage counter column."""
        if not self.has_usage_column():
            return None
        query = sa.select(self.table.c.key_id, self.table.c[SEALED_COUNT])
        if tenant_id is not None:
            query = query.where(self.table.c.tenant_id == tenant_id)
        with self.connect() as conn:
            return {row[0]: int(row[1]) for row in conn.execute(query)}

    @contextlib.contextmanager
    def _counting(self) -> Iterator[sa.Connection]:
        """Open a transaction for the usage counter.

        On SQLite it waits at most :data:`SQLITE_COUNTER_WAIT_MS` for the write
        lock, because the application's own open transaction on the same file
        may hold it, and no wait would end that.
        """
        with self.begin() as conn:
            if conn.dialect.name != "sqlite":
                yield conn
                return
            previous = int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one())
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {SQLITE_COUNTER_WAIT_MS}")
            try:
                yield conn
            finally:
                conn.exec_driver_sql(f"PRAGMA busy_timeout = {previous}")

    def has_usage_column(self) -> bool:
        """Return True if the keyring table has the usage counter column."""
        with self.connect() as conn:
            columns = sa.inspect(conn).get_columns(self.table.name, schema=self.table.schema)
        return any(column["name"] == SEALED_COUNT for column in columns)
