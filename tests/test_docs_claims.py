"""Statements of the concepts and threat model pages, checked on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import decimal
import logging
import zoneinfo
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from examples.flask_app.models import Base as ClinicBase
from examples.flask_app.models import Patient
from sqlalchemy_encrypted import (
    ConfigurationError,
    DecryptionError,
    DeterministicEncrypted,
    DuplicateValueError,
    Encrypted,
    TenantMismatchError,
    UnsupportedOperationError,
    tenant_scope,
)
from sqlalchemy_encrypted.rotation import install_unique_guard
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .models import Base, Person


@pytest.fixture
def contacts(engine: sa.Engine) -> sa.Table:
    """Two deterministic columns and one randomized column, tenant per row."""
    metadata = sa.MetaData()
    table = sa.Table(
        "contacts",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.String(40)),
        sa.Column("email", DeterministicEncrypted(sa.String(100))),
        sa.Column("backup_email", DeterministicEncrypted(sa.String(100))),
        sa.Column("note", Encrypted(sa.String(100))),
        sa.UniqueConstraint("tenant_id", "email"),
        info={"tenant_column": "tenant_id"},
    )
    metadata.create_all(engine)
    return table


def raw(engine: sa.Engine, table: str, column: str, row_id: int) -> bytes:
    with engine.connect() as connection:
        value = connection.execute(
            sa.text(f"SELECT {column} FROM {table} WHERE id = :id"), {"id": row_id}
        ).scalar_one()
    return bytes(value)


def insert(engine: sa.Engine, table: sa.Table, *rows: dict[str, object]) -> None:
    """Insert rows in one executemany; missing columns are NULL."""
    complete = [{column.key: row.get(column.key) for column in table.columns} for row in rows]
    with engine.begin() as connection:
        connection.execute(sa.insert(table), complete)


# -- concepts: which queries work -------------------------------------------


def test_deterministic_grouping_and_count(
    engine: sa.Engine, keyring: InMemoryKeyring, contacts: sa.Table
) -> None:
    insert(
        engine,
        contacts,
        {"id": 1, "tenant_id": "acme", "email": "a@example.test", "note": "x"},
        {"id": 2, "tenant_id": "acme", "email": "b@example.test", "note": "x"},
        {"id": 3, "tenant_id": "acme", "backup_email": "c@example.test", "note": "y"},
    )
    grouped = sa.select(contacts.c.email, sa.func.count()).group_by(contacts.c.email)
    distinct = sa.select(contacts.c.email).distinct()
    counted = sa.select(sa.func.count(contacts.c.note))

    with engine.connect() as connection:
        groups = connection.execute(grouped).all()
        distinct_values = connection.execute(distinct).scalars().all()
        note_count = connection.execute(counted).scalar_one()

    assert sorted(((email or ""), count) for email, count in groups) == [
        ("", 1),
        ("a@example.test", 1),
        ("b@example.test", 1),
    ]
    assert len(distinct_values) == 3
    assert note_count == 3


@pytest.mark.parametrize(
    "build",
    [
        lambda t: sa.select(t).where(t.c.email.like("a%")),
        lambda t: sa.select(t).where(t.c.email < "b"),
        lambda t: sa.select(t).where(t.c.note == "x"),
        lambda t: sa.select(t).where(t.c.note.contains("x")),
        lambda t: sa.select(t).where(t.c.email == t.c.backup_email),
        lambda t: sa.select(t).order_by(t.c.email),
        lambda t: sa.select(t.c.note).group_by(t.c.note),
        lambda t: sa.select(sa.func.lower(t.c.email)),
        lambda t: sa.select(sa.cast(t.c.note, sa.String)),
    ],
    ids=["like", "less", "random-eq", "contains", "column-eq", "order", "group", "func", "cast"],
)
def test_refused_queries_raise(
    engine: sa.Engine, keyring: InMemoryKeyring, contacts: sa.Table, build: object
) -> None:
    with engine.connect() as connection, pytest.raises(UnsupportedOperationError):
        connection.execute(build(contacts))  # type: ignore[operator]


def test_low_cardinality_needs_opt_in() -> None:
    with pytest.raises(ConfigurationError, match="allow_low_cardinality"):
        sa.Column("flag", DeterministicEncrypted(sa.Boolean, context="t.flag"))

    opted_in = DeterministicEncrypted(sa.Boolean, context="t.flag2", allow_low_cardinality=True)
    sa.Column("flag", opted_in)


# -- concepts: what a deterministic lookup treats as equal ------------------

UTC_NOON = dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC)
PLUS_ONE = dt.timezone(dt.timedelta(hours=1))

# (inner type, stored value, searched value, found): the table of the page.
EQUALITY_CASES = {
    "numeric scale": (sa.Numeric(10, 2), decimal.Decimal("1.5"), decimal.Decimal("1.50"), True),
    "numeric float": (sa.Numeric(10, 2), decimal.Decimal("1.50"), 1.5, True),
    "numeric rounded": (sa.Numeric(10, 2), decimal.Decimal("1.5"), decimal.Decimal("1.504"), True),
    "numeric zero": (sa.Numeric(10, 2), 0, decimal.Decimal("-0"), True),
    "float int": (sa.Float(), 2, 2.0, True),
    "float zero": (sa.Float(), 0.0, -0.0, False),
    "datetime offset": (
        sa.DateTime(timezone=True),
        UTC_NOON,
        dt.datetime(2024, 1, 1, 13, tzinfo=PLUS_ONE),
        False,
    ),
    "datetime zone": (
        sa.DateTime(timezone=True),
        UTC_NOON,
        UTC_NOON.replace(tzinfo=zoneinfo.ZoneInfo("UTC")),
        False,
    ),
    "string case": (sa.String(40), "Mara@example.test", "mara@example.test", False),
    "string form": (sa.String(40), "M\u00fcller", "Mu\u0308ller", False),
}


@pytest.mark.parametrize(
    "inner, stored, searched, found", EQUALITY_CASES.values(), ids=EQUALITY_CASES.keys()
)
def test_deterministic_equality_table(
    engine: sa.Engine, keyring: InMemoryKeyring, inner: Any, stored: Any, searched: Any, found: bool
) -> None:
    table = sa.Table(
        "equal_values",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", DeterministicEncrypted(inner), unique=True),
    )
    table.create(engine)
    with tenant_scope("acme"):
        with engine.begin() as connection:
            connection.execute(table.insert().values(id=1, value=stored))
        with engine.connect() as connection:
            query = sa.select(table.c.id).where(table.c.value == searched)
            assert list(connection.execute(query).scalars()) == ([1] if found else [])

        if found:
            with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
                connection.execute(table.insert().values(id=2, value=searched))
        else:
            with engine.begin() as connection:
                connection.execute(table.insert().values(id=2, value=searched))


# -- concepts: what the ciphertext reveals ----------------------------------


def test_equal_values_equal_bytes_per_tenant_and_column(
    engine: sa.Engine, keyring: InMemoryKeyring, contacts: sa.Table
) -> None:
    same = "same@example.test"
    insert(
        engine,
        contacts,
        {"id": 1, "tenant_id": "acme", "email": same, "backup_email": same},
        {"id": 2, "tenant_id": "acme", "email": "other@example.test", "backup_email": same},
        {"id": 3, "tenant_id": "globex", "email": same},
    )

    assert raw(engine, "contacts", "backup_email", 1) == raw(engine, "contacts", "backup_email", 2)
    assert raw(engine, "contacts", "email", 1) != raw(engine, "contacts", "backup_email", 1)
    assert raw(engine, "contacts", "email", 1) != raw(engine, "contacts", "email", 3)


def test_stored_length_follows_plaintext(
    engine: sa.Engine, keyring: InMemoryKeyring, contacts: sa.Table
) -> None:
    insert(
        engine,
        contacts,
        {"id": 1, "tenant_id": "acme", "note": "abc"},
        {"id": 2, "tenant_id": "acme", "note": "a" * 30},
    )

    short, long = raw(engine, "contacts", "note", 1), raw(engine, "contacts", "note", 2)

    assert len(long) - len(short) == 27


def test_unique_misses_duplicate_across_versions(
    engine: sa.Engine, keyring: InMemoryKeyring, contacts: sa.Table
) -> None:
    insert(engine, contacts, {"id": 1, "tenant_id": "acme", "email": "dup@example.test"})
    with pytest.raises(sa.exc.IntegrityError):
        insert(engine, contacts, {"id": 2, "tenant_id": "acme", "email": "dup@example.test"})

    keyring.rotate("acme")
    insert(engine, contacts, {"id": 3, "tenant_id": "acme", "email": "dup@example.test"})

    with tenant_scope("acme"), engine.connect() as connection:
        found = connection.execute(
            sa.select(contacts.c.id).where(contacts.c.email == "dup@example.test")
        )
        assert sorted(found.scalars()) == [1, 3]


def test_search_tokens_in_text_sql(
    engine: sa.Engine, keyring: InMemoryKeyring, contacts: sa.Table
) -> None:
    insert(engine, contacts, {"id": 1, "tenant_id": "acme", "email": "mara@example.test"})
    keyring.rotate("acme")
    insert(engine, contacts, {"id": 2, "tenant_id": "acme", "email": "mara@example.test"})
    email_type = contacts.c.email.type
    assert isinstance(email_type, DeterministicEncrypted)

    tokens = email_type.search_tokens("mara@example.test", tenant_id="acme")
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT id FROM contacts WHERE email IN :tokens").bindparams(
                sa.bindparam("tokens", expanding=True)
            ),
            {"tokens": tokens},
        )
        found = sorted(rows.scalars())

    assert len(tokens) == 2
    assert found == [1, 2]


# -- threat model: what binding does and does not catch ----------------------


def add_person(engine: sa.Engine, person_id: int, tenant: str, name: str) -> None:
    with Session(engine) as session:
        session.add(Person(id=person_id, tenant_id=tenant, name=name, email=f"{person_id}@e.test"))
        session.commit()


def overwrite(engine: sa.Engine, column: str, row_id: int, value: bytes) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text(f"UPDATE persons SET {column} = :value WHERE id = :id"),
            {"value": value, "id": row_id},
        )


def read_name(engine: sa.Engine, row_id: int) -> str | None:
    with Session(engine) as session:
        person = session.get(Person, row_id)
        assert person is not None
        return person.name


def test_swap_within_tenant_column_decrypts(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    Base.metadata.create_all(engine)
    add_person(engine, 1, "acme", "Alice Varga")
    add_person(engine, 2, "acme", "Bruno Stahl")

    overwrite(engine, "name", 2, raw(engine, "persons", "name", 1))

    assert read_name(engine, 2) == "Alice Varga"


def test_move_across_column_fails(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    Base.metadata.create_all(engine)
    add_person(engine, 1, "acme", "Alice Varga")
    add_person(engine, 2, "acme", "Carla Moss")

    overwrite(engine, "email", 2, raw(engine, "persons", "name", 1))

    with Session(engine) as session, pytest.raises(DecryptionError):
        session.get(Person, 2)


def test_move_across_tenant_caught_in_scope(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    Base.metadata.create_all(engine)
    add_person(engine, 1, "acme", "Alice Varga")
    add_person(engine, 2, "globex", "Bruno Stahl")

    overwrite(engine, "name", 2, raw(engine, "persons", "name", 1))

    with tenant_scope("globex"), pytest.raises(TenantMismatchError):
        read_name(engine, 2)
    # Outside a scope the value decrypts as what it is: a value of tenant acme.
    assert read_name(engine, 2) == "Alice Varga"


def test_scope_blocks_other_tenant_reads(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    Base.metadata.create_all(engine)
    add_person(engine, 1, "acme", "Alice Varga")

    with tenant_scope("globex"), pytest.raises(TenantMismatchError):
        read_name(engine, 1)
    assert read_name(engine, 1) == "Alice Varga"


def test_engine_log_shows_no_plaintext(
    engine: sa.Engine, keyring: InMemoryKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    Base.metadata.create_all(engine)
    engine.echo = True
    add_person(engine, 1, "acme", "Alice Varga")

    with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
        with pytest.raises(sa.exc.IntegrityError) as raised:
            add_person(engine, 1, "acme", "Secret Duplicate")
        read_name(engine, 1)

    assert "INSERT INTO persons" in caplog.text
    for plaintext in ["Alice", "Secret Duplicate", "1@e.test"]:
        assert plaintext not in caplog.text
        assert plaintext not in str(raised.value)


def test_unique_guard_catches_duplicate_across_versions(
    engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    ClinicBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Patient(clinic_id="north", name="Alice Varga", email="alice@example.test"))
        session.commit()
    keyring.rotate("north")

    with Session(engine) as session:
        install_unique_guard(session)
        session.add(Patient(clinic_id="north", name="Alice V.", email="alice@example.test"))
        with pytest.raises(DuplicateValueError):
            session.commit()


def test_function_in_update_where_raises(
    engine: sa.Engine, keyring: InMemoryKeyring, contacts: sa.Table
) -> None:
    statement = (
        sa.update(contacts).where(sa.func.lower(contacts.c.email) == "x").values(tenant_id="b")
    )

    with engine.connect() as connection, pytest.raises(UnsupportedOperationError):
        connection.execute(statement)
