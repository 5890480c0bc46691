"""Memory of a column conversion stays bounded by the batch size, not the table size.

The test converts a small and a five times larger SQLite table and
compares the peak memory Python allocated (``tracemalloc``) during each
run. Set ``SQLALCHEMY_ENCRYPTED_MEMORY_ROWS`` to size the larger table, for
example 100000 for the manual check described in ``docs/migrations.md``.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations

import alembic_ext  # noqa: F401  (registers the operations)
from sqlalchemy_encrypted import Encrypted
from sqlalchemy_encrypted.testing import InMemoryKeyring

LARGE_ROWS = int(os.environ.get("SQLALCHEMY_ENCRYPTED_MEMORY_ROWS", "10000"))
SMALL_ROWS = max(LARGE_ROWS // 5, 1)
BATCH_SIZE = 500


def _peak_bytes(path: Path, rows: int) -> int:
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, tenant_id VARCHAR(20), body TEXT)"
        )
        conn.execute(
            sa.text("INSERT INTO events VALUES (:id, :tenant, :body)"),
            [
                {"id": i, "tenant": f"t{i % 7}", "body": f"event {i} " + "x" * 200}
                for i in range(1, rows + 1)
            ],
        )
    gc.collect()
    tracemalloc.start()
    try:
        with engine.connect() as conn:
            report = Operations(MigrationContext.configure(connection=conn)).encrypt_column(
                "events",
                "body",
                type_=Encrypted(sa.Text()),
                tenant_column="tenant_id",
                batch_size=BATCH_SIZE,
            )
            conn.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        engine.dispose()
    assert report.converted == rows
    return peak


@pytest.mark.slow
def test_conversion_memory_is_bounded(tmp_path: Path, keyring: InMemoryKeyring) -> None:
    small = _peak_bytes(tmp_path / "small.db", SMALL_ROWS)
    large = _peak_bytes(tmp_path / "large.db", LARGE_ROWS)

    print(f"peak memory: {SMALL_ROWS} rows {small / 1e6:.1f} MB, ", end="")
    print(f"{LARGE_ROWS} rows {large / 1e6:.1f} MB")
    # Five times the rows may not cost five times the memory; 1.5 leaves room
    # for caches that fill once (statement cache, key cache).
    assert large < 1.5 * small
