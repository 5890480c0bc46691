"""SQLite details of the column swap: values written back in place, triggers,
foreign keys, type affinity and the autogenerate check of such a column."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations

import alembic_ext  # noqa: F401  (registers the operations)
from alembic_ext.swap_sqlite import holds_only_envelopes
from sqlalchemy_encrypted import (
    DeterministicEncrypted,
    Encrypted,
    MigrationError,
    StorageFormatError,
    find_undersized_columns,
    tenant_scope,
)
from sqlalchemy_encrypted.testing import InMemoryKeyring

pytestmark = pytest.mark.parametrize("engine", ["sqlite"], indirect=True)

EMAIL = DeterministicEncrypted(sa.String(254))


def _operations(conn: sa.Connection) -> Operations:
    return Operations(MigrationContext.configure(connection=conn))


def _encrypt(engine: sa.Engine, table: str = "accounts", **options: Any) -> None:
    with engine.connect() as conn:
        _operations(conn).encrypt_column(
            table, "email", type_=EMAIL, tenant_column="tenant_id", **options
        )
        conn.commit()


def _create(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def _scalars(engine: sa.Engine, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql(sql).scalars())


ACCOUNTS = (
    "CREATE TABLE accounts (id INTEGER PRIMARY KEY, tenant_id VARCHAR(40), "
    "email VARCHAR(254) DEFAULT 'none', note TEXT, UNIQUE (tenant_id, email))"
)
ROWS = "INSERT INTO accounts VALUES (1, 't1', 'a@example.test', 'x'), (2, 't2', NULL, 'y')"


def test_written_back_keeps_table_definition(
    engine: sa.Engine, keyring: InMemoryKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    _create(engine, ACCOUNTS, ROWS)
    table_sql = "SELECT sql FROM sqlite_master WHERE name = 'accounts'"
    before = _scalars(engine, table_sql)

    with caplog.at_level(logging.INFO, "sqlalchemy_encrypted"):
        _encrypt(engine)

    assert "written back into the column" in caplog.text
    assert "server default of accounts.email is kept as written" in caplog.text
    assert _scalars(engine, table_sql) == before
    assert _scalars(engine, "SELECT typeof(email) FROM accounts ORDER BY id") == ["blob", "null"]
    assert _scalars(engine, "SELECT note FROM accounts ORDER BY id") == ["x", "y"]

    # The declared length is below the envelope size, which SQLite ignores.
    email_type = DeterministicEncrypted(sa.String(254))
    accounts = sa.Table("accounts", sa.MetaData(), sa.Column("id"), sa.Column("email", email_type))
    (undersized,) = find_undersized_columns(engine, accounts.metadata)
    assert (undersized.column, undersized.actual) == ("accounts.email", 254)

    # The kept default is plaintext, which the encrypted type does not read.
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO accounts (id, tenant_id) VALUES (3, 't1')")
        query = sa.select(accounts.c.email).where(accounts.c.id == 3)
        with pytest.raises(StorageFormatError), tenant_scope("t1"):
            conn.execute(query).all()


def test_triggers_do_not_fire_and_are_kept(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    _create(
        engine,
        ACCOUNTS,
        ROWS,
        "CREATE TABLE email_changes (account_id INTEGER, new_email BLOB)",
        "CREATE TRIGGER log_email AFTER UPDATE OF email ON accounts "
        "BEGIN INSERT INTO email_changes VALUES (NEW.id, NEW.email); END",
    )

    _encrypt(engine)

    assert _scalars(engine, "SELECT count(*) FROM email_changes") == [0]
    assert _scalars(engine, "SELECT name FROM sqlite_master WHERE type = 'trigger'") == [
        "log_email"
    ]
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE accounts SET email = x'00' WHERE id = 2")
    assert _scalars(engine, "SELECT account_id FROM email_changes") == [2]


def test_not_null_keeps_referencing_rows(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    """Recreating the table to add NOT NULL would run ON DELETE CASCADE of the
    tables that refer to it while foreign keys are enforced."""
    sa.event.listen(
        engine,
        "connect",
        lambda dbapi_conn, _: dbapi_conn.execute("PRAGMA foreign_keys = ON"),
    )
    engine.dispose()
    _create(
        engine,
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, tenant_id VARCHAR(40), "
        "email VARCHAR(254) NOT NULL)",
        "INSERT INTO accounts VALUES (1, 't1', 'a@example.test'), (2, 't1', 'b@example.test')",
        "CREATE TABLE logins (id INTEGER PRIMARY KEY, "
        "account_id INTEGER REFERENCES accounts (id) ON DELETE CASCADE)",
        "INSERT INTO logins VALUES (10, 1), (11, 2)",
    )
    assert _scalars(engine, "PRAGMA foreign_keys") == [1]

    _encrypt(engine)

    assert _scalars(engine, "SELECT account_id FROM logins ORDER BY id") == [1, 2]
    assert _scalars(engine, "SELECT typeof(email) FROM accounts") == ["blob", "blob"]


def test_check_failing_on_envelopes_rolls_back(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    _create(
        engine,
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, tenant_id VARCHAR(40), "
        "email VARCHAR(254) CHECK (typeof(email) = 'text'))",
        "INSERT INTO accounts VALUES (1, 't1', 'a@example.test')",
    )

    with pytest.raises(MigrationError, match="write the converted values into the column"):
        _encrypt(engine)

    assert _scalars(engine, "SELECT email FROM accounts") == ["a@example.test"]
    columns = [c["name"] for c in sa.inspect(engine).get_columns("accounts")]
    assert columns == ["id", "tenant_id", "email", "email__encrypting"]


def test_decrypt_into_numeric_affinity_is_rejected(
    engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    """SQLite converts text that looks like a number when it is written into a
    column of INTEGER affinity, which would change a decrypted '007'."""
    code_type = Encrypted(sa.String(10))
    sa.Table("codes", sa.MetaData(), sa.Column("code", code_type))
    _create(
        engine,
        "CREATE TABLE codes (id INTEGER PRIMARY KEY, code INTEGER UNIQUE)",
        "INSERT INTO codes VALUES (1, NULL)",
    )
    with engine.begin() as conn:
        codes = sa.table("codes", sa.column("id"), sa.column("code", sa.LargeBinary))
        sealed = code_type.seal("007", tenant_id="t1")
        conn.execute(codes.update().values(code=sealed))

    with engine.connect() as conn, pytest.raises(MigrationError, match="type affinity"):
        _operations(conn).decrypt_column(
            "codes", "code", type_=sa.String(10), from_type=code_type, tenant_id="t1"
        )

    assert _scalars(engine, "SELECT typeof(code) FROM codes") == ["blob"]


def test_holds_only_envelopes(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    _create(engine, "CREATE TABLE probe (id INTEGER PRIMARY KEY, value VARCHAR(254))")
    value_type = DeterministicEncrypted(sa.String(254))
    sa.Table("probe", sa.MetaData(), sa.Column("value", value_type))
    sealed = value_type.seal("a@example.test", tenant_id="t1")
    cases: list[tuple[str, list[object], bool]] = [
        ("no rows", [], False),
        ("only NULL", [None], False),
        ("plaintext", ["a@example.test"], False),
        ("short bytes", [b"\x01\x02"], False),
        ("envelope and plaintext", [sealed, "b@example.test"], False),
        ("envelopes and NULL", [sealed, None], True),
    ]
    for label, values, expected in cases:
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM probe")
            for value in values:
                conn.execute(sa.text("INSERT INTO probe (value) VALUES (:v)"), {"v": value})
            assert holds_only_envelopes(conn, "probe", None, "value") is expected, label


def test_attached_schema_trigger_is_recreated(
    engine: sa.Engine, keyring: InMemoryKeyring, tmp_path: Path
) -> None:
    path = tmp_path / "aux.db"
    sa.event.listen(
        engine,
        "connect",
        lambda dbapi_conn, _: dbapi_conn.execute(f"ATTACH DATABASE '{path}' AS aux"),
    )
    engine.dispose()
    _create(
        engine,
        ACCOUNTS.replace("CREATE TABLE accounts", "CREATE TABLE aux.accounts"),
        ROWS.replace("INTO accounts", "INTO aux.accounts"),
        "CREATE TABLE aux.email_changes (account_id INTEGER)",
        "CREATE TRIGGER aux.log_email AFTER UPDATE OF email ON accounts "
        "BEGIN INSERT INTO email_changes VALUES (NEW.id); END",
    )

    with engine.connect() as conn:
        _operations(conn).encrypt_column(
            "accounts", "email", type_=EMAIL, tenant_column="tenant_id", schema="aux"
        )
        conn.commit()

    triggers = "SELECT name FROM aux.sqlite_master WHERE type = 'trigger'"
    assert _scalars(engine, triggers) == ["log_email"]
    assert _scalars(engine, "SELECT count(*) FROM aux.email_changes") == [0]
    assert _scalars(engine, "SELECT typeof(email) FROM aux.accounts ORDER BY id") == [
        "blob",
        "null",
    ]


def test_decrypt_keeps_blob_declared_type(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    """A column created encrypted is declared BLOB, and a decryption written
    back in place leaves text values under that type."""
    email_type = DeterministicEncrypted(sa.String(254))
    accounts = sa.Table(
        "accounts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.String(40)),
        sa.Column("email", email_type),
        sa.UniqueConstraint("tenant_id", "email"),
        info={"tenant_column": "tenant_id"},
    )
    accounts.create(engine)
    with engine.begin() as conn:
        conn.execute(
            accounts.insert(),
            [
                {"id": 1, "tenant_id": "t1", "email": "a@example.test"},
                {"id": 2, "tenant_id": "t2", "email": "a@example.test"},
            ],
        )

    with engine.connect() as conn:
        _operations(conn).decrypt_column(
            "accounts",
            "email",
            type_=sa.String(254),
            from_type=DeterministicEncrypted(sa.String(254)),
            tenant_column="tenant_id",
        )
        conn.commit()

    (email,) = [c for c in sa.inspect(engine).get_columns("accounts") if c["name"] == "email"]
    assert isinstance(email["type"], sa.LargeBinary)
    assert _scalars(engine, "SELECT email FROM accounts ORDER BY id") == [
        "a@example.test",
        "a@example.test",
    ]
    with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError, match="UNIQUE"):
        conn.exec_driver_sql("INSERT INTO accounts VALUES (3, 't1', 'a@example.test')")
