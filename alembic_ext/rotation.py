"""Use the shared rotation package from migrations: its census and its re-encryption job.

A migration has no application models, so the table is described from a
reflection of the database, and the column's encrypted type comes from the
operation's arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from sqlalchemy_encrypted.errors import MigrationError
from sqlalchemy_encrypted.rotation import (
    EncryptedColumn,
    ReencryptionJob,
    ReencryptionResult,
)
from sqlalchemy_encrypted.rotation.catalog import KeyStateName
from sqlalchemy_encrypted.rotation.census import ColumnCensus, census_column
from sqlalchemy_encrypted.row_tenant import TENANT_COLUMN_INFO_KEY
from sqlalchemy_encrypted.types import EncryptedType

from .conversion import Counts
from .ddl import TableInfo

__all__ = ["check_census", "encrypted_column", "run_reencryption"]


def encrypted_column(
    info: TableInfo,
    column: str,
    column_type: EncryptedType[Any],
    primary_key: Sequence[str],
    tenant_column: str | None,
) -> EncryptedColumn:
    """Describe ``info.column`` for the rotation package, typed ``column_type``."""
    columns: list[sa.Column[Any]] = [
        sa.Column(name, info.column(name).type, primary_key=True) for name in primary_key
    ]
    if tenant_column is not None and tenant_column not in primary_key:
        columns.append(sa.Column(tenant_column, info.column(tenant_column).type))
    columns.append(sa.Column(column, info.column(column).type))
    table_info = {TENANT_COLUMN_INFO_KEY: tenant_column} if tenant_column else {}
    table = sa.Table(info.name, sa.MetaData(), *columns, schema=info.schema, info=table_info)
    return EncryptedColumn.of(table, column, column_type=column_type)


def _describe(census: ColumnCensus) -> str:
    return (
        f"{census.encrypted} envelope(s), {census.not_encrypted} other value(s), "
        f"{census.nulls} NULL, {census.tenant_mismatches} under another tenant's key"
    )


def check_census(
    conn: Connection,
    column: EncryptedColumn,
    *,
    envelopes: int,
    plaintext: int,
    nulls: int,
    label: str,
) -> ColumnCensus:
    """Count the column's values by their stored headers and compare with the
    counts the conversion found by decrypting.

    The census reads headers in SQL and never decrypts, so it checks the
    conversion by an independent path. Raises :class:`MigrationError` on any
    difference, on a value under a key the keyring does not know, and on a
    value sealed under another tenant than its row's.
    """
    census = census_column(conn, column, column.column_type.key_provider)
    unknown = sum(e.count for e in census.entries if e.key_state == KeyStateName.UNKNOWN)
    if (
        census.encrypted != envelopes
        or census.not_encrypted != plaintext
        or census.nulls != nulls
        or census.tenant_mismatches
        or unknown
    ):
        raise MigrationError(
            f"{label}: the census of {column.label} found {_describe(census)}"
            f"{f' and {unknown} under unknown keys' if unknown else ''}, but the conversion "
            f"expected {envelopes} envelope(s), {plaintext} other value(s) and {nulls} NULL; "
            "the column was not swapped"
        )
    return census


def expected_counts(direction: str, counts: Counts) -> dict[str, int]:
    """Return what the census of the encrypted column should find after a pass."""
    if direction == "encrypt":
        # The census runs on the filled shadow column: every value is an envelope.
        return {"envelopes": counts.converted + counts.already, "plaintext": 0}
    # The census runs on the source column, still holding the envelopes.
    return {"envelopes": counts.converted, "plaintext": counts.already}


def run_reencryption(
    bind: Engine | Connection,
    column: EncryptedColumn,
    *,
    tenants: Sequence[str] | None,
    versions: Sequence[int] | None,
    batch_size: int,
) -> ReencryptionResult:
    """Re-encrypt the column's stale values with the shared job and raise unless it succeeded.

    With an Engine each batch commits on its own connection; with a
    Connection the job runs in savepoints of the caller's transaction. No
    checkpoint table is kept: a new run finds the values still stale from
    the census, so an interrupted migration resumes by running it again.
    """
    job = ReencryptionJob(
        bind,
        [column],
        tenants=tenants,
        versions=versions,
        batch_size=batch_size,
        job_name=f"alembic {column.label}",
        checkpoint=False,
    )
    result = job.run()
    result.raise_for_failures()
    return result
