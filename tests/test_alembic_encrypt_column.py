"""op.encrypt_column and op.decrypt_column on populated tables, through real Alembic runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.orm import Session

import alembic_ext
from sqlalchemy_encrypted import (
    ConfigurationError,
    Encrypted,
    MigrationError,
    TenantContextError,
    set_default_tenant,
    tenant_scope,
)
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .alembic_env import AlembicEnv
from .models import Person

CREATE_PERSONS = """
op.create_table(
    "persons",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.String(40)),
    sa.Column("name", sa.String(100)),
    sa.Column("email", sa.String(254)),
)
op.create_index("ix_persons_email", "persons", ["email"])
"""

ENCRYPT_PERSONS = """
reports = op.get_context().config.attributes["reports"]
reports.append(op.encrypt_column(
    "persons", "name",
    type_=sqlalchemy_encrypted.Encrypted(sa.String(100)),
    existing_type=sa.String(100),
    tenant_column="tenant_id",
    batch_size=7,
))
reports.append(op.encrypt_column(
    "persons", "email",
    type_=sqlalchemy_encrypted.DeterministicEncrypted(sa.String(254)),
    existing_type=sa.String(254),
    tenant_column="tenant_id",
    batch_size=7,
))
"""

DECRYPT_PERSONS = """
reports = op.get_context().config.attributes["reports"]
reports.append(op.decrypt_column(
    "persons", "email",
    type_=sa.String(254),
    from_type=sqlalchemy_encrypted.DeterministicEncrypted(sa.String(254)),
    tenant_column="tenant_id",
    batch_size=7,
))
reports.append(op.decrypt_column(
    "persons", "name",
    type_=sa.String(100),
    from_type=sqlalchemy_encrypted.Encrypted(sa.String(100)),
    tenant_column="tenant_id",
    batch_size=7,
))
"""


def plain_rows(count: int) -> list[dict[str, Any]]:
    """Rows of two tenants with some NULL names and emails."""
    return [
        {
            "id": i,
            "tenant_id": "t-acme" if i % 2 else "t-globex",
            "name": None if i % 10 == 0 else f"Person {i} \u00e9",
            "email": None if i % 15 == 0 else f"user{i}@example.test",
        }
        for i in range(1, count + 1)
    ]


def seed(engine: sa.Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO persons (id, tenant_id, name, email) "
                "VALUES (:id, :tenant_id, :name, :email)"
            ),
            rows,
        )


def raw_rows(engine: sa.Engine, columns: str = "id, name, email") -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        result = conn.exec_driver_sql(f"SELECT {columns} FROM persons ORDER BY id")
        return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in result]


def read_people(engine: sa.Engine) -> list[tuple[str | None, str | None]]:
    """Return (name, email) of every person in id order, decrypted through the model."""
    with Session(engine) as session:
        people = session.scalars(sa.select(Person).order_by(Person.id)).all()
        return [(person.name, person.email) for person in people]


def column_names(engine: sa.Engine, table: str = "persons") -> list[str]:
    return [c["name"] for c in sa.inspect(engine).get_columns(table)]


def column_type(engine: sa.Engine, column: str, table: str = "persons") -> Any:
    (found,) = [c for c in sa.inspect(engine).get_columns(table) if c["name"] == column]
    return found


@pytest.fixture
def env(tmp_path: Path, engine: sa.Engine) -> AlembicEnv:
    alembic_env = AlembicEnv(tmp_path / "migrations", engine)
    alembic_env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    alembic_env.write_revision("r2", "r1", ENCRYPT_PERSONS, DECRYPT_PERSONS)
    return alembic_env


def test_encrypt_populated_column(
    env: AlembicEnv, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    env.upgrade("r1")
    rows = plain_rows(40)
    seed(engine, rows)

    env.upgrade("head")

    assert env.current() == "r2"
    for (_, name, email), row in zip(raw_rows(engine), rows, strict=True):
        assert (name is None) == (row["name"] is None)
        assert (email is None) == (row["email"] is None)
        if name is not None:
            assert name[0] == 0x01
            assert row["name"].encode() not in name
        if email is not None:
            assert row["email"].encode() not in email
    assert isinstance(column_type(engine, "name")["type"], sa.LargeBinary)
    assert isinstance(column_type(engine, "email")["type"], sa.LargeBinary)
    assert column_names(engine) == ["id", "tenant_id", "name", "email"]
    indexes = sa.inspect(engine).get_indexes("persons")
    assert [(i["name"], i["column_names"]) for i in indexes] == [("ix_persons_email", ["email"])]

    name_report, email_report = env.reports
    assert (name_report.converted, name_report.already_converted, name_report.null) == (36, 0, 4)
    assert (email_report.converted, email_report.already_converted, email_report.null) == (
        38,
        0,
        2,
    )
    assert str(name_report) == "persons.name: encrypted 36, already encrypted 0, NULL 4"

    with Session(engine) as session:
        people = session.scalars(sa.select(Person).order_by(Person.id)).all()
        assert [p.name for p in people] == [r["name"] for r in rows]
        assert [p.email for p in people] == [r["email"] for r in rows]
        with tenant_scope("t-acme"):
            query = sa.select(Person).where(Person.email == "user7@example.test")
            assert session.scalars(query).one().id == 7


def test_one_transaction_for_all_migrations(
    env: AlembicEnv, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    # Alembic's default: every migration of the run in one transaction. The
    # table created by r1 is committed before r2 encrypts it.
    env.configure_options = {"transaction_per_migration": False}
    env.write_revision(
        "r1",
        None,
        CREATE_PERSONS + "\nop.execute(\"INSERT INTO persons VALUES (1, 't', 'a', NULL)\")",
    )

    env.upgrade("head")

    assert env.current() == "r2"
    with Session(engine) as session:
        assert session.get(Person, 1).name == "a"


def test_values_sealed_under_row_tenant(
    env: AlembicEnv, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    env.upgrade("r1")
    seed(engine, plain_rows(6))
    env.upgrade("head")

    name_type = Person.__table__.c.name.type
    for row_id, name, _ in raw_rows(engine):
        tenant = "t-acme" if row_id % 2 else "t-globex"
        key = keyring.key_by_id(sa_uuid(name))
        assert key.tenant_id == tenant
        with tenant_scope(tenant):
            assert name_type.decrypt(name) == f"Person {row_id} \u00e9"


def sa_uuid(envelope: bytes) -> Any:
    from sqlalchemy_encrypted import parse_header

    return parse_header(envelope).key_id


def test_downgrade_restores_plaintext(
    env: AlembicEnv, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    env.upgrade("r1")
    rows = plain_rows(40)
    seed(engine, rows)
    env.upgrade("head")

    env.downgrade("r1")

    assert env.current() == "r1"
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]
    assert isinstance(column_type(engine, "name")["type"], sa.String)
    assert column_type(engine, "email")["type"].length == 254
    indexes = sa.inspect(engine).get_indexes("persons")
    assert [(i["name"], i["column_names"]) for i in indexes] == [("ix_persons_email", ["email"])]
    email_report, name_report = env.reports[2:]
    assert str(name_report) == "persons.name: decrypted 36, already plaintext 0, NULL 4"
    assert (email_report.converted, email_report.null) == (38, 2)


def test_encrypt_again_is_noop(
    env: AlembicEnv, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    env.upgrade("r1")
    seed(engine, plain_rows(12))
    env.upgrade("head")
    before = raw_rows(engine)
    env.write_revision("r3", "r2", ENCRYPT_PERSONS)

    env.upgrade("head")

    assert raw_rows(engine) == before
    name_report = env.reports[-2]
    assert (name_report.converted, name_report.already_converted, name_report.null) == (0, 11, 1)
    assert name_report.column_swapped is False


def test_keeps_not_null_comment_and_indexes(
    tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision(
        "r1",
        None,
        """
        op.create_table(
            "accounts",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("tenant_id", sa.String(40), nullable=False),
            sa.Column("iban", sa.String(34), nullable=False, comment="bank account"),
            sa.Column("note", sa.Text),
        )
        op.create_index("ix_accounts_iban", "accounts", ["iban"], unique=True)
        op.create_index("ix_accounts_tenant_iban", "accounts", ["tenant_id", "iban"])
        op.create_index("ix_accounts_tenant", "accounts", ["tenant_id"])
        """,
    )
    env.write_revision(
        "r2",
        "r1",
        """
        op.encrypt_column(
            "accounts", "iban",
            type_=sqlalchemy_encrypted.DeterministicEncrypted(sa.String(34)),
            tenant_column="tenant_id",
        )
        """,
    )
    env.upgrade("r1")
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO accounts (id, tenant_id, iban) VALUES (:id, :t, :iban)"),
            [{"id": i, "t": "t1", "iban": f"DE{i:020d}"} for i in range(1, 21)],
        )

    env.upgrade("head")

    iban = column_type(engine, "iban", "accounts")
    assert iban["nullable"] is False
    if engine.dialect.name == "postgresql":
        assert isinstance(iban["type"], sa.LargeBinary)
        assert iban["comment"] == "bank account"
    else:
        # SQLite cannot add NOT NULL to a column, so the envelopes were
        # written back into the column, which keeps its declared type.
        assert isinstance(iban["type"], sa.String)
        with engine.connect() as conn:
            stored = conn.exec_driver_sql("SELECT DISTINCT typeof(iban) FROM accounts").all()
        assert stored == [("blob",)]
    indexes = {
        i["name"]: (i["column_names"], bool(i["unique"]))
        for i in sa.inspect(engine).get_indexes("accounts")
    }
    assert indexes == {
        "ix_accounts_iban": (["iban"], True),
        "ix_accounts_tenant_iban": (["tenant_id", "iban"], False),
        "ix_accounts_tenant": (["tenant_id"], False),
    }
    with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(sa.text("INSERT INTO accounts (id, tenant_id, iban) VALUES (99, 't1', NULL)"))


def _operations(conn: sa.Connection) -> Operations:
    return Operations(MigrationContext.configure(connection=conn))


def _plain_table(engine: sa.Engine, *, primary_key: bool = True) -> None:
    with engine.begin() as conn:
        if primary_key:
            conn.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body VARCHAR(200))")
        else:
            conn.exec_driver_sql("CREATE TABLE notes (id INTEGER NOT NULL, body VARCHAR(200))")
        conn.execute(
            sa.text("INSERT INTO notes (id, body) VALUES (:id, :body)"),
            [{"id": i, "body": f"note {i}"} for i in range(1, 11)],
        )


def test_fixed_tenant_id(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    _plain_table(engine)
    with engine.connect() as conn:
        report = _operations(conn).encrypt_column(
            "notes", "body", type_=Encrypted(sa.String(200)), tenant_id="t-solo"
        )
        conn.commit()
    assert report.converted == 10
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT body FROM notes ORDER BY id").scalars().all()
    assert {keyring.key_by_id(sa_uuid(bytes(v))).tenant_id for v in stored} == {"t-solo"}


def test_default_tenant_used_without_tenant_options(
    engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    _plain_table(engine)
    set_default_tenant("t-default")
    with engine.connect() as conn:
        _operations(conn).encrypt_column("notes", "body", type_=Encrypted(sa.String(200)))
        conn.commit()
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT body FROM notes").scalars().first()
    assert keyring.key_by_id(sa_uuid(bytes(stored))).tenant_id == "t-default"


def test_no_tenant_raises_before_writing(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    _plain_table(engine)
    with engine.connect() as conn:
        with pytest.raises(TenantContextError, match="no tenant is set") as caught:
            _operations(conn).encrypt_column("notes", "body", type_=Encrypted(sa.String(200)))
        conn.rollback()
    assert column_names(engine, "notes") == ["id", "body"]

    message = str(caught.value)
    assert "notes.body" in message
    assert "pass tenant_id= to the operation" in message
    assert "tenant_column=" in message
    assert "set_default_tenant()" in message
    assert "tenant_scope(tenant_id)" in message


def test_table_without_primary_key(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    _plain_table(engine, primary_key=False)
    with engine.connect() as conn:
        operations = _operations(conn)
        with pytest.raises(MigrationError, match="has no primary key: pass primary_key"):
            operations.encrypt_column(
                "notes", "body", type_=Encrypted(sa.String(200)), tenant_id="t1"
            )
        conn.rollback()
        report = operations.encrypt_column(
            "notes",
            "body",
            type_=Encrypted(sa.String(200)),
            tenant_id="t1",
            primary_key=["id"],
            batch_size=3,
        )
        conn.commit()
    assert report.converted == 10


def test_composite_primary_key(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE lines (doc INTEGER, line INTEGER, body VARCHAR(50), "
            "PRIMARY KEY (doc, line))"
        )
        conn.execute(
            sa.text("INSERT INTO lines VALUES (:doc, :line, :body)"),
            [{"doc": d, "line": n, "body": f"{d}-{n}"} for d in range(1, 5) for n in range(1, 6)],
        )
    body_type = Encrypted(sa.String(50))
    with engine.connect() as conn:
        report = _operations(conn).encrypt_column(
            "lines", "body", type_=body_type, tenant_id="t1", batch_size=3
        )
        conn.commit()
    assert report.converted == 20
    table = sa.Table(
        "lines",
        sa.MetaData(),
        sa.Column("doc", sa.Integer, primary_key=True),
        sa.Column("line", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(50))),
    )
    with engine.connect() as conn:
        values = conn.execute(sa.select(table.c.doc, table.c.line, table.c.body)).all()
    assert sorted(values) == sorted((d, n, f"{d}-{n}") for d in range(1, 5) for n in range(1, 6))


def test_rejects_wrong_argument_types(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    _plain_table(engine)
    with engine.connect() as conn:
        operations = _operations(conn)
        with pytest.raises(ConfigurationError, match="must be an encrypted type instance"):
            operations.encrypt_column("notes", "body", type_=sa.String(200), tenant_id="t1")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="invalid batch_size 0"):
            operations.encrypt_column(
                "notes", "body", type_=Encrypted(sa.String(200)), tenant_id="t1", batch_size=0
            )
        with pytest.raises(MigrationError, match="has no column 'missing'"):
            operations.encrypt_column(
                "notes", "missing", type_=Encrypted(sa.String(200)), tenant_id="t1"
            )
        with pytest.raises(MigrationError, match="part of the primary key"):
            operations.encrypt_column("notes", "id", type_=Encrypted(sa.Integer()), tenant_id="t1")


def test_offline_mode_fails_clearly(env: AlembicEnv, keyring: InMemoryKeyring) -> None:
    with pytest.raises(MigrationError, match=r"offline \(--sql\) mode.*Run this migration online"):
        env.upgrade("r1:r2", sql=True)


def test_ops_registered_on_op() -> None:
    for name in ("encrypt_column", "decrypt_column", "create_keyring_table", "drop_keyring_table"):
        assert hasattr(Operations, name), name
    assert alembic_ext.EncryptColumnOp.reverse is not None
