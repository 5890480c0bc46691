"""The keyring table: constraints enforced by the database, portable DDL."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from sqlalchemy_encrypted import ConfigurationError, KeyPurpose, TenantContextError
from sqlalchemy_encrypted.keyring import Keyring, KeyState, keyring_table
from sqlalchemy_encrypted.keyring.store import utcnow


def _row(tenant: str, version: int, state: KeyState) -> dict[str, Any]:
    return {
        "key_id": uuid.uuid4(),
        "tenant_id": tenant,
        "purpose": "randomized",
        "key_version": version,
        "state": state.value,
        "wrapped_dek": b"\x01" * 60,
        "kms_provider": "local",
        "kek_id": "local:test:00",
        "key_check": b"\x00" * 16,
        "created_at": utcnow(),
        "row_version": 1,
    }


def test_create_table_is_idempotent(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    keyring.create_table()
    with engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("encryption_keys")}
    assert {
        "key_id",
        "tenant_id",
        "purpose",
        "key_version",
        "state",
        "wrapped_dek",
        "kms_provider",
        "kek_id",
        "key_check",
        "created_at",
        "activated_at",
        "retired_at",
        "destroyed_at",
        "row_version",
    } <= columns


def test_one_active_key_enforced(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    table = keyring.table
    with engine.begin() as conn:
        conn.execute(table.insert(), _row("t-acme", 1, KeyState.ACTIVE))
        conn.execute(table.insert(), _row("t-acme", 2, KeyState.DECRYPT_ONLY))
        conn.execute(table.insert(), _row("t-acme", 3, KeyState.PENDING))
        conn.execute(table.insert(), _row("t-globex", 1, KeyState.ACTIVE))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(table.insert(), _row("t-acme", 4, KeyState.ACTIVE))


def test_unique_version_enforced(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    with engine.begin() as conn:
        conn.execute(keyring.table.insert(), _row("t-acme", 1, KeyState.DECRYPT_ONLY))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(keyring.table.insert(), _row("t-acme", 1, KeyState.RETIRED))


def test_invalid_state_rejected(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    row = _row("t-acme", 1, KeyState.ACTIVE)
    row["state"] = "enabled"
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(keyring.table.insert(), row)


@pytest.mark.parametrize("mariadb", [False, True])
def test_mysql_ddl_compiles_offline(mariadb: bool) -> None:
    metadata = sa.MetaData()
    keyring_table(metadata)
    statements: list[str] = []
    url = "mariadb://" if mariadb else "mysql://"

    def record(sql: Any, *multiparams: Any, **params: Any) -> None:
        statements.append(str(sql.compile(dialect=mock.dialect)))

    mock = sa.create_mock_engine(url, record)
    metadata.create_all(mock, checkfirst=False)
    ddl = "\n".join(statements)
    assert "CREATE TABLE encryption_keys" in ddl
    assert "active_slot TINYINT AS (CASE WHEN state = 'active' THEN 1 END) STORED" in ddl
    assert "UNIQUE INDEX uq_encryption_keys_one_active (tenant_id, purpose, active_slot)" in ddl
    # The partial index of PostgreSQL and SQLite would be a full unique index here.
    assert "CREATE UNIQUE INDEX uq_encryption_keys_one_active" not in ddl
    assert "UNIQUE (tenant_id, purpose, key_version)" in ddl


@pytest.mark.parametrize("dialect_name", ["postgresql", "sqlite"])
def test_partial_index_ddl(dialect_name: str) -> None:
    metadata = sa.MetaData()
    keyring_table(metadata)
    statements: list[str] = []

    def record(sql: Any, *multiparams: Any, **params: Any) -> None:
        statements.append(str(sql.compile(dialect=mock.dialect)))

    mock = sa.create_mock_engine(f"{dialect_name}://", record)
    metadata.create_all(mock, checkfirst=False)
    ddl = "\n".join(statements)
    assert "CREATE UNIQUE INDEX uq_encryption_keys_one_active" in ddl
    assert "WHERE state = 'active'" in ddl
    assert "active_slot" not in ddl


def test_mysql_types() -> None:
    table = keyring_table(sa.MetaData())
    ddl = str(sa.schema.CreateTable(table).compile(dialect=mysql.dialect()))
    assert "key_id CHAR(32) NOT NULL" in ddl
    assert "kek_id VARCHAR(2048) NOT NULL" in ddl
    assert "tenant_id VARBINARY(1020) NOT NULL" in ddl


def test_long_tenant_id_rejected_before_sql(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    keyring = keyring_factory()
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))

    with pytest.raises(TenantContextError, match="256 characters, but the keyring table"):
        keyring.active_key("t" * 256, KeyPurpose.RANDOMIZED)

    assert statements == []
    assert keyring.active_key("t" * 255, KeyPurpose.RANDOMIZED).tenant_id == "t" * 255


def _nocase_keyring_table(engine: sa.Engine, keyring: Keyring) -> None:
    """Create the keyring table with a tenant_id that ignores case, as a
    table made by hand or by an older version could have."""
    ddl = str(sa.schema.CreateTable(keyring.table).compile(dialect=engine.dialect))
    exact = "tenant_id VARCHAR(255) NOT NULL"
    ddl = ddl.replace(exact, "tenant_id VARCHAR(255) COLLATE NOCASE NOT NULL")
    assert "COLLATE NOCASE" in ddl
    with engine.begin() as conn:
        conn.exec_driver_sql(ddl)


def test_inexact_tenant_column_raises(tmp_path: Any, local_kms: Any) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/keys.db")
    keyring = Keyring(engine, local_kms, set_default=False)
    _nocase_keyring_table(engine, keyring)
    acme = keyring.active_key("Acme", KeyPurpose.RANDOMIZED)

    with pytest.raises(ConfigurationError) as raised:
        keyring.active_key("acme", KeyPurpose.RANDOMIZED)
    message = str(raised.value)
    assert "returned the keys of tenant(s) 'Acme' for tenant 'acme'" in message
    assert "VARBINARY(1020)" in message
    with pytest.raises(ConfigurationError, match="for tenant 'ACME'"):
        keyring.shred("ACME")
    with pytest.raises(ConfigurationError, match="for tenant 'acme'"):
        keyring.list_keys("acme")

    assert keyring.active_key("Acme", KeyPurpose.RANDOMIZED).key_id == acme.key_id
    assert [info.state for info in keyring.list_keys("Acme")] == [KeyState.ACTIVE]
