"""Connections of the keyring, checked for a transaction of another user of the engine.

The keyring commits or rolls back its work on every connection it uses.
Most pools give each checkout a connection that no other user has checked
out, so that is safe. Three pools can give the keyring a connection that
another user of the engine has checked out. ``StaticPool`` gives every
checkout the same DBAPI connection, and ``SingletonThreadPool`` (SQLAlchemy's
default for in-memory SQLite) does so within a thread. ``AssertionPool``
raises on a second checkout. On the first two, the
keyring's commit or rollback would end the application's transaction, and
the rows it had flushed would be lost without an error. So on those pools
the keyring raises :class:`ConfigurationError`, before it reads or writes
anything, while the shared connection is inside a transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.pool import AssertionPool, SingletonThreadPool, StaticPool

from ..errors import ConfigurationError

__all__ = ["begin", "connect"]

# libpq's PQtransactionStatus() values PQTRANS_ACTIVE, PQTRANS_INTRANS and
# PQTRANS_INERROR: a command is running, or a transaction is open.
_PQ_IN_TRANSACTION = (1, 2, 3)


@contextlib.contextmanager
def connect(engine: sa.Engine, table: sa.Table) -> Iterator[sa.Connection]:
    """Open a connection of ``engine`` for the keyring table ``table``.

    Raises :class:`ConfigurationError` before any statement runs if the
    engine's pool gives the keyring a connection that is inside another
    user's transaction.
    """
    pool = engine.pool
    if isinstance(pool, StaticPool):
        # Checked before the checkout: returning a StaticPool connection
        # rolls back the shared DBAPI connection, which would end the
        # transaction this check protects. ``StaticPool.connection`` is the
        # pool's only connection record; SQLAlchemy does not document it.
        _check_idle(engine, table, pool.connection.driver_connection)
    try:
        conn = engine.connect()
    except AssertionError:
        if not isinstance(pool, AssertionPool):
            raise
        # AssertionPool raises before it hands out anything, so the holder's
        # transaction is untouched.
        raise ConfigurationError(_shared_message(engine, table, checked_out=True)) from None
    with conn:
        if isinstance(pool, SingletonThreadPool):
            # A second checkout in the same thread gets the first one's
            # connection, and closing it leaves the connection checked out
            # without a rollback, so the check can follow the checkout.
            _check_idle(engine, table, conn.connection.driver_connection)
        yield conn


@contextlib.contextmanager
def begin(engine: sa.Engine, table: sa.Table) -> Iterator[sa.Connection]:
    """Open a connection like :func:`connect` and commit its transaction at the end."""
    with connect(engine, table) as conn, conn.begin():
        yield conn


def _check_idle(engine: sa.Engine, table: sa.Table, driver_connection: object) -> None:
    if driver_connection is not None and _in_transaction(driver_connection):
        raise ConfigurationError(_shared_message(engine, table, checked_out=False))


def _in_transaction(driver_connection: object) -> bool:
    """Return True if the driver reports an open transaction on ``driver_connection``.

    Returns False for a driver it cannot ask (PyMySQL, for example).
    """
    # sqlite3 and aiosqlite.
    in_transaction = getattr(driver_connection, "in_transaction", None)
    if isinstance(in_transaction, bool):
        # sqlite3 with autocommit=False (Python 3.12 and later) keeps a
        # transaction open at all times, so there in_transaction does not
        # show whether another user has begun one.
        return in_transaction and getattr(driver_connection, "autocommit", None) is not False
    # psycopg 3 and psycopg2 report libpq's PQtransactionStatus().
    status = getattr(getattr(driver_connection, "info", None), "transaction_status", None)
    if status is not None:
        return int(status) in _PQ_IN_TRANSACTION
    return False


def _shared_message(engine: sa.Engine, table: sa.Table, *, checked_out: bool) -> str:
    pool = type(engine.pool).__name__
    if checked_out:
        reason = (
            f"the engine's {pool} allows one checked-out connection, and another user of "
            "the engine has it"
        )
    else:
        reason = (
            f"the engine's {pool} gives the keyring the connection of another user of the "
            "engine, which is inside a transaction. The keyring commits or rolls back its "
            "own work, which would end that transaction and lose the rows written in it"
        )
    return (
        f"the keyring cannot use its engine for keyring table {table.fullname}: {reason}. "
        "The keyring read and wrote nothing. Create the Keyring on an engine of its own, "
        "such as a second sa.create_engine('sqlite://', poolclass=StaticPool) in tests, or "
        "use InMemoryKeyring in tests"
    )
