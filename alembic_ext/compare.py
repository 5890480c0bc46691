"""Autogenerate comparison for encrypted columns.

Registered on Alembic's global comparator registry when ``alembic_ext`` is
imported, so ``env.py`` needs nothing but the import:

* The database reflects an encrypted column as its storage type (BYTEA,
  BLOB, VARBINARY, or text for ``storage="base64"``), and that counts as
  equal to the model's encrypted type, so a model that matches the
  database produces no change. On SQLite a conversion may write the
  envelopes back into the column and leave its declared type as it was
  (see :mod:`alembic_ext.swap_sqlite`). Such a column also counts as equal
  when it contains envelopes and nothing else.
* A plaintext column (any non-binary type) whose model now declares an
  encrypted type is a conversion, not a type change. It is written as
  ``op.encrypt_column(...)``, with ``op.decrypt_column(...)`` in the
  downgrade. An ``op.alter_column()`` would change the type without
  encrypting anything.
* The keyring table and the re-encryption checkpoint table, which live in
  the database but usually not in the application's metadata, are not
  dropped.

Two changes cannot be told from the database schema and still need a
hand-written operation: a binary column that becomes
``Encrypted(LargeBinary)`` (both are binary), and a column whose model drops
its encrypted type (the old type, needed to decrypt, is no longer in the
model). ``storage="base64"`` columns are text either way, so their
conversions are not detected either.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import comparators
from alembic.autogenerate.api import AutogenContext
from alembic.operations import ops as alembic_ops
from alembic.runtime.migration import MigrationContext
from alembic.util import DispatchPriority, PriorityDispatchResult
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from sqlalchemy_encrypted.keyring import keyring_table
from sqlalchemy_encrypted.keyring.schema import MYSQL_ACTIVE_SLOT, SEALED_COUNT
from sqlalchemy_encrypted.rotation import checkpoint_table
from sqlalchemy_encrypted.row_tenant import tenant_column_of
from sqlalchemy_encrypted.types import EncryptedType

from .ops import EncryptColumnOp
from .render import render_item
from .swap_sqlite import holds_only_envelopes

__all__ = ["compare_type"]

logger = logging.getLogger("sqlalchemy_encrypted.alembic")

_KEYRING_COLUMNS = frozenset(keyring_table(sa.MetaData()).c.keys())
_CHECKPOINT_COLUMNS = frozenset(checkpoint_table().c.keys())


def _is_binary(type_: TypeEngine[Any] | None) -> bool:
    if type_ is None:
        return False
    try:
        return type_.python_type is bytes
    except NotImplementedError:
        return False


def _is_text(type_: TypeEngine[Any]) -> bool:
    return isinstance(type_, sa.String)


def _matches_storage(inspected: TypeEngine[Any], declared: EncryptedType[Any]) -> bool | None:
    """Return True if the database type is the storage type of ``declared``,
    False if the column contains plaintext, or None when the types cannot tell."""
    if declared.storage == "base64":
        return True if _is_text(inspected) else None
    return _is_binary(inspected)


def _converted_in_place(
    conn: Connection | None,
    table: sa.Table | None,
    column: str,
    declared: EncryptedType[Any],
) -> bool:
    """Return True for a SQLite column whose envelopes were written back under
    its original declared type."""
    if conn is None or table is None or conn.dialect.name != "sqlite":
        return False
    if declared.storage == "base64":
        return False
    if not holds_only_envelopes(conn, table.name, table.schema, column):
        return False
    logger.info(
        "%s.%s contains only envelopes under its plaintext declared type: no change",
        table.fullname,
        column,
    )
    return True


def compare_type(
    context: MigrationContext,
    inspected_column: sa.Column[Any],
    metadata_column: sa.Column[Any],
    inspected_type: TypeEngine[Any],
    metadata_type: TypeEngine[Any],
) -> bool | None:
    """A ``compare_type`` hook for ``context.configure()`` in ``env.py``.

    Returns False (no change) when the database column has the storage type
    of the model's encrypted type, True for a plaintext column whose model
    is now encrypted, and None (Alembic's own comparison) for every other
    column. Importing ``alembic_ext`` already applies the same rule, so pass
    it only to combine it with a hook of your own.
    """
    if not isinstance(metadata_type, EncryptedType):
        return None
    matches = _matches_storage(inspected_type, metadata_type)
    if matches is None:
        return None
    if not matches and _converted_in_place(
        context.bind, getattr(inspected_column, "table", None), inspected_column.name, metadata_type
    ):
        return False
    return not matches


def _compare_encrypted_column(
    autogen_context: AutogenContext,
    alter_column_op: alembic_ops.AlterColumnOp,
    schema: str | None,
    table_name: str,
    column_name: str,
    conn_col: sa.Column[Any],
    metadata_col: sa.Column[Any],
) -> PriorityDispatchResult:
    metadata_type = metadata_col.type
    if not isinstance(metadata_type, EncryptedType):
        return PriorityDispatchResult.CONTINUE
    if autogen_context.migration_context.opts.get("compare_type", True) is False:
        return PriorityDispatchResult.CONTINUE
    conn_type = conn_col.type
    if isinstance(conn_type, sa.types.NullType):
        return PriorityDispatchResult.CONTINUE
    matches = _matches_storage(conn_type, metadata_type)
    if matches is None:
        return PriorityDispatchResult.CONTINUE
    if not matches:
        matches = _converted_in_place(
            autogen_context.connection, conn_col.table, column_name, metadata_type
        )
    alter_column_op.existing_type = conn_type
    if not matches:
        alter_column_op.modify_type = metadata_type
        logger.info(
            "detected plaintext column %s.%s now declared %r",
            table_name,
            column_name,
            metadata_type,
        )
    # Either way, no other type comparison applies to this column.
    return PriorityDispatchResult.STOP


def _encrypt_op(alter: alembic_ops.AlterColumnOp, declared: EncryptedType[Any]) -> EncryptColumnOp:
    column = getattr(declared, "_column", None)
    tenant_column = tenant_column_of(column.table) if column is not None else None
    return EncryptColumnOp(
        alter.table_name,
        alter.column_name,
        type_=declared,
        existing_type=alter.existing_type,
        tenant_column=tenant_column,
        schema=alter.schema,
    )


def _split_conversions(
    container: alembic_ops.ModifyTableOps,
) -> list[EncryptColumnOp]:
    """Take the plaintext-to-encrypted type changes out of a table's ops."""
    conversions = []
    kept: list[alembic_ops.MigrateOperation] = []
    for operation in container.ops:
        declared = getattr(operation, "modify_type", None)
        if (
            isinstance(operation, alembic_ops.AlterColumnOp)
            and isinstance(declared, EncryptedType)
            and not _matches_storage_or_unknown(operation.existing_type, declared)
        ):
            conversions.append(_encrypt_op(operation, declared))
            operation.modify_type = None
            if not operation.has_changes():
                continue
        kept.append(operation)
    container.ops = kept
    return conversions


def _matches_storage_or_unknown(
    existing: TypeEngine[Any] | None, declared: EncryptedType[Any]
) -> bool:
    if existing is None:
        return True
    return _matches_storage(existing, declared) is not False


def _is_encryption_table(operation: alembic_ops.DropTableOp) -> bool:
    # MySQL and MariaDB keyring tables have a generated column more.
    names = frozenset(operation.to_table().c.keys()) - {MYSQL_ACTIVE_SLOT}
    # A keyring table made before the usage counter column existed counts too.
    return names in (_KEYRING_COLUMNS, _KEYRING_COLUMNS - {SEALED_COUNT}, _CHECKPOINT_COLUMNS)


def _rewrite_upgrade_ops(
    autogen_context: AutogenContext, upgrade_ops: alembic_ops.UpgradeOps
) -> PriorityDispatchResult:
    # Alembic drops a removed table's indexes in a ModifyTableOps of their
    # own, before the DropTableOp, so both are left out for these tables.
    kept_tables = {
        (operation.schema, operation.table_name)
        for operation in upgrade_ops.ops
        if isinstance(operation, alembic_ops.DropTableOp) and _is_encryption_table(operation)
    }
    for schema, name in sorted(kept_tables, key=str):
        where = f"{schema}.{name}" if schema else name
        logger.info("not dropping table %s: sqlalchemy_encrypted uses it", where)
    rewritten: list[alembic_ops.MigrateOperation] = []
    for operation in upgrade_ops.ops:
        table = (getattr(operation, "schema", None), getattr(operation, "table_name", None))
        if table in kept_tables and isinstance(
            operation, (alembic_ops.DropTableOp, alembic_ops.ModifyTableOps)
        ):
            continue
        if not isinstance(operation, alembic_ops.ModifyTableOps):
            rewritten.append(operation)
            continue
        conversions = _split_conversions(operation)
        if operation.ops:
            rewritten.append(operation)
        # Outside the table's ops, so batch mode (render_as_batch) renders
        # them as op.encrypt_column(...), not on batch_op.
        rewritten.extend(conversions)
    upgrade_ops.ops = rewritten
    return PriorityDispatchResult.CONTINUE


def _chain_render_item(user_hook: Any) -> Any:
    def chained(type_: str, obj: Any, autogen_context: AutogenContext) -> Any:
        rendered = user_hook(type_, obj, autogen_context)
        if rendered is not False:
            return rendered
        return render_item(type_, obj, autogen_context)

    chained.chains_sqlalchemy_encrypted = True  # type: ignore[attr-defined]
    return chained


def _install_render_item(
    autogen_context: AutogenContext, upgrade_ops: alembic_ops.UpgradeOps
) -> PriorityDispatchResult:
    # The comparison and the rendering of one autogenerate run share these
    # options, so the hook set here is used when the file is written.
    opts = autogen_context.opts
    user_hook = opts.get("render_item")
    if user_hook is None:
        opts["render_item"] = render_item
    elif user_hook is not render_item and not getattr(
        user_hook, "chains_sqlalchemy_encrypted", False
    ):
        opts["render_item"] = _chain_render_item(user_hook)
    return PriorityDispatchResult.CONTINUE


_SUBGROUP = "sqlalchemy_encrypted"

comparators.dispatch_for("column", subgroup="types", priority=DispatchPriority.FIRST)(
    _compare_encrypted_column
)
comparators.dispatch_for("autogenerate", subgroup=_SUBGROUP, priority=DispatchPriority.FIRST)(
    _install_render_item
)
comparators.dispatch_for(
    "autogenerate", subgroup=_SUBGROUP + ".rewrite", priority=DispatchPriority.LAST
)(_rewrite_upgrade_ops)
