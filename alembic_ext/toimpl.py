"""Implementations of the operations in :mod:`alembic_ext.ops`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.engine import Connection

from sqlalchemy_encrypted.errors import ConfigurationError, MigrationError
from sqlalchemy_encrypted.keyring import Keyring, keyring_table
from sqlalchemy_encrypted.rotation import ReencryptionResult
from sqlalchemy_encrypted.types import EncryptedType

from . import ddl, rotation, swap
from .conversion import ColumnConversion, Counts, Target
from .ddl import conversion_step
from .deferred import FinalStep, defer_final_step, runs_in_migration
from .directions import Decrypting, Encrypting, Strategy
from .ops import (
    CreateKeyringTableOp,
    DecryptColumnOp,
    DropKeyringTableOp,
    EncryptColumnOp,
    ReencryptColumnOp,
)
from .report import ConversionReport

__all__ = ["convert_column"]

logger = logging.getLogger("sqlalchemy_encrypted.alembic")
audit = logging.getLogger("sqlalchemy_encrypted.audit")

_Op = EncryptColumnOp | DecryptColumnOp

# The outcome of a failed step before the swap: until the swap, the source column is only read.
_SOURCE_UNCHANGED = "The original column is unchanged"
# The outcome of a failed swap when the temporary column was committed before
# the transaction of the swap began.
_CONVERTED_KEPT = "The converted values are kept in a temporary column"


def _swap_outcome(shadow: str, shadow_committed: bool) -> str:
    """Return the sentence stating what a failed swap leaves."""
    if shadow_committed:
        return _CONVERTED_KEPT
    return (
        f"The original column is unchanged. The temporary column {shadow!r} was added in "
        "this transaction, so rolling the transaction back removes it with the converted values"
    )


def _offline_error(name: str) -> MigrationError:
    return MigrationError(
        f"op.{name}() cannot run in offline (--sql) mode: it reads every row and "
        "encrypts or decrypts it with keys from the keyring, which a SQL script cannot "
        "do. Run this migration online: alembic upgrade (or downgrade) without --sql"
    )


def _bound_type(type_: Any, table: str, column: str, argument: str) -> EncryptedType[Any]:
    """Return a copy of ``type_`` attached to ``table.column``, so that values are
    bound to the same identity as the application's column."""
    if not isinstance(type_, EncryptedType):
        raise ConfigurationError(
            f"{argument} must be an encrypted type instance such as "
            f"Encrypted(sa.String(100)), got {type_!r}"
        )
    bound = type_.copy()
    # Plaintext transition mode would return legacy text from decrypt();
    # telling envelopes from plaintext needs decrypt() to raise instead.
    bound.allow_plaintext_reads = False
    sa.Table(table, sa.MetaData(), sa.Column(column, bound))
    return bound


def _strategy(operation: _Op, dialect: sa.Dialect, source: ddl.ColumnInfo) -> Strategy:
    table, column = operation.table_name, operation.column_name
    if isinstance(operation, EncryptColumnOp):
        encrypted = _bound_type(operation.type_, table, column, "type_")
        plaintext = operation.existing_type if operation.existing_type is not None else source.type
        return Encrypting(encrypted, plaintext, dialect)
    encrypted = _bound_type(operation.from_type, table, column, "from_type")
    if isinstance(operation.type_, EncryptedType):
        raise ConfigurationError(
            f"decrypt_column of {table}.{column}: type_ is the plaintext type the column "
            "gets, and from_type the encrypted type it has now"
        )
    return Decrypting(encrypted, operation.type_, dialect)


def _same_type(context: MigrationContext, reflected: ddl.ColumnInfo, target: Any) -> bool:
    """Return True if the database column already has the type ``target`` compiles to."""
    inspected = sa.Column(reflected.name, reflected.type)
    wanted = sa.Column(reflected.name, target.copy())
    return not context.impl.compare_type(inspected, wanted)


def _qualified_table(operation: _Op | ReencryptColumnOp) -> str:
    if operation.schema:
        return f"{operation.schema}.{operation.table_name}"
    return operation.table_name


def _label(operation: _Op | ReencryptColumnOp) -> str:
    return f"{_qualified_table(operation)}.{operation.column_name}"


class _Plan:
    """Everything one run needs, derived from the operation and a reflection of the table."""

    def __init__(self, conn: Connection, operation: _Op) -> None:
        self.operation = operation
        step = f"read the definition of table {_qualified_table(operation)}"
        with conversion_step(_label(operation), step, _SOURCE_UNCHANGED):
            info = ddl.reflect_table(conn, operation.table_name, operation.schema)
            self.source = info.column(operation.column_name)
            ddl.check_swappable(conn, info, operation.column_name)
        self.strategy = _strategy(operation, conn.dialect, self.source)
        self.shadow = ddl.shadow_column_name(operation.column_name, self.strategy.shadow_suffix)
        opposite = "decrypting" if self.strategy.direction == "encrypt" else "encrypting"
        self.leftover = ddl.shadow_column_name(operation.column_name, opposite)

        primary_key = operation.primary_key or info.primary_key
        if not primary_key:
            raise MigrationError(
                f"table {info.qualified_name} has no primary key: pass primary_key=[...] "
                "naming columns that identify each row"
            )
        for name in primary_key:
            info.column(name)
        if operation.column_name in primary_key:
            raise MigrationError(
                f"{info.qualified_name}.{operation.column_name} is part of the primary key, "
                "which cannot be encrypted"
            )

        if operation.tenant_column is not None and operation.tenant_id is not None:
            raise ConfigurationError(
                f"{info.qualified_name}.{operation.column_name}: pass tenant_column or "
                "tenant_id, not both"
            )
        self.info = info
        self.target = Target(
            table=info,
            column=operation.column_name,
            primary_key=tuple(primary_key),
            tenant_column=operation.tenant_column,
            tenant_id=operation.tenant_id,
            batch_size=operation.batch_size,
        )

    @property
    def has_shadow(self) -> bool:
        return self.shadow in self.info.columns

    def conversion(self, conn: Connection) -> ColumnConversion:
        return ColumnConversion(conn, self.target, self.strategy, self.shadow)

    def add_shadow(self, conn: Connection, commit: bool) -> None:
        """Add the temporary column, and commit it if ``commit`` is True."""
        with conversion_step(
            self.target.label, f"add the temporary column {self.shadow!r}", _SOURCE_UNCHANGED
        ):
            ddl.add_column(
                conn, self.info.name, self.info.schema, self.shadow, self.strategy.target_type
            )
            if commit:
                conn.commit()

    def check_shadow_type(self, context: MigrationContext) -> None:
        shadow = self.info.column(self.shadow)
        if not _same_type(context, shadow, self.strategy.target_type):
            raise MigrationError(
                f"{self.info.qualified_name} has a column {self.shadow!r} of type "
                f"{shadow.type!r}, not the type this operation writes; it is not a "
                "leftover of this operation, so rename or drop it and run again"
            )


def _drop_leftover(conn: Connection, plan: _Plan) -> bool:
    """Drop the shadow column an interrupted run in the other direction left.

    Its values are copies derived from the source column, never the only copy.
    """
    if plan.leftover not in plan.info.columns:
        return False
    logger.info(
        "dropping %s.%s, left by an interrupted run in the other direction",
        plan.info.qualified_name,
        plan.leftover,
    )
    step = f"drop the column {plan.leftover!r} that an interrupted run in the other direction left"
    with conversion_step(plan.target.label, step, _SOURCE_UNCHANGED):
        ddl.drop_column(conn, plan.info.name, plan.info.schema, plan.leftover)
    return True


def _single_connection_pool(pool: sa.Pool) -> bool:
    """Return True if ``pool`` cannot give a second connection while one is checked out.

    StaticPool hands every checkout the same DBAPI connection, and
    SingletonThreadPool (the default for in-memory SQLite) does so within a
    thread. AssertionPool raises on a second checkout.
    """
    return isinstance(
        pool, (sa.pool.StaticPool, sa.pool.SingletonThreadPool, sa.pool.AssertionPool)
    )


def _separate_connection_usable(context: MigrationContext, conn: Connection) -> bool:
    """Return True if batches may be committed on a second connection from the same engine.

    Not when the connection is inside a transaction Alembic did not begin
    (Alembic cannot commit it), not when the engine's pool has only the
    migration's own connection to give, and not for an in-memory SQLite
    database, which a second connection would not see.
    """
    # MigrationContext has no public flag for "the caller owns the
    # transaction". autocommit_block() can only commit a transaction that
    # Alembic began itself (begin_transaction() in env.py).
    if getattr(context, "_in_external_transaction", False):
        return False
    if conn.in_transaction() and getattr(context, "_transaction", None) is None:
        return False
    if _single_connection_pool(conn.engine.pool):
        return False
    url = conn.engine.url
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or "mode=memory" in str(url):
            return False
    return True


def _check_keyring_connection(
    conn: Connection, column_type: Any, label: str, operation_name: str
) -> None:
    """Raise before anything is written if the keyring would use the migration's connection.

    A Keyring reads and writes its table on connections from its own
    engine, and ends the transaction of each. When that engine is the
    migration's and its pool has one connection, that connection is the
    migration's own. A key lookup would then commit or roll back the
    migration's transaction, so the temporary column could vanish mid-run,
    or the swaps could commit without the Alembic version row.
    """
    if not isinstance(column_type, EncryptedType):
        return
    try:
        provider = column_type.key_provider
    except ConfigurationError:
        # The conversion raises this error itself when it needs a key.
        return
    pool = conn.engine.pool
    if not isinstance(provider, Keyring) or provider.engine.pool is not pool:
        return
    if not _single_connection_pool(pool):
        return
    raise MigrationError(
        f"op.{operation_name}() on {label}: the Keyring uses the migration's engine, whose "
        f"{type(pool).__name__} has no connection to give it but the migration's own. The "
        "keyring commits or rolls back its work on each connection it uses, which would end "
        "the migration's transaction in the middle of the operation. Nothing was written. "
        "Create the Keyring on an engine of its own, such as a second "
        "sa.create_engine('sqlite://', poolclass=StaticPool) in tests, or use InMemoryKeyring "
        "in tests"
    )


def _first_phase(context: MigrationContext, work: Connection, operation: _Op) -> Counts | None:
    """Prepare the shadow column and fill it, committing each batch.

    Returns the fill counts, or None when the column needs no conversion.
    """
    plan = _Plan(work, operation)
    if _drop_leftover(work, plan):
        work.commit()
        plan = _Plan(work, operation)
    conversion = plan.conversion(work)
    if not plan.has_shadow:
        same_type = _same_type(context, plan.source, plan.strategy.target_type)
        if operation.strict or same_type:
            counts = conversion.scan()
            if operation.strict:
                conversion.check_strict(counts)
            if same_type and counts.converted == 0:
                work.rollback()
                return None
        plan.add_shadow(work, commit=True)
        plan = _Plan(work, operation)
        conversion = plan.conversion(work)
    else:
        plan.check_shadow_type(context)
        if operation.strict:
            conversion.check_strict(conversion.scan())
    logger.info(
        "%s: %s in batches of %d",
        plan.target.label,
        plan.strategy.shadow_suffix,
        operation.batch_size,
    )
    counts = conversion.fill(commit_each_batch=True)
    work.commit()
    return counts


def _final_check(
    context: MigrationContext, conn: Connection, operation: _Op, filled: Counts | None
) -> tuple[Callable[[Connection], ConversionReport], bool | None]:
    """Block writers, convert what is left and verify every row.

    Returns the function that swaps the columns and returns the report, and
    whether the temporary column was committed before this transaction
    (None when the column needs no conversion, so there is none). The
    function runs later on the same connection and transaction, after the
    other columns of the migration are checked too.
    """
    step = f"lock table {_qualified_table(operation)} against writes"
    with conversion_step(_label(operation), step, _SOURCE_UNCHANGED):
        ddl.lock_for_writes(conn, operation.table_name, operation.schema, operation.column_name)
    plan = _Plan(conn, operation)
    _drop_leftover(conn, plan)
    plan = _Plan(conn, operation)
    conversion = plan.conversion(conn)
    strict_pending = operation.strict and filled is None
    # A temporary column that exists here was committed by the batches or an
    # earlier run. One added below is rolled back with this transaction.
    shadow_committed = plan.has_shadow

    if not plan.has_shadow:
        if _same_type(context, plan.source, plan.strategy.target_type):
            counts = conversion.scan()
            if strict_pending:
                conversion.check_strict(counts)
            if counts.converted == 0:
                unchanged = _report(plan, counts, resumed=0, rewritten=0, swapped=False)
                return (lambda _: unchanged), None
        elif strict_pending:
            conversion.check_strict(conversion.scan())
        plan.add_shadow(conn, commit=False)
        plan = _Plan(conn, operation)
        conversion = plan.conversion(conn)
    else:
        plan.check_shadow_type(context)
        if strict_pending:
            conversion.check_strict(conversion.scan())

    counts = conversion.verify()
    _check_census(conn, plan, counts)
    if filled is None:
        resumed, rewritten = counts.resumed, 0
    else:
        resumed, rewritten = filled.resumed, counts.written

    outcome = _swap_outcome(plan.shadow, shadow_committed)

    def swap_columns(swap_conn: Connection) -> ConversionReport:
        # An earlier swap in the same migration may have changed the table.
        current = _Plan(swap_conn, operation)
        # A failed statement of the swap names its own step, and this covers the rest.
        with conversion_step(plan.target.label, "swap the converted column into place", outcome):
            swap.swap_columns(swap_conn, current.info, current.source, current.shadow, outcome)
        return _report(plan, counts, resumed=resumed, rewritten=rewritten, swapped=True)

    return swap_columns, shadow_committed


def _check_census(conn: Connection, plan: _Plan, counts: Counts) -> None:
    strategy = plan.strategy
    census_column = plan.shadow if strategy.direction == "encrypt" else plan.target.column
    column = rotation.encrypted_column(
        plan.info,
        census_column,
        strategy.encrypted_type,
        plan.target.primary_key,
        plan.target.tenant_column,
    )
    step = "count the column's values by their stored headers (the census)"
    with conversion_step(plan.target.label, step, _SOURCE_UNCHANGED):
        rotation.check_census(
            conn,
            column,
            **rotation.expected_counts(strategy.direction, counts),
            nulls=counts.null,
            label=plan.target.label,
        )


def _report(
    plan: _Plan, counts: Counts, *, resumed: int, rewritten: int, swapped: bool
) -> ConversionReport:
    return ConversionReport(
        table=plan.info.qualified_name,
        column=plan.target.column,
        direction=plan.strategy.direction,
        converted=counts.converted,
        already_converted=counts.already,
        null=counts.null,
        resumed=resumed,
        rewritten=rewritten,
        column_swapped=swapped,
    )


def convert_column(operations: Operations, operation: _Op) -> ConversionReport:
    """Run an encrypt or decrypt column operation; see their docstrings."""
    name = "encrypt_column" if isinstance(operation, EncryptColumnOp) else "decrypt_column"
    context = operations.migration_context
    if context.as_sql:
        raise _offline_error(name)
    if operation.batch_size < 1:
        raise ConfigurationError(
            f"invalid batch_size {operation.batch_size}: it must be at least 1"
        )
    conn = operations.get_bind()
    if conn.dialect.name not in ddl.SUPPORTED_DIALECTS:
        raise MigrationError(f"op.{name}() supports PostgreSQL and SQLite, not {conn.dialect.name}")
    if runs_in_migration(context) and _in_autocommit(conn):
        raise MigrationError(
            f"op.{name}() on {operation.table_name}.{operation.column_name}: the migration's "
            "connection is in AUTOCOMMIT mode, so Alembic would commit the new version before "
            "the column is swapped at the end of the migration, and a failure in between "
            "would leave the column unconverted under the new version. Run migrations on a "
            "connection with transactions, and use op.get_context().autocommit_block() only "
            "around the statements that need autocommit. Nothing was written"
        )
    encrypted_type = (
        operation.type_ if isinstance(operation, EncryptColumnOp) else operation.from_type
    )
    _check_keyring_connection(conn, encrypted_type, _label(operation), name)

    filled: Counts | None = None
    if operation.commit_batches and _separate_connection_usable(context, conn):
        with context.autocommit_block(), conn.engine.connect() as work:
            filled = _first_phase(context, work, operation)
    elif operation.commit_batches:
        logger.info(
            "%s.%s: running inside the caller's transaction, so batches are not committed "
            "separately",
            operation.table_name,
            operation.column_name,
        )
    if runs_in_migration(context):
        return _defer_final_step(context, operation, filled)
    bind = operations.get_bind()
    swap_columns, _ = _final_check(context, bind, operation, filled)
    report = swap_columns(bind)
    audit.info("%s", report)
    return report


def _defer_final_step(
    context: MigrationContext, operation: _Op, filled: Counts | None
) -> ConversionReport:
    """Queue the final step for the end of the migration (see :mod:`alembic_ext.deferred`).

    Returns a report of the batches written so far, with ``column_swapped``
    False. The same object gets the final counts when the column is swapped.
    """
    table = _qualified_table(operation)
    counts = filled or Counts()
    report = ConversionReport(
        table=table,
        column=operation.column_name,
        direction="encrypt" if isinstance(operation, EncryptColumnOp) else "decrypt",
        converted=counts.converted,
        already_converted=counts.already,
        null=counts.null,
        resumed=counts.resumed,
        column_swapped=False,
    )

    def check(conn: Connection) -> Callable[[Connection], None]:
        try:
            swap_columns, step.shadow_committed = _final_check(context, conn, operation, filled)
        except (MigrationError, sa.exc.DBAPIError):
            if not _column_missing(conn, operation):
                raise
            raise MigrationError(
                f"{table}.{operation.column_name}: the column is gone at the end of the "
                "migration, where its conversion swaps it, so an operation later in the same "
                "migration renamed or dropped it. Move that operation to a later revision, "
                "then run the migration again"
            ) from None

        def swap_and_report(swap_conn: Connection) -> None:
            final = swap_columns(swap_conn)
            for name in (item.name for item in dataclasses.fields(final)):
                setattr(report, name, getattr(final, name))
            audit.info("%s", report)

        return swap_and_report

    # Batches that ran in their own transactions (filled is not None) have
    # committed the temporary column. Otherwise the final check finds out.
    step = FinalStep(
        f"{table}.{operation.column_name}", check, True if filled is not None else None
    )
    defer_final_step(context, step)
    logger.info(
        "%s.%s: batches written, so the column is checked and swapped at the end of the migration",
        table,
        operation.column_name,
    )
    return report


def _in_autocommit(conn: Connection) -> bool:
    """Return True if ``conn`` commits every statement on its own.

    AUTOCOMMIT can be an execution option of the connection or engine, or
    set on the driver's connection by ``create_engine(isolation_level=...)``:
    psycopg's ``autocommit`` is then True, and sqlite3's ``isolation_level``
    None.
    """
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return True
    driver_connection = conn.connection.dbapi_connection
    if getattr(driver_connection, "autocommit", None) is True:
        return True
    return conn.dialect.name == "sqlite" and (
        getattr(driver_connection, "isolation_level", "") is None
    )


def _column_missing(conn: Connection, operation: _Op) -> bool:
    """Return True if the table exists without the operation's column."""
    try:
        inspector = sa.inspect(conn)
        columns = inspector.get_columns(operation.table_name, schema=operation.schema)
    except sa.exc.SQLAlchemyError:
        # PostgreSQL refuses queries in a failed transaction; keep the first error.
        return False
    return not any(column["name"] == operation.column_name for column in columns)


@Operations.implementation_for(EncryptColumnOp)
def encrypt_column(operations: Operations, operation: EncryptColumnOp) -> ConversionReport:
    return convert_column(operations, operation)


@Operations.implementation_for(DecryptColumnOp)
def decrypt_column(operations: Operations, operation: DecryptColumnOp) -> ConversionReport:
    return convert_column(operations, operation)


@Operations.implementation_for(ReencryptColumnOp)
def reencrypt_column(operations: Operations, operation: ReencryptColumnOp) -> ReencryptionResult:
    context = operations.migration_context
    if context.as_sql:
        raise _offline_error("reencrypt_column")
    if operation.batch_size < 1:
        raise ConfigurationError(
            f"invalid batch_size {operation.batch_size}: it must be at least 1"
        )

    conn = operations.get_bind()
    _check_keyring_connection(conn, operation.type_, _label(operation), "reencrypt_column")
    table, column = operation.table_name, operation.column_name
    info = ddl.reflect_table(conn, table, operation.schema)
    info.column(column)
    primary_key = operation.primary_key or info.primary_key
    if not primary_key:
        raise MigrationError(
            f"table {info.qualified_name} has no primary key: pass primary_key=[...] "
            "naming columns that identify each row"
        )
    encrypted = rotation.encrypted_column(
        info,
        column,
        _bound_type(operation.type_, table, column, "type_"),
        primary_key,
        operation.tenant_column,
    )

    options: dict[str, Any] = {
        "tenants": operation.tenants,
        "versions": operation.versions,
        "batch_size": operation.batch_size,
    }
    if operation.commit_batches and _separate_connection_usable(context, conn):
        with context.autocommit_block():
            result = rotation.run_reencryption(conn.engine, encrypted, **options)
    else:
        result = rotation.run_reencryption(conn, encrypted, **options)
    audit.info(
        "%s: re-encrypted %d value(s) to the active key versions",
        encrypted.label,
        result.values_reencrypted,
    )
    return result


def _run_schema_ddl(operations: Operations, create: bool, table: sa.Table) -> None:
    """Emit the CREATE or DROP statements of ``table`` through the migration.

    SQLAlchemy's own schema generator decides which statements the dialect
    gets (it honours ``ddl_if`` and the table's DDL events), and each
    statement goes through ``operations.execute``, so the same code runs
    online and in offline (``--sql``) mode.
    """
    dialect = operations.migration_context.dialect

    def emit(statement: Any, *multiparams: Any, **params: Any) -> None:
        operations.execute(statement)

    url = sa.engine.make_url(f"{dialect.name}+{dialect.driver}://")
    mock = sa.create_mock_engine(url, emit)
    if create:
        table.create(mock, checkfirst=False)
    else:
        table.drop(mock, checkfirst=False)


@Operations.implementation_for(CreateKeyringTableOp)
def create_keyring_table(operations: Operations, operation: CreateKeyringTableOp) -> None:
    table = keyring_table(sa.MetaData(), operation.table_name, operation.schema)
    _run_schema_ddl(operations, True, table)


@Operations.implementation_for(DropKeyringTableOp)
def drop_keyring_table(operations: Operations, operation: DropKeyringTableOp) -> None:
    table = keyring_table(sa.MetaData(), operation.table_name, operation.schema)
    _run_schema_ddl(operations, False, table)
