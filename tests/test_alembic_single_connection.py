"""Conversions on engines whose pool has a single connection.

Application test suites often run migrations on an in-memory SQLite
database with ``StaticPool``. Such a pool gives the migration's own
connection to every other user of the engine, a Keyring on that engine
included, so the keyring's commits and rollbacks would end the migration's
transaction. The operations reject that setup before writing anything and
work with a key provider that does not use the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.pool import AssertionPool, StaticPool

import alembic_ext  # noqa: F401  (registers the operations)
from sqlalchemy_encrypted import Encrypted, MigrationError
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .alembic_env import AlembicEnv
from .test_alembic_encrypt_column import (
    CREATE_PERSONS,
    DECRYPT_PERSONS,
    ENCRYPT_PERSONS,
    column_names,
    plain_rows,
    raw_rows,
    read_people,
    seed,
)

ENGINES: dict[str, Callable[[Path], sa.Engine]] = {
    "in-memory, StaticPool": lambda _: sa.create_engine("sqlite://", poolclass=StaticPool),
    # SQLAlchemy's default for in-memory SQLite is SingletonThreadPool.
    "in-memory, default pool": lambda _: sa.create_engine("sqlite://"),
    "file, StaticPool": lambda path: sa.create_engine(
        f"sqlite:///{path}/app.db", poolclass=StaticPool
    ),
}


@pytest.fixture(params=sorted(ENGINES))
def single_connection_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    engine = ENGINES[request.param](tmp_path)
    yield engine
    engine.dispose()


def _env(tmp_path: Path, engine: sa.Engine) -> AlembicEnv:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    env.write_revision("r2", "r1", ENCRYPT_PERSONS, DECRYPT_PERSONS)
    return env


def _key_count(keyring: Keyring) -> int:
    with keyring.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(keyring.table)).scalar_one()


def test_keyring_on_migration_connection_rejected(
    tmp_path: Path, single_connection_engine: sa.Engine, local_kms: LocalKms
) -> None:
    engine = single_connection_engine
    keyring = Keyring(engine, local_kms)
    keyring.create_table()
    env = _env(tmp_path, engine)
    env.upgrade("r1")
    rows = plain_rows(20)
    seed(engine, rows)

    with pytest.raises(MigrationError) as caught:
        env.upgrade("head")

    message = str(caught.value)
    pool = type(engine.pool).__name__
    assert message.startswith(
        "op.encrypt_column() on persons.name: the Keyring uses the migration's engine, "
        f"whose {pool} has no connection to give it but the migration's own."
    )
    assert "Nothing was written" in message
    assert "Create the Keyring on an engine of its own" in message
    assert "InMemoryKeyring" in message
    assert env.current() == "r1"
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]
    assert column_names(engine) == ["id", "tenant_id", "name", "email"]
    assert _key_count(keyring) == 0


def test_reencrypt_on_migration_connection_rejected(local_kms: LocalKms) -> None:
    engine = sa.create_engine("sqlite://", poolclass=StaticPool)
    keyring = Keyring(engine, local_kms, active_key_ttl=0)
    keyring.create_table()
    body_type = Encrypted(sa.String(100))
    notes = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.String(20)),
        sa.Column("body", body_type),
    )
    notes.create(engine)
    # Sealed before the INSERT's transaction, so that the keyring's own
    # connection use cannot end it.
    sealed = [body_type.seal(f"note {i}", tenant_id="t1") for i in range(5)]
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO notes (id, tenant_id, body) VALUES (:id, 't1', :body)"),
            [{"id": i, "body": value} for i, value in enumerate(sealed)],
        )
    keyring.rotate("t1", activate_now=True)

    with engine.connect() as conn, pytest.raises(MigrationError) as caught:
        Operations(MigrationContext.configure(connection=conn)).reencrypt_column(
            "notes", "body", type_=Encrypted(sa.String(100)), tenant_column="tenant_id"
        )

    assert str(caught.value).startswith(
        "op.reencrypt_column() on notes.body: the Keyring uses the migration's engine"
    )
    with engine.connect() as conn:
        stored = [bytes(row[0]) for row in conn.exec_driver_sql("SELECT body FROM notes")]
    assert stored == sealed
    engine.dispose()


def _in_memory_keyring(_: LocalKms) -> Any:
    return InMemoryKeyring()


def _keyring_on_own_engine(kms: LocalKms) -> Any:
    keyring = Keyring(sa.create_engine("sqlite://", poolclass=StaticPool), kms)
    keyring.create_table()
    return keyring


@pytest.mark.parametrize(
    "make_provider",
    [_in_memory_keyring, _keyring_on_own_engine],
    ids=["InMemoryKeyring", "Keyring on its own engine"],
)
def test_single_connection_engine_converts(
    tmp_path: Path,
    single_connection_engine: sa.Engine,
    local_kms: LocalKms,
    make_provider: Callable[[LocalKms], Any],
) -> None:
    import sqlalchemy_encrypted as se

    engine = single_connection_engine
    se.set_default_key_provider(make_provider(local_kms))
    env = _env(tmp_path, engine)
    env.upgrade("r1")
    rows = plain_rows(20)
    seed(engine, rows)

    env.upgrade("head")

    assert env.current() == "r2"
    assert [report.column_swapped for report in env.reports] == [True, True]
    assert read_people(engine) == [(r["name"], r["email"]) for r in rows]

    env.downgrade("r1")

    assert env.current() == "r1"
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]


def test_assertion_pool_converts(tmp_path: Path, keyring: InMemoryKeyring) -> None:
    # AssertionPool raises on a second checkout, so the batches cannot have
    # a connection of their own.
    engine = sa.create_engine(f"sqlite:///{tmp_path}/app.db", poolclass=AssertionPool)
    env = _env(tmp_path, engine)
    env.upgrade("r1")
    rows = plain_rows(20)
    seed(engine, rows)

    env.upgrade("head")

    assert env.current() == "r2"
    assert read_people(engine) == [(r["name"], r["email"]) for r in rows]
    engine.dispose()
