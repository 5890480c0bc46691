"""Column conversions on tables whose constraints SQLite cannot drop a column from."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations

import alembic_ext  # noqa: F401  (registers the operations)
from sqlalchemy_encrypted import DeterministicEncrypted, MigrationError, tenant_scope
from sqlalchemy_encrypted.testing import InMemoryKeyring

TABLE_CONSTRAINTS = {
    "table-level unique": "CONSTRAINT uq_accounts_login UNIQUE (tenant_id, login)",
    "column-level unique": "UNIQUE (login)",
}


def _create_accounts(engine: sa.Engine, constraint: str | None) -> None:
    extra = f", {constraint}" if constraint else ""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, tenant_id VARCHAR(20) NOT NULL, "
            f"login VARCHAR(40) NOT NULL{extra})"
        )
        conn.exec_driver_sql(
            "INSERT INTO accounts VALUES (1, 't-acme', 'carol'), (2, 't-acme', 'dave')"
        )


def _encrypt_login(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        Operations(MigrationContext.configure(connection=conn)).encrypt_column(
            "accounts",
            "login",
            type_=DeterministicEncrypted(sa.String(40)),
            tenant_column="tenant_id",
        )
        conn.commit()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
@pytest.mark.parametrize("constraint", TABLE_CONSTRAINTS.values(), ids=TABLE_CONSTRAINTS.keys())
def test_sqlite_unique_constraint_is_kept(
    engine: sa.Engine, keyring: InMemoryKeyring, constraint: str
) -> None:
    """SQLite refuses to drop a column that a UNIQUE constraint uses, so the
    envelopes are written back into the column, under the same constraint."""
    _create_accounts(engine, constraint)

    _encrypt_login(engine)

    assert [c["name"] for c in sa.inspect(engine).get_columns("accounts")] == [
        "id",
        "tenant_id",
        "login",
    ]
    with engine.connect() as conn:
        logins = conn.exec_driver_sql("SELECT login FROM accounts ORDER BY id").scalars().all()
        assert all(isinstance(login, bytes) for login in logins)
        with pytest.raises(sa.exc.IntegrityError, match="UNIQUE"):
            conn.execute(
                sa.text("INSERT INTO accounts VALUES (3, 't-acme', :login)"), {"login": logins[0]}
            )


FOREIGN_KEYS = {
    "column is a foreign key": (
        "CREATE TABLE logins (login VARCHAR(40) PRIMARY KEY)",
        "FOREIGN KEY (login) REFERENCES logins (login)",
        "FOREIGN KEY (login) to logins",
    ),
    "column is referenced": (
        "CREATE TABLE sessions (id INTEGER PRIMARY KEY, "
        "login VARCHAR(40) REFERENCES accounts (login))",
        "UNIQUE (login)",
        "FOREIGN KEY (login) of table sessions",
    ),
}


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
@pytest.mark.parametrize("setup", FOREIGN_KEYS.values(), ids=FOREIGN_KEYS.keys())
def test_sqlite_foreign_key_stops_before_writing(
    engine: sa.Engine, keyring: InMemoryKeyring, setup: tuple[str, str, str]
) -> None:
    """A foreign key compares stored values, which the conversion changes, so
    the conversion stops before its first write and names the key."""
    other_table, constraint, named = setup
    _create_accounts(engine, constraint)
    with engine.begin() as conn:
        conn.exec_driver_sql(other_table)

    with pytest.raises(MigrationError) as caught:
        _encrypt_login(engine)

    message = str(caught.value)
    assert "accounts.login" in message
    assert named in message
    assert "Nothing was written" in message
    assert [c["name"] for c in sa.inspect(engine).get_columns("accounts")] == [
        "id",
        "tenant_id",
        "login",
    ]
    with engine.connect() as conn:
        logins = conn.exec_driver_sql("SELECT login FROM accounts ORDER BY id").scalars().all()
    assert logins == ["carol", "dave"]


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_sqlite_unique_index_is_kept(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    """A unique index is dropped and recreated around the column swap."""
    _create_accounts(engine, None)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE UNIQUE INDEX uq_accounts_login ON accounts (tenant_id, login)")

    _encrypt_login(engine)

    indexes = sa.inspect(engine).get_indexes("accounts")
    assert [(i["name"], i["column_names"], bool(i["unique"])) for i in indexes] == [
        ("uq_accounts_login", ["tenant_id", "login"], True)
    ]
    login_type = DeterministicEncrypted(sa.String(40), context="accounts.login")
    with tenant_scope("t-acme"), engine.connect() as conn:
        tokens = login_type.search_tokens("dave")
        found = conn.execute(
            sa.text("SELECT id FROM accounts WHERE login IN :t").bindparams(
                sa.bindparam("t", expanding=True)
            ),
            {"t": tokens},
        ).scalars()
        assert found.all() == [2]


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_postgresql_keeps_unique_constraint(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    _create_accounts(engine, TABLE_CONSTRAINTS["table-level unique"])

    _encrypt_login(engine)

    constraints = sa.inspect(engine).get_unique_constraints("accounts")
    assert [(c["name"], c["column_names"]) for c in constraints] == [
        ("uq_accounts_login", ["tenant_id", "login"])
    ]
