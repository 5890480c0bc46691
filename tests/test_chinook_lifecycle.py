"""The whole lifecycle on the Chinook sample database, loaded into PostgreSQL.

The personal columns of ``customer`` and ``employee`` are encrypted in place
with the Alembic operations, each row under the keys of its ``country``.
Then: lookups by encrypted email, a rotation of every tenant, re-encryption,
a clean census, and the crypto-shredding of one country, after which every
value of the other countries still equals the original data.

The Chinook files are not part of the repository. The test looks for them
in ``SQLALCHEMY_ENCRYPTED_CHINOOK_DIR``, else in ``shared/data/chinook``
beside the repository, and skips when they are absent.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import alembic_ext  # noqa: F401  (registers op.encrypt_column and the others)
from sqlalchemy_encrypted import (
    DeterministicEncrypted,
    Encrypted,
    StoredKeyDestroyedError,
    tenant_scope,
)
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.pytest_plugin import assert_encrypted_at_rest
from sqlalchemy_encrypted.rotation import census, reencrypt

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_NAME = "Chinook_PostgreSql.sql"
SHREDDED = "France"

# (column, plaintext type, encrypted type) per table, as declared in the script.
CUSTOMER_COLUMNS: list[tuple[str, sa.types.TypeEngine[Any], Any]] = [
    ("first_name", sa.String(40), Encrypted(sa.String(40))),
    ("last_name", sa.String(20), Encrypted(sa.String(20))),
    ("address", sa.String(70), Encrypted(sa.String(70))),
    ("city", sa.String(40), Encrypted(sa.String(40))),
    ("state", sa.String(40), Encrypted(sa.String(40))),
    ("postal_code", sa.String(10), Encrypted(sa.String(10))),
    ("phone", sa.String(24), Encrypted(sa.String(24))),
    ("fax", sa.String(24), Encrypted(sa.String(24))),
    ("email", sa.String(60), DeterministicEncrypted(sa.String(60))),
]
EMPLOYEE_COLUMNS: list[tuple[str, sa.types.TypeEngine[Any], Any]] = [
    ("first_name", sa.String(20), Encrypted(sa.String(20))),
    ("last_name", sa.String(20), Encrypted(sa.String(20))),
    ("birth_date", sa.DateTime(), Encrypted(sa.DateTime())),
    ("address", sa.String(70), Encrypted(sa.String(70))),
    ("city", sa.String(40), Encrypted(sa.String(40))),
    ("state", sa.String(40), Encrypted(sa.String(40))),
    ("postal_code", sa.String(10), Encrypted(sa.String(10))),
    ("phone", sa.String(24), Encrypted(sa.String(24))),
    ("fax", sa.String(24), Encrypted(sa.String(24))),
    ("email", sa.String(60), DeterministicEncrypted(sa.String(60))),
]


def chinook_dir() -> Path:
    configured = os.environ.get("SQLALCHEMY_ENCRYPTED_CHINOOK_DIR")
    if configured:
        return Path(configured)
    return ROOT.parent / "shared" / "data" / "chinook"


def load_script() -> str:
    """Return the PostgreSQL script without its psql-only database switch."""
    path = chinook_dir() / SCRIPT_NAME
    if not path.is_file():
        pytest.skip(
            f"the Chinook sample database is absent: {path} not found; set "
            "SQLALCHEMY_ENCRYPTED_CHINOOK_DIR to the folder holding " + SCRIPT_NAME
        )
    script = path.read_text(encoding="utf-8")
    # The script first recreates a database "chinook" and connects to it with
    # psql's \c command. The tables go into the test's schema instead.
    marker = "\\c chinook;"
    assert marker in script, f"{path} is not the expected Chinook script"
    return script.split(marker, 1)[1]


# -- the application's models after the migration ---------------------------------


def mapped(encrypted_type: Any) -> Any:
    return mapped_column(encrypted_type.copy())


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customer"
    __table_args__ = {"info": {"tenant_column": "country"}}  # noqa: RUF012

    customer_id: Mapped[int] = mapped_column(primary_key=True)
    first_name: Mapped[str] = mapped(CUSTOMER_COLUMNS[0][2])
    last_name: Mapped[str] = mapped(CUSTOMER_COLUMNS[1][2])
    company: Mapped[str | None] = mapped_column(sa.String(80))
    address: Mapped[str | None] = mapped(CUSTOMER_COLUMNS[2][2])
    city: Mapped[str | None] = mapped(CUSTOMER_COLUMNS[3][2])
    state: Mapped[str | None] = mapped(CUSTOMER_COLUMNS[4][2])
    country: Mapped[str] = mapped_column(sa.String(40))
    postal_code: Mapped[str | None] = mapped(CUSTOMER_COLUMNS[5][2])
    phone: Mapped[str | None] = mapped(CUSTOMER_COLUMNS[6][2])
    fax: Mapped[str | None] = mapped(CUSTOMER_COLUMNS[7][2])
    email: Mapped[str] = mapped(CUSTOMER_COLUMNS[8][2])
    support_rep_id: Mapped[int | None]


class Employee(Base):
    __tablename__ = "employee"
    __table_args__ = {"info": {"tenant_column": "country"}}  # noqa: RUF012

    employee_id: Mapped[int] = mapped_column(primary_key=True)
    last_name: Mapped[str] = mapped(EMPLOYEE_COLUMNS[1][2])
    first_name: Mapped[str] = mapped(EMPLOYEE_COLUMNS[0][2])
    title: Mapped[str | None] = mapped_column(sa.String(30))
    reports_to: Mapped[int | None]
    birth_date: Mapped[datetime.datetime | None] = mapped(EMPLOYEE_COLUMNS[2][2])
    hire_date: Mapped[datetime.datetime | None]
    address: Mapped[str | None] = mapped(EMPLOYEE_COLUMNS[3][2])
    city: Mapped[str | None] = mapped(EMPLOYEE_COLUMNS[4][2])
    state: Mapped[str | None] = mapped(EMPLOYEE_COLUMNS[5][2])
    country: Mapped[str] = mapped_column(sa.String(40))
    postal_code: Mapped[str | None] = mapped(EMPLOYEE_COLUMNS[6][2])
    phone: Mapped[str | None] = mapped(EMPLOYEE_COLUMNS[7][2])
    fax: Mapped[str | None] = mapped(EMPLOYEE_COLUMNS[8][2])
    email: Mapped[str | None] = mapped(EMPLOYEE_COLUMNS[9][2])


MODELS: dict[str, tuple[type[Base], str]] = {
    "customer": (Customer, "customer_id"),
    "employee": (Employee, "employee_id"),
}


# -- helpers -------------------------------------------------------------------------


def snapshot(engine: sa.Engine) -> dict[str, dict[int, dict[str, Any]]]:
    """Read every row of both tables, as the database returns them, by primary key."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    with engine.connect() as connection:
        for table, (_, key) in MODELS.items():
            result = connection.exec_driver_sql(f"SELECT * FROM {table}")
            rows[table] = {row._mapping[key]: dict(row._mapping) for row in result}
    return rows


def as_dict(obj: Base) -> dict[str, Any]:
    return {column.name: getattr(obj, column.key) for column in obj.__table__.columns}


def same_value(actual: Any, expected: Any) -> bool:
    """Compare exactly: equal type, and equal UTF-8 bytes for strings."""
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, str):
        return bool(actual.encode("utf-8") == expected.encode("utf-8"))
    return bool(actual == expected)


def encrypt_columns(engine: sa.Engine) -> None:
    """Run the migration that adopts encryption, through the Alembic operations."""
    with engine.connect() as connection:
        operations = Operations(MigrationContext.configure(connection))
        operations.create_keyring_table()  # type: ignore[attr-defined]
        connection.commit()
        for table, columns in [("customer", CUSTOMER_COLUMNS), ("employee", EMPLOYEE_COLUMNS)]:
            for column, plaintext_type, encrypted_type in columns:
                operations.encrypt_column(  # type: ignore[attr-defined]
                    table,
                    column,
                    type_=encrypted_type,
                    existing_type=plaintext_type,
                    tenant_column="country",
                )
                connection.commit()


@pytest.fixture
def chinook(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[sa.Engine, Keyring]]:
    # Checked first, so that an absent folder skips without starting PostgreSQL.
    script = load_script()
    pg_engine: sa.Engine = request.getfixturevalue("pg_engine")
    raw = pg_engine.raw_connection()
    try:
        with raw.cursor() as cursor:
            cursor.execute(script)
        raw.commit()
    finally:
        raw.close()
    keyring = Keyring(pg_engine, LocalKms.create(tmp_path / "master.key"))
    yield pg_engine, keyring


# -- the lifecycle -------------------------------------------------------------------


def test_chinook_full_lifecycle(chinook: tuple[sa.Engine, Keyring]) -> None:
    engine, keyring = chinook
    original = snapshot(engine)
    assert len(original["customer"]) == 59
    assert len(original["employee"]) == 8
    countries = sorted({row["country"] for rows in original.values() for row in rows.values()})

    # Encrypt in place; the stored bytes hold no plaintext afterwards.
    encrypt_columns(engine)
    with engine.connect() as connection:
        for table, columns in [("customer", CUSTOMER_COLUMNS), ("employee", EMPLOYEE_COLUMNS)]:
            model = MODELS[table][0]
            for column, _, _ in columns:
                plaintexts = [
                    row[column]
                    for row in original[table].values()
                    if isinstance(row[column], str) and len(row[column]) >= 4
                ]
                assert_encrypted_at_rest(connection, model.__table__.c[column], plaintexts)
    assert {info.tenant_id for info in keyring.list_keys()} == set(countries)

    # Every customer is found by email within its country.
    with Session(engine) as session:
        for customer_id, row in original["customer"].items():
            with tenant_scope(row["country"]):
                query = sa.select(Customer.customer_id).where(Customer.email == row["email"])
                assert session.scalars(query).all() == [customer_id]

    # Rotate every tenant, re-encrypt, and the census is clean.
    for country in countries:
        keyring.rotate(country, activate_now=True)
    result = reencrypt(engine, Base.metadata)
    result.raise_for_failures()
    after = census(engine, Base.metadata)
    assert after.stale_total == 0
    assert {entry.key_version for entry in after} == {2}
    assert result.values_reencrypted == sum(entry.count for entry in after)

    # Lookups still work after the rotation.
    with Session(engine) as session, tenant_scope("Brazil"):
        query = sa.select(Customer.customer_id).where(Customer.email == "luisg@embraer.com.br")
        assert session.scalars(query).all() == [1]

    # Shred one country: its rows cannot be read, every other value is unchanged.
    keyring.shred(SHREDDED)
    checked = 0
    with Session(engine) as session:
        for table, (model, _) in MODELS.items():
            for primary_key, row in original[table].items():
                session.expunge_all()
                if row["country"] == SHREDDED:
                    with pytest.raises(StoredKeyDestroyedError):
                        session.get(model, primary_key)
                    continue
                obj = session.get(model, primary_key)
                assert obj is not None
                current = as_dict(obj)
                assert list(current) == list(row)
                for name, value in row.items():
                    assert same_value(current[name], value), f"{table} {primary_key} {name}"
                    checked += 1
    shredded_rows = sum(
        row["country"] == SHREDDED for rows in original.values() for row in rows.values()
    )
    assert shredded_rows == 5
    assert checked == (59 - 5) * 13 + 8 * 15
