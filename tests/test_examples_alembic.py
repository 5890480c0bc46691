"""The Alembic adoption example, run with the alembic command on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from examples.alembic_adoption.models import Customer
from examples.alembic_adoption.seed import rows as seed_rows
from examples.alembic_adoption.seed import seed
from sqlalchemy_encrypted import tenant_scope
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.pytest_plugin import assert_encrypted_at_rest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "alembic_adoption"
ENCRYPTED = ["name", "email", "phone", "birth_date"]


def subprocess_url(engine: sa.Engine) -> str:
    """Return a URL a separate process can use to reach the test's database and schema."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as connection:
            schema = connection.exec_driver_sql("SHOW search_path").scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


class AlembicCommand:
    """The example's alembic command, run in a separate process."""

    def __init__(self, engine: sa.Engine, key_file: Path) -> None:
        self.key_file = key_file
        self.environment = {
            **os.environ,
            "SQLALCHEMY_ENCRYPTED_URL": subprocess_url(engine),
            "SQLALCHEMY_ENCRYPTED_KMS": f"local://{key_file}",
        }

    def __call__(self, *args: str) -> str:
        """Run ``alembic ARGS``; return its log output (stderr)."""
        result = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(EXAMPLE / "alembic.ini"), *args],
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stderr


@pytest.fixture
def alembic(engine: sa.Engine, tmp_path: Path) -> AlembicCommand:
    key_file = tmp_path / "master.key"
    LocalKms.create(key_file)
    return AlembicCommand(engine, key_file)


def plaintext_rows(engine: sa.Engine) -> list[dict[str, object]]:
    customers = sa.table(
        "customers",
        *(sa.column(name) for name in ["id", "tenant_id", "name", "email", "phone"]),
        sa.column("birth_date", sa.Date),
    )
    with engine.connect() as connection:
        result = connection.execute(sa.select(customers).order_by(customers.c.id))
        return [dict(row._mapping) for row in result]


def expected_plaintext() -> list[dict[str, object]]:
    return [{key: row[key] for key in ["id", "tenant_id", *ENCRYPTED]} for row in seed_rows()]


def test_upgrade_encrypts_in_place(engine: sa.Engine, alembic: AlembicCommand) -> None:
    alembic("upgrade", "0001")
    seed(engine)

    log = alembic("upgrade", "head")

    assert "customers.name: encrypted 6, already encrypted 0, NULL 0" in log
    assert "customers.phone: encrypted 4, already encrypted 0, NULL 2" in log
    with engine.connect() as connection:
        for name in ENCRYPTED:
            column = Customer.__table__.c[name]
            plaintexts = [str(row[name]) for row in seed_rows() if row[name] is not None]
            assert len(assert_encrypted_at_rest(connection, column, plaintexts)) > 0
    indexes = {index["name"]: index for index in sa.inspect(engine).get_indexes("customers")}
    assert indexes["uq_customers_tenant_email"]["unique"]
    assert indexes["uq_customers_tenant_email"]["column_names"] == ["tenant_id", "email"]
    check_application_reads(engine, alembic.key_file)


def check_application_reads(engine: sa.Engine, key_file: Path) -> None:
    """Read the encrypted rows through the application's model, as the application does."""
    Keyring(engine, LocalKms(key_file))

    with Session(engine) as session:
        customers = session.scalars(sa.select(Customer).order_by(Customer.id)).all()
        read = [
            {key: getattr(c, key) for key in ["id", "tenant_id", *ENCRYPTED]} for c in customers
        ]
        assert read == expected_plaintext()
        for tenant, expected_id in [("harbor-books", 1), ("kite-travel", 6)]:
            with tenant_scope(tenant):
                query = sa.select(Customer.id).where(Customer.email == "mara.quint@example.test")
                assert session.scalars(query).all() == [expected_id]

        with tenant_scope("kite-travel"):
            session.add(
                Customer(
                    tenant_id="kite-travel",
                    name="Someone Else",
                    email="jonas.feld@example.test",
                    signed_up_at=customers[0].signed_up_at,
                )
            )
            with pytest.raises(sa.exc.IntegrityError):
                session.commit()


def test_downgrade_restores_plaintext(engine: sa.Engine, alembic: AlembicCommand) -> None:
    alembic("upgrade", "0001")
    seed(engine)
    alembic("upgrade", "head")

    log = alembic("downgrade", "0002")

    assert "customers.birth_date: decrypted 5, already plaintext 0, NULL 1" in log
    assert plaintext_rows(engine) == expected_plaintext()
    assert "encryption_keys" in sa.inspect(engine).get_table_names()

    alembic("downgrade", "0001")

    assert "encryption_keys" not in sa.inspect(engine).get_table_names()
