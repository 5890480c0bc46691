"""INSERT statements and upserts on a table with a tenant column keep each
row's values sealed under that row's tenant."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import Encrypted, TenantContextError, UnsupportedOperationError
from sqlalchemy_encrypted.envelope import parse_header
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import count_statements


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = {"info": {"tenant_column": "clinic_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    clinic_id: Mapped[str | None] = mapped_column(sa.String(40))
    visits: Mapped[int] = mapped_column(default=0)
    name: Mapped[str | None] = mapped_column(Encrypted(sa.String(100)))


class Ward(Base):
    """A table whose tenant column has a scalar default."""

    __tablename__ = "wards"
    __table_args__ = {"info": {"tenant_column": "clinic_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    clinic_id: Mapped[str] = mapped_column(sa.String(40), default="alder")
    label: Mapped[str | None] = mapped_column(Encrypted(sa.String(100)))


class Room(Base):
    """A table whose tenant column has a server default."""

    __tablename__ = "rooms"
    __table_args__ = {"info": {"tenant_column": "clinic_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    clinic_id: Mapped[str] = mapped_column(sa.String(40), server_default="alder")
    label: Mapped[str | None] = mapped_column(Encrypted(sa.String(100)))


CLINICS = {1: "alder", 2: "birch", 3: "alder"}


@pytest.fixture
def db(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for row_id, clinic in CLINICS.items():
            session.add(Patient(id=row_id, clinic_id=clinic, name=f"Original {row_id}"))
        session.commit()
    yield engine


def _upsert(engine: sa.Engine) -> Callable[..., Any]:
    """Return the ``insert()`` of the engine's dialect, which has
    ``on_conflict_do_update()``."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert
    return sqlite.insert


def _upsert_name(engine: sa.Engine, **set_: Any) -> Any:
    """Return an upsert of Patient that sets name on conflict, by default to
    the inserted row's name."""
    statement = _upsert(engine)(Patient)
    return statement.on_conflict_do_update(
        index_elements=[Patient.id], set_=set_ or {"name": statement.excluded.name}
    )


def _rows(engine: sa.Engine, keyring: InMemoryKeyring, table: str = "patients") -> dict[int, Any]:
    """Return ``{id: (tenant column, tenant of the key that sealed the value)}``."""
    value_column = "name" if table == "patients" else "label"
    with engine.connect() as conn:
        stored = conn.exec_driver_sql(f"SELECT id, clinic_id, {value_column} FROM {table}").all()
    rows = {}
    for row_id, clinic, value in stored:
        key_tenant = None
        if value is not None:
            key_tenant = keyring.key_by_id(parse_header(bytes(value)).key_id).tenant_id
        rows[row_id] = (clinic, key_tenant)
    return rows


def _name(engine: sa.Engine, row_id: int, tenant: str) -> str | None:
    with se.tenant_scope(tenant), Session(engine) as session:
        patient = session.get(Patient, row_id)
        assert patient is not None
        return patient.name


# -- upserts --------------------------------------------------------------------


def test_upsert_skips_other_tenant_row(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    statement = _upsert_name(db).values(id=2, clinic_id="alder", name="Taken over")
    with se.tenant_scope("alder"), db.begin() as conn:
        written = conn.execute(statement.returning(Patient.id)).all()

    assert written == []
    assert _rows(db, keyring)[2] == ("birch", "birch")
    assert _name(db, 2, "birch") == "Original 2"


def test_upsert_updates_own_row(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    statement = _upsert_name(db).values(id=1, clinic_id="alder", name="Renamed")
    with se.tenant_scope("alder"), db.begin() as conn:
        written = conn.execute(statement.returning(Patient.id)).all()

    assert written == [(1,)]
    assert _rows(db, keyring)[1] == ("alder", "alder")
    assert _name(db, 1, "alder") == "Renamed"


def test_upsert_keeps_user_where(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    insert = _upsert(db)(Patient)
    statement = insert.on_conflict_do_update(
        index_elements=[Patient.id],
        set_={"name": insert.excluded.name, "visits": insert.excluded.visits},
        where=Patient.visits < insert.excluded.visits,
    )
    rows = [
        {"id": 1, "clinic_id": "alder", "visits": 0, "name": "Not newer"},
        {"id": 3, "clinic_id": "alder", "visits": 5, "name": "Newer"},
    ]
    with se.tenant_scope("alder"), db.begin() as conn:
        for row in rows:
            conn.execute(statement, row)

    assert _name(db, 1, "alder") == "Original 1"
    assert _name(db, 3, "alder") == "Newer"


def test_upsert_executemany_in_scope(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    rows = [
        {"id": 1, "clinic_id": "alder", "name": "One"},
        {"id": 2, "clinic_id": "alder", "name": "Two"},
        {"id": 4, "clinic_id": "alder", "name": "Four"},
    ]
    with se.tenant_scope("alder"), db.begin() as conn:
        conn.execute(_upsert_name(db), rows)

    assert _rows(db, keyring) == {
        1: ("alder", "alder"),
        2: ("birch", "birch"),
        3: ("alder", "alder"),
        4: ("alder", "alder"),
    }
    assert _name(db, 1, "alder") == "One"
    assert _name(db, 2, "birch") == "Original 2"
    assert _name(db, 4, "alder") == "Four"


def test_upsert_rows_of_several_tenants(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    # Outside any scope each row is sealed under, and may update, its own tenant.
    rows = [
        {"id": 1, "clinic_id": "alder", "name": "Alder one"},
        {"id": 2, "clinic_id": "birch", "name": "Birch two"},
        {"id": 3, "clinic_id": "birch", "name": "Birch three"},
    ]
    with db.begin() as conn:
        conn.execute(_upsert_name(db), rows)

    assert _rows(db, keyring) == {
        1: ("alder", "alder"),
        2: ("birch", "birch"),
        3: ("alder", "alder"),
    }
    assert _name(db, 1, "alder") == "Alder one"
    assert _name(db, 2, "birch") == "Birch two"
    assert _name(db, 3, "alder") == "Original 3"


def test_orm_upsert_skips_other_tenant_row(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with se.tenant_scope("alder"), Session(db) as session:
        session.execute(_upsert_name(db).values(id=2, clinic_id="alder", name="By values"))
        session.execute(
            _upsert_name(db),
            [
                {"id": 2, "clinic_id": "alder", "name": "By parameters"},
                {"id": 3, "clinic_id": "alder", "name": "Three"},
            ],
        )
        session.commit()

    assert _rows(db, keyring)[2] == ("birch", "birch")
    assert _name(db, 2, "birch") == "Original 2"
    assert _name(db, 3, "alder") == "Three"


def test_upsert_literal_pinned_to_default(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    # Outside any scope the inserted rows may name any tenant, but a value
    # given in SET is sealed under the default tenant.
    se.set_default_tenant("alder")
    statement = _upsert_name(db, name="Literal").returning(Patient.id)
    with db.begin() as conn:
        other = conn.execute(statement.values(id=2, clinic_id="birch")).all()
        own = conn.execute(statement.values(id=1, clinic_id="alder")).all()

    assert other == []
    assert own == [(1,)]
    assert _rows(db, keyring)[2] == ("birch", "birch")
    assert _name(db, 2, "birch") == "Original 2"
    assert _name(db, 1, "alder") == "Literal"


def test_upsert_literal_without_tenant_raises(db: sa.Engine) -> None:
    statement = _upsert_name(db, name="Literal").values(id=2, clinic_id="birch")
    with count_statements(db) as counter, db.begin() as conn:
        with pytest.raises(TenantContextError) as caught:
            conn.execute(statement)

    message = str(caught.value)
    assert "table patients" in message
    assert "patients.name" in message
    assert "tenant_scope" in message
    assert counter.count == 0


def test_upsert_of_plain_columns_not_limited(db: sa.Engine) -> None:
    insert = _upsert(db)(Patient).values(id=2, clinic_id="alder", visits=7)
    statement = insert.on_conflict_do_update(
        index_elements=[Patient.id], set_={"visits": insert.excluded.visits}
    )
    with se.tenant_scope("alder"), db.begin() as conn:
        written = conn.execute(statement.returning(Patient.visits)).all()

    assert written == [(7,)]


def test_on_duplicate_key_update_raises(db: sa.Engine) -> None:
    insert = mysql.insert(Patient).values(id=2, clinic_id="alder", name="x")
    statement = insert.on_duplicate_key_update(name=insert.inserted.name)
    with count_statements(db) as counter, se.tenant_scope("alder"), db.begin() as conn:
        with pytest.raises(UnsupportedOperationError) as caught:
            conn.execute(statement)

    message = str(caught.value)
    assert "table patients" in message
    assert "patients.name" in message
    assert "'clinic_id'" in message
    assert counter.count == 0


# -- INSERT rows without a tenant --------------------------------------------------


def _assert_missing_tenant(caught: pytest.ExceptionInfo[TenantContextError]) -> None:
    message = str(caught.value)
    assert "table patients" in message
    assert "patients.name" in message
    assert "'clinic_id'" in message
    assert "tenant_scope('alder')" in message


def test_values_literal_sealed_under_row_tenant(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    # The rows name their tenant, so the default tenant does not apply.
    se.set_default_tenant("alder")
    rows = [{"id": 4, "clinic_id": "birch"}, {"id": 5, "clinic_id": "birch"}]
    with db.begin() as conn:
        conn.execute(sa.insert(Patient).values(name="Shared"), rows)

    stored = _rows(db, keyring)
    assert stored[4] == ("birch", "birch")
    assert stored[5] == ("birch", "birch")
    assert _name(db, 5, "birch") == "Shared"


def test_values_literal_two_row_tenants_raise(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    se.set_default_tenant("alder")
    rows = [{"id": 4, "clinic_id": "birch"}, {"id": 5, "clinic_id": "alder"}]
    with pytest.raises(TenantContextError, match="sealed once for all rows") as raised:
        with db.begin() as conn:
            conn.execute(sa.insert(Patient).values(name="Shared"), rows)

    assert "Shared" not in str(raised.value)
    stored = _rows(db, keyring)
    assert 4 not in stored
    assert 5 not in stored


def test_insert_values_without_tenant_raises(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with count_statements(db) as counter, se.tenant_scope("alder"), db.begin() as conn:
        with pytest.raises(TenantContextError) as caught:
            conn.execute(sa.insert(Patient).values(id=4, name="No clinic"))

    _assert_missing_tenant(caught)
    assert counter.count == 0
    assert 4 not in _rows(db, keyring)


def test_executemany_without_tenant_raises(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    rows = [
        {"id": 4, "clinic_id": "alder", "name": "Four"},
        {"id": 5, "name": "Five"},
    ]
    with count_statements(db) as counter, se.tenant_scope("alder"), db.begin() as conn:
        with pytest.raises(TenantContextError) as caught:
            conn.execute(sa.insert(Patient), rows)

    _assert_missing_tenant(caught)
    assert counter.count == 0
    assert set(_rows(db, keyring)) == {1, 2, 3}


def test_multi_values_without_tenant_raises(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    statement = sa.insert(Patient).values([{"id": 4, "name": "Four"}, {"id": 5, "name": "Five"}])
    with count_statements(db) as counter, se.tenant_scope("alder"), db.begin() as conn:
        with pytest.raises(TenantContextError) as caught:
            conn.execute(statement)

    _assert_missing_tenant(caught)
    assert counter.count == 0


def test_orm_bulk_insert_without_tenant_raises(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with se.tenant_scope("alder"), Session(db) as session:
        with pytest.raises(TenantContextError) as caught:
            session.execute(sa.insert(Patient), [{"id": 4, "name": "Four"}])

    _assert_missing_tenant(caught)
    assert set(_rows(db, keyring)) == {1, 2, 3}


def test_orm_add_without_tenant_raises(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with se.tenant_scope("alder"), Session(db) as session:
        session.add(Patient(id=4, name="Four"))
        with pytest.raises(TenantContextError, match="table patients"):
            session.flush()

    assert set(_rows(db, keyring)) == {1, 2, 3}


def test_insert_without_encrypted_values(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with se.tenant_scope("alder"), db.begin() as conn:
        conn.execute(sa.insert(Patient).values(id=4, name=None))
        conn.execute(sa.insert(Patient), [{"id": 5, "visits": 2}])

    rows = _rows(db, keyring)
    assert rows[4] == (None, None)
    assert rows[5] == (None, None)


def test_scalar_tenant_default_seals_row(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with db.begin() as conn:
        conn.execute(sa.insert(Ward).values(id=1, label="Outside any scope"))
    with se.tenant_scope("alder"), db.begin() as conn:
        conn.execute(sa.insert(Ward), [{"id": 2, "label": "In scope"}])
    with se.tenant_scope("alder"), Session(db) as session:
        session.add(Ward(id=3, label="Flushed"))
        session.commit()

    assert _rows(db, keyring, "wards") == {
        1: ("alder", "alder"),
        2: ("alder", "alder"),
        3: ("alder", "alder"),
    }


def test_scalar_tenant_default_other_scope(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with se.tenant_scope("birch"), db.begin() as conn:
        with pytest.raises(TenantContextError, match="table wards"):
            conn.execute(sa.insert(Ward).values(id=1, label="Wrong scope"))

    assert _rows(db, keyring, "wards") == {}


def test_server_tenant_default_trusted(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with se.tenant_scope("alder"), db.begin() as conn:
        conn.execute(sa.insert(Room).values(id=1, label="Server default"))

    assert _rows(db, keyring, "rooms") == {1: ("alder", "alder")}
