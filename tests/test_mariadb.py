"""MySQL-family support, run against a real MariaDB server.

The rest of the suite runs on SQLite and PostgreSQL. These tests cover what
differs on MariaDB: the storage column types, collations, the keyring's
generated active-key column, lookups through bound parameters (PyMySQL
binds by name), Alembic autogenerate, and the conversion operations that
MySQL does not support.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_encrypted import (
    ConfigurationError,
    DeterministicEncrypted,
    Encrypted,
    KeyDestroyedError,
    KeyPurpose,
    MigrationError,
    PlaintextTooLongError,
    UnsupportedOperationError,
    set_default_key_provider,
    tenant_scope,
)
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.rotation import census, reencrypt
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .alembic_env import AlembicEnv

TENANT = "t-acme"


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = ({"info": {"tenant_column": "tenant_id"}},)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)), unique=True)
    code: Mapped[str | None] = mapped_column(
        DeterministicEncrypted(sa.String(40), storage="base64"), index=True
    )
    name: Mapped[str | None] = mapped_column(Encrypted(sa.String(100)))
    notes: Mapped[str | None] = mapped_column(Encrypted(sa.Text))
    motto: Mapped[str | None] = mapped_column(Encrypted(sa.String(60), storage="base64"))


class Typed(Base):
    __tablename__ = "typed"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    amount: Mapped[decimal.Decimal | None] = mapped_column(Encrypted(sa.Numeric(20, 6)))
    big: Mapped[int | None] = mapped_column(Encrypted(sa.BigInteger))
    ratio: Mapped[float | None] = mapped_column(Encrypted(sa.Float))
    flag: Mapped[bool | None] = mapped_column(Encrypted(sa.Boolean))
    day: Mapped[dt.date | None] = mapped_column(Encrypted(sa.Date))
    moment: Mapped[dt.datetime | None] = mapped_column(Encrypted(sa.DateTime(timezone=True)))
    naive: Mapped[dt.datetime | None] = mapped_column(Encrypted(sa.DateTime()))
    clock: Mapped[dt.time | None] = mapped_column(Encrypted(sa.Time))
    span: Mapped[dt.timedelta | None] = mapped_column(Encrypted(sa.Interval))
    ident: Mapped[uuid.UUID | None] = mapped_column(Encrypted(sa.Uuid))
    document: Mapped[Any] = mapped_column(Encrypted(sa.JSON), nullable=True)
    color: Mapped[Color | None] = mapped_column(Encrypted(sa.Enum(Color)))
    blob: Mapped[bytes | None] = mapped_column(Encrypted(sa.LargeBinary))
    text: Mapped[str | None] = mapped_column(Encrypted(sa.Unicode(30)))


@pytest.fixture
def schema(mariadb_engine: sa.Engine, keyring: InMemoryKeyring) -> sa.Engine:
    Base.metadata.create_all(mariadb_engine)
    return mariadb_engine


@pytest.fixture
def autocommit(schema: sa.Engine) -> Iterator[sa.Connection]:
    """A connection whose every statement sees the latest commits.

    MariaDB's default isolation, REPEATABLE READ, would keep the snapshot of
    the first read for the whole transaction.
    """
    with schema.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn


def _add(engine: sa.Engine, row_id: int, email: str | None, tenant: str = TENANT) -> None:
    with Session(engine) as session, tenant_scope(tenant):
        session.add(
            Account(
                id=row_id,
                tenant_id=tenant,
                email=email,
                code=None if email is None else email[:30],
                name=f"Name {row_id}",
                notes="note " * 400,
                motto="Carpe diem",
            )
        )
        session.commit()


def _ids(conn: sa.Connection, statement: Any, parameters: dict[str, Any] | None = None) -> Any:
    return sorted(conn.execute(statement, parameters or {}).scalars())


# -- storage -------------------------------------------------------------------


def test_storage_column_types(schema: sa.Engine) -> None:
    columns = {c["name"]: c for c in sa.inspect(schema).get_columns("accounts")}
    assert str(columns["email"]["type"]).startswith("VARBINARY(")
    assert str(columns["name"]["type"]).startswith("VARBINARY(")
    assert str(columns["notes"]["type"]) == "LONGBLOB"
    motto = columns["motto"]["type"]
    assert str(motto).startswith("VARCHAR(")
    assert motto.collation == "ascii_bin"
    assert columns["code"]["type"].collation == "ascii_bin"


def test_typed_values_round_trip(schema: sa.Engine) -> None:
    values = {
        "amount": decimal.Decimal("-12345678901234.500000"),
        "big": -(2**63),
        "ratio": 0.1,
        "flag": False,
        "day": dt.date(1999, 12, 31),
        "moment": dt.datetime(2026, 3, 1, 2, 3, 4, 567, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
        "naive": dt.datetime(2026, 3, 1, 2, 3, 4, 999999),
        "clock": dt.time(23, 59, 59, 1),
        "span": dt.timedelta(days=-3, microseconds=7),
        "ident": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "document": {"a": [1, 2.5, None, {"b": "ü𝄞"}], "c": True},
        "color": Color.BLUE,
        "blob": b"\x00\xff" * 40,
        "text": "trailing space \x00 𝄞 ",
    }
    with tenant_scope(TENANT), Session(schema) as session:
        session.add(Typed(id=1, **values))
        session.add(Typed(id=2))
        session.commit()
    with tenant_scope(TENANT), Session(schema) as session:
        full = session.get(Typed, 1)
        empty = session.get(Typed, 2)
        assert full is not None
        assert empty is not None
        for name, value in values.items():
            loaded = getattr(full, name)
            assert loaded == value, name
            assert type(loaded) is type(value), name
            assert getattr(empty, name) is None, name
        assert full.amount is not None
        assert full.amount.as_tuple().exponent == -6


def test_too_long_value_raises_before_sql(schema: sa.Engine) -> None:
    with tenant_scope(TENANT), Session(schema) as session:
        session.add(Account(id=1, tenant_id=TENANT, name="x" * 101))
        with pytest.raises(PlaintextTooLongError, match=r"accounts\.name"):
            session.commit()


# -- queries ---------------------------------------------------------------------


def test_plain_value_lookups(schema: sa.Engine, autocommit: sa.Connection) -> None:
    _add(schema, 1, "ann@example.test")
    _add(schema, 2, "bob@example.test")
    _add(schema, 3, None)
    with tenant_scope(TENANT):
        assert _ids(
            autocommit, sa.select(Account.id).where(Account.email == "ann@example.test")
        ) == [1]
        assert _ids(
            autocommit, sa.select(Account.id).where(Account.code == "bob@example.test")
        ) == [2]
        assert _ids(
            autocommit,
            sa.select(Account.id).where(Account.email.in_(["ann@example.test", "x@y"])),
        ) == [1]
        assert _ids(
            autocommit, sa.select(Account.id).where(Account.email != "ann@example.test")
        ) == [2]
        assert _ids(autocommit, sa.select(Account.id).where(Account.email.is_(None))) == [3]


def test_lookups_find_every_key_version(
    schema: sa.Engine, keyring: InMemoryKeyring, autocommit: sa.Connection
) -> None:
    email_statement = sa.select(Account.id).where(Account.email == sa.bindparam("e"))
    code_statement = sa.select(Account.id).where(Account.code == sa.bindparam("e"))

    def lambda_lookup(value: str) -> Any:
        return sa.lambda_stmt(lambda: sa.select(Account.id).where(Account.email == value))

    _add(schema, 1, "old@example.test")
    with tenant_scope(TENANT):
        assert _ids(autocommit, email_statement, {"e": "old@example.test"}) == [1]
        keyring.rotate(TENANT)
        _add(schema, 2, "new@example.test")
        for value, expected in (("old@example.test", [1]), ("new@example.test", [2])):
            assert _ids(autocommit, email_statement, {"e": value}) == expected
            assert _ids(autocommit, code_statement, {"e": value}) == expected
            assert _ids(autocommit, lambda_lookup(value)) == expected
            assert _ids(autocommit, sa.select(Account.id).where(Account.email == value)) == expected
        both = sa.select(Account.id).where(
            Account.email.in_([sa.bindparam("a"), sa.bindparam("b")])
        )
        assert _ids(autocommit, both, {"a": "old@example.test", "b": "new@example.test"}) == [1, 2]


def test_expanding_parameter_raises_clear_error(schema: sa.Engine) -> None:
    statement = sa.select(Account.id).where(
        Account.email.in_(sa.bindparam("emails", expanding=True))
    )
    with tenant_scope(TENANT), schema.connect() as conn:
        with pytest.raises(UnsupportedOperationError, match="not supported on mysql"):
            conn.execute(statement, {"emails": ["a@example.test"]})


def test_unique_constraint_rejects_duplicate(schema: sa.Engine) -> None:
    _add(schema, 1, "ann@example.test")
    with pytest.raises(sa.exc.IntegrityError):
        _add(schema, 2, "ann@example.test")
    _add(schema, 3, "ann@example.test", tenant="t-globex")


def test_randomized_comparison_raises_before_sql(schema: sa.Engine) -> None:
    with tenant_scope(TENANT), Session(schema) as session:
        with pytest.raises(UnsupportedOperationError, match=r"accounts\.name"):
            session.scalars(sa.select(Account).where(Account.name == "Ann")).all()


def test_reencrypt_and_census(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    for row_id in range(1, 31):
        _add(schema, row_id, f"user{row_id}@example.test")
    keyring.rotate(TENANT)
    assert census(schema, Base, tables=["accounts"]).stale_total == 5 * 30

    result = reencrypt(schema, Base, tables=["accounts"], batch_size=7)

    assert result.status == "succeeded"
    assert result.values_reencrypted == 5 * 30
    assert result.remaining == {}
    after = census(schema, Base, tables=["accounts"])
    assert after.stale() == {}
    assert {entry.key_version for entry in after} == {2}
    with tenant_scope(TENANT), Session(schema) as session:
        found = session.scalars(
            sa.select(Account).where(Account.email == "user7@example.test")
        ).one()
        assert found.id == 7
        assert found.motto == "Carpe diem"


# -- keyring -----------------------------------------------------------------------


@pytest.fixture
def mariadb_keyring(mariadb_engine: sa.Engine, tmp_path: Path) -> Iterator[Keyring]:
    kms = LocalKms.create(tmp_path / "master.key", kek="kek-a")
    keyring = Keyring(mariadb_engine, kms, key_usage_limit=10_000)
    keyring.create_table()
    yield keyring
    set_default_key_provider(None)


def test_keyring_tenant_ids_compare_exactly(mariadb_keyring: Keyring) -> None:
    tenants = ["Acme", "acme", "acme ", "ACME"]
    keys = [mariadb_keyring.active_key(t, KeyPurpose.RANDOMIZED) for t in tenants]

    assert [key.tenant_id for key in keys] == tenants
    assert len({key.key_id for key in keys}) == len(tenants)
    assert mariadb_keyring.shred("acme") == 1
    for tenant in ("Acme", "acme ", "ACME"):
        assert mariadb_keyring.active_key(tenant, KeyPurpose.RANDOMIZED).tenant_id == tenant


def test_keyring_allows_one_active_key(mariadb_keyring: Keyring, mariadb_engine: sa.Engine) -> None:
    key = mariadb_keyring.active_key(TENANT, KeyPurpose.RANDOMIZED)
    table = mariadb_keyring.table
    with mariadb_engine.connect() as conn:
        row = conn.execute(sa.select(table).where(table.c.key_id == key.key_id)).mappings().one()
    copy = {k: v for k, v in row.items() if k in table.c}
    copy.update(key_id=uuid.uuid4(), key_version=2)
    with pytest.raises(sa.exc.IntegrityError, match="one_active"):
        with mariadb_engine.begin() as conn:
            conn.execute(table.insert(), [copy])
    copy["state"] = "decrypt_only"
    with mariadb_engine.begin() as conn:
        conn.execute(table.insert(), [copy])


def test_keyring_lifecycle(mariadb_keyring: Keyring, mariadb_engine: sa.Engine) -> None:
    Base.metadata.create_all(mariadb_engine)
    _add(mariadb_engine, 1, "ann@example.test")
    mariadb_keyring.rotate(TENANT, activate_now=True)
    _add(mariadb_engine, 2, "bob@example.test")

    counts = mariadb_keyring.sealed_counts(TENANT)
    assert counts is not None
    randomized = [
        k for k in mariadb_keyring.list_keys(TENANT) if k.purpose is KeyPurpose.RANDOMIZED
    ]
    assert sorted(k.version for k in randomized) == [1, 2]
    assert all(counts[k.key_id] >= 2 for k in randomized)

    with tenant_scope(TENANT), Session(mariadb_engine) as session:
        assert session.get(Account, 1).name == "Name 1"  # type: ignore[union-attr]
        assert session.get(Account, 2).name == "Name 2"  # type: ignore[union-attr]
    assert mariadb_keyring.shred(TENANT) == 4
    with tenant_scope(TENANT), Session(mariadb_engine) as session:
        with pytest.raises(KeyDestroyedError, match=TENANT):
            session.get(Account, 1)


# -- Alembic -------------------------------------------------------------------------


def test_autogenerate_keeps_keyring_table(
    mariadb_engine: sa.Engine, tmp_path: Path, keyring: InMemoryKeyring
) -> None:
    env = AlembicEnv(tmp_path / "migrations", mariadb_engine)
    env.write_revision("k1", None, "op.create_keyring_table()", "op.drop_keyring_table()")
    env.upgrade("k1")
    assert "active_slot" in {
        c["name"] for c in sa.inspect(mariadb_engine).get_columns("encryption_keys")
    }
    env.target_metadata = Base.metadata

    source = env.autogenerate("a1").read_text()

    assert "encryption_keys" not in source
    assert "op.create_table('accounts'" in source
    env.upgrade("head")
    assert "drop_table" not in env.autogenerate("a2").read_text()


def test_conversion_raises_before_writing(
    mariadb_engine: sa.Engine, tmp_path: Path, keyring: InMemoryKeyring
) -> None:
    with mariadb_engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE people (id INTEGER PRIMARY KEY, name VARCHAR(100))")
        conn.exec_driver_sql("INSERT INTO people VALUES (1, 'Ann')")
    env = AlembicEnv(tmp_path / "migrations", mariadb_engine)
    env.write_revision(
        "e1",
        None,
        "op.encrypt_column('people', 'name', type_=sqlalchemy_encrypted.Encrypted(sa.String(100)), "
        "tenant_id='t-acme')",
        "pass",
    )

    with pytest.raises(MigrationError, match="supports PostgreSQL and SQLite, not mysql"):
        env.upgrade("e1")

    with mariadb_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT name FROM people").scalar_one() == "Ann"


def test_bound_lookup_on_column_of_other_collation(
    mariadb_engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    # A base64 column made by hand, with the server's default collation.
    with mariadb_engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE legacy (id INTEGER PRIMARY KEY, code VARCHAR(100) "
            "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci)"
        )
    legacy = sa.Table(
        "legacy",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("code", DeterministicEncrypted(sa.String(40), storage="base64")),
    )
    with tenant_scope(TENANT), mariadb_engine.begin() as conn:
        conn.execute(legacy.insert(), [{"id": 1, "code": "A-1"}, {"id": 2, "code": "B-2"}])
        statement = sa.select(legacy.c.id).where(legacy.c.code == sa.bindparam("c"))
        assert _ids(conn, statement, {"c": "B-2"}) == [2]
        assert _ids(conn, sa.select(legacy.c.id).where(legacy.c.code == "A-1")) == [1]


def test_positional_driver_binds_slices_directly(keyring: InMemoryKeyring) -> None:
    # mysqlclient binds positionally; MySQL names the columns of a VALUES
    # list differently from SQLite and PostgreSQL, so no VALUES list is used.
    dialect = mysql.dialect(paramstyle="format")
    statement = sa.select(Account.id).where(Account.email == sa.bindparam("e"))

    sql = str(statement.compile(dialect=dialect))

    assert "VALUES" not in sql
    assert sql.count("substr(") == 4


def test_keyring_table_of_older_version(
    mariadb_keyring: Keyring, mariadb_engine: sa.Engine
) -> None:
    # Earlier versions made tenant_id a VARCHAR with the server's collation.
    table = mariadb_keyring.table.fullname
    with mariadb_engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {table} MODIFY tenant_id VARCHAR(255) NOT NULL")
    mariadb_keyring.active_key("Acme", KeyPurpose.RANDOMIZED)

    with pytest.raises(ConfigurationError, match="for tenant 'acme '"):
        mariadb_keyring.active_key("acme ", KeyPurpose.RANDOMIZED)

    with mariadb_engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {table} MODIFY tenant_id VARBINARY(1020) NOT NULL")
    acme = mariadb_keyring.active_key("acme ", KeyPurpose.RANDOMIZED)
    assert acme.tenant_id == "acme "
    assert mariadb_keyring.active_key("Acme", KeyPurpose.RANDOMIZED).key_id != acme.key_id
