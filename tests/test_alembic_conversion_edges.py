"""Less common paths of a column conversion: storage modes, leftovers, constraints, census."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations

import alembic_ext  # noqa: F401  (registers the operations)
from alembic_ext import rotation
from alembic_ext.ddl import reflect_table
from sqlalchemy_encrypted import (
    DeterministicEncrypted,
    Encrypted,
    MigrationError,
    MixedValuesError,
    tenant_scope,
)
from sqlalchemy_encrypted.testing import InMemoryKeyring


def _operations(conn: sa.Connection) -> Operations:
    return Operations(MigrationContext.configure(connection=conn))


def _binary(engine: sa.Engine) -> str:
    return str(sa.LargeBinary().compile(dialect=engine.dialect))


def _create_notes(engine: sa.Engine, *, binary: bool = False, extra: str = "") -> None:
    body = _binary(engine) if binary else "VARCHAR(200)"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, tenant_id VARCHAR(20), "
            f"body {body}{extra})"
        )
        notes = sa.table(
            "notes",
            sa.column("id"),
            sa.column("tenant_id"),
            sa.column("body", sa.LargeBinary() if binary else sa.String()),
        )
        conn.execute(
            notes.insert(),
            [
                {
                    "id": i,
                    "tenant_id": f"t{i % 3}",
                    "body": f"note {i}".encode() if binary else f"note {i}",
                }
                for i in range(1, 13)
            ],
        )


def _columns(engine: sa.Engine, table: str = "notes") -> list[str]:
    return [c["name"] for c in sa.inspect(engine).get_columns(table)]


def _notes_table(body_type: sa.types.TypeEngine[object]) -> sa.Table:
    return sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.String(20)),
        sa.Column("body", body_type),
        info={"tenant_column": "tenant_id"},
    )


def test_base64_storage_round_trip(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    _create_notes(engine)
    body_type = Encrypted(sa.String(200), storage="base64")
    with engine.connect() as conn:
        report = _operations(conn).encrypt_column(
            "notes", "body", type_=body_type, tenant_column="tenant_id", batch_size=5
        )
        conn.commit()
    assert report.converted == 12
    (body,) = [c for c in sa.inspect(engine).get_columns("notes") if c["name"] == "body"]
    assert isinstance(body["type"], sa.String)
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT body FROM notes WHERE id = 1").scalar_one()
        assert isinstance(stored, str)
        assert "note 1" not in stored
        table = _notes_table(Encrypted(sa.String(200), storage="base64"))
        assert conn.execute(sa.select(table.c.body).where(table.c.id == 4)).scalar_one() == "note 4"

    with engine.connect() as conn:
        report = _operations(conn).decrypt_column(
            "notes", "body", type_=sa.String(200), from_type=body_type, tenant_column="tenant_id"
        )
        conn.commit()
    assert report.converted == 12
    with engine.connect() as conn:
        values = conn.exec_driver_sql("SELECT body FROM notes ORDER BY id").scalars().all()
    assert values == [f"note {i}" for i in range(1, 13)]


def test_non_string_column(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE scores (id INTEGER PRIMARY KEY, score INTEGER)")
        conn.execute(
            sa.text("INSERT INTO scores VALUES (:id, :score)"),
            [{"id": i, "score": None if i == 3 else i * 10} for i in range(1, 6)],
        )
    score_type = DeterministicEncrypted(sa.Integer())
    with engine.connect() as conn:
        report = _operations(conn).encrypt_column(
            "scores", "score", type_=score_type, tenant_id="t"
        )
        conn.commit()
    assert (report.converted, report.null) == (4, 1)
    with engine.connect() as conn:
        _operations(conn).decrypt_column(
            "scores", "score", type_=sa.Integer(), from_type=score_type, tenant_id="t"
        )
        conn.commit()
    with engine.connect() as conn:
        values = conn.exec_driver_sql("SELECT score FROM scores ORDER BY id").scalars().all()
    assert values == [10, 20, None, 40, 50]


def test_leftover_of_other_direction_is_dropped(
    engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    _create_notes(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE notes ADD COLUMN body__decrypting VARCHAR(200)")

    with engine.connect() as conn:
        _operations(conn).encrypt_column(
            "notes", "body", type_=Encrypted(sa.String(200)), tenant_column="tenant_id"
        )
        conn.commit()

    assert _columns(engine) == ["id", "tenant_id", "body"]


def test_foreign_shadow_column_is_not_overwritten(
    engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    _create_notes(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE notes ADD COLUMN body__encrypting INTEGER")

    with engine.connect() as conn, pytest.raises(MigrationError, match="not a leftover"):
        _operations(conn).encrypt_column(
            "notes", "body", type_=Encrypted(sa.String(200)), tenant_column="tenant_id"
        )


def test_strict_on_resumed_run(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    _create_notes(engine, binary=True)
    sealed = _notes_table(Encrypted(sa.String(200))).c.body.type.seal("sealed", tenant_id="t1")
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE notes ADD COLUMN body__encrypting {_binary(engine)}")
        conn.execute(sa.text("UPDATE notes SET body = :v WHERE id = 4"), {"v": sealed})

    with engine.connect() as conn, pytest.raises(MixedValuesError) as raised:
        _operations(conn).encrypt_column(
            "notes",
            "body",
            type_=Encrypted(sa.String(200)),
            tenant_column="tenant_id",
            strict=True,
        )
    assert raised.value.primary_keys == [(4,)]


def test_server_default_is_dropped_with_warning(
    engine: sa.Engine, keyring: InMemoryKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    _create_notes(engine, extra=" DEFAULT 'empty'")

    with caplog.at_level(logging.WARNING, "sqlalchemy_encrypted"), engine.connect() as conn:
        _operations(conn).encrypt_column(
            "notes", "body", type_=Encrypted(sa.String(200)), tenant_column="tenant_id"
        )
        conn.commit()

    assert "server default of notes.body is not carried over" in caplog.text
    (body,) = [c for c in sa.inspect(engine).get_columns("notes") if c["name"] == "body"]
    assert body["default"] is None


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_sqlite_not_null_keeps_unnamed_unique(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE codes (id INTEGER PRIMARY KEY, code VARCHAR(20) NOT NULL, "
            "label VARCHAR(20) UNIQUE)"
        )
        conn.exec_driver_sql("INSERT INTO codes VALUES (1, 'a', 'x'), (2, 'b', 'y')")

    with engine.connect() as conn:
        report = _operations(conn).encrypt_column(
            "codes", "code", type_=Encrypted(sa.String(20)), tenant_id="t"
        )
        conn.commit()

    assert report.converted == 2
    assert _columns(engine, "codes") == ["id", "code", "label"]
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT code FROM codes ORDER BY id").scalars().all()
        assert all(isinstance(value, bytes) for value in stored)
        with pytest.raises(sa.exc.IntegrityError, match="NOT NULL"):
            conn.exec_driver_sql("INSERT INTO codes VALUES (3, NULL, 'z')")
        with pytest.raises(sa.exc.IntegrityError, match="UNIQUE"):
            conn.exec_driver_sql("INSERT INTO codes VALUES (3, x'00', 'x')")


def test_in_memory_sqlite_runs_in_one_transaction(keyring: InMemoryKeyring) -> None:
    engine = sa.create_engine("sqlite://")
    _create_notes(engine)
    with engine.connect() as conn:
        report = _operations(conn).encrypt_column(
            "notes", "body", type_=Encrypted(sa.String(200)), tenant_column="tenant_id"
        )
        conn.commit()
        stored = conn.exec_driver_sql("SELECT body FROM notes WHERE id = 2").scalar_one()
    assert report.converted == 12
    assert isinstance(stored, bytes)


def test_census_mismatch_raises(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    _create_notes(engine)
    body_type = _notes_table(Encrypted(sa.String(200))).c.body.type
    with engine.connect() as conn:
        _operations(conn).encrypt_column(
            "notes", "body", type_=Encrypted(sa.String(200)), tenant_column="tenant_id"
        )
        conn.commit()
        info = reflect_table(conn, "notes", None)
        column = rotation.encrypted_column(info, "body", body_type, ["id"], "tenant_id")
        census = rotation.check_census(
            conn, column, envelopes=12, plaintext=0, nulls=0, label="notes.body"
        )
        assert census.encrypted == 12
        with pytest.raises(MigrationError, match=r"the census of notes\.body found 12 envelope"):
            rotation.check_census(
                conn, column, envelopes=11, plaintext=1, nulls=0, label="notes.body"
            )


def test_tenant_of_each_row_is_checked_by_census(
    engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    _create_notes(engine, binary=True)
    body_type = _notes_table(Encrypted(sa.String(200))).c.body.type
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE notes SET body = :v"), {"v": body_type.seal("x", tenant_id="t1")}
        )
        info = reflect_table(conn, "notes", None)
        column = rotation.encrypted_column(info, "body", body_type, ["id"], "tenant_id")
        with pytest.raises(MigrationError, match="under another tenant's key"):
            rotation.check_census(
                conn, column, envelopes=12, plaintext=0, nulls=0, label="notes.body"
            )
    with tenant_scope("t1"):
        assert body_type.decrypt(body_type.seal("y", tenant_id="t1")) == "y"


def test_runs_inside_callers_transaction(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    _create_notes(engine)
    with engine.connect() as conn:
        operations = _operations(conn)
        conn.exec_driver_sql("SELECT 1")  # the caller's transaction has begun
        report = operations.encrypt_column(
            "notes", "body", type_=Encrypted(sa.String(200)), tenant_column="tenant_id"
        )
        assert report.converted == 12
        conn.rollback()

    # Nothing was committed on the side: the rollback undid the whole operation.
    assert _columns(engine) == ["id", "tenant_id", "body"]
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT body FROM notes WHERE id = 1").scalar_one() == "note 1"
