"""UPDATE statements that do not carry the tenant column touch only rows of
the tenant their values are sealed under."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    Encrypted,
    TenantContextError,
    TenantMismatchError,
)
from sqlalchemy_encrypted.envelope import parse_header
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import assert_no_secret, exception_texts


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = {"info": {"tenant_column": "clinic_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    clinic_id: Mapped[str | None] = mapped_column(sa.String(40))
    name: Mapped[str | None] = mapped_column(Encrypted(sa.String(100)))


class Membership(Base):
    """A table whose primary key contains the tenant column."""

    __tablename__ = "memberships"
    __table_args__ = {"info": {"tenant_column": "tenant_id"}}  # noqa: RUF012

    tenant_id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    user_key: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    role: Mapped[str | None] = mapped_column(Encrypted(sa.String(40)))


CLINICS = {1: "alder", 2: "birch", 3: "alder"}


@pytest.fixture
def db(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for row_id, clinic in CLINICS.items():
            session.add(Patient(id=row_id, clinic_id=clinic, name=f"Original {row_id}"))
        session.commit()
    yield engine


def _stored(engine: sa.Engine) -> dict[int, bytes]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, name FROM patients").all()
    return {row_id: bytes(value) for row_id, value in rows}


def _key_tenants(engine: sa.Engine, keyring: InMemoryKeyring) -> dict[int, str]:
    """Return ``{id: tenant of the key that sealed name}``."""
    owners = {}
    for row_id, value in _stored(engine).items():
        owners[row_id] = keyring.key_by_id(parse_header(value).key_id).tenant_id
    return owners


def _names(engine: sa.Engine) -> dict[int, str | None]:
    names = {}
    for row_id, clinic in CLINICS.items():
        with se.tenant_scope(clinic), Session(engine) as session:
            patient = session.get(Patient, row_id)
            assert patient is not None
            names[row_id] = patient.name
    return names


def test_core_update_in_scope_skips_other_tenants(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with se.tenant_scope("alder"), db.begin() as conn:
        result = conn.execute(
            sa.update(Patient).where(Patient.id.in_([1, 2])).values(name="Renamed")
        )

    assert result.rowcount == 1
    assert _names(db) == {1: "Renamed", 2: "Original 2", 3: "Original 3"}
    assert _key_tenants(db, keyring) == CLINICS


def test_core_update_without_where_in_scope(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with se.tenant_scope("birch"), db.begin() as conn:
        conn.execute(sa.update(Patient).values(name="Everyone"))

    assert _names(db) == {1: "Original 1", 2: "Everyone", 3: "Original 3"}
    assert _key_tenants(db, keyring) == CLINICS


def test_core_executemany_in_scope(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    table = Patient.__table__
    statement = (
        sa.update(table)
        .where(table.c.id == sa.bindparam("row_id"))
        .values(name=sa.bindparam("new_name"))
    )
    with se.tenant_scope("alder"), db.begin() as conn:
        result = conn.execute(
            statement,
            [{"row_id": 1, "new_name": "One"}, {"row_id": 2, "new_name": "Two"}],
        )

    assert result.rowcount == 1
    assert _names(db) == {1: "One", 2: "Original 2", 3: "Original 3"}
    assert _key_tenants(db, keyring) == CLINICS


def test_default_tenant_limits_update(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    se.set_default_tenant("birch")
    with db.begin() as conn:
        conn.execute(sa.update(Patient).where(Patient.id.in_([1, 2])).values(name="Default"))

    assert _names(db) == {1: "Original 1", 2: "Default", 3: "Original 3"}
    assert _key_tenants(db, keyring) == CLINICS


def test_ordered_values_update_in_scope(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    statement = (
        sa.update(Patient).where(Patient.id.in_([1, 2])).ordered_values((Patient.name, "Ordered"))
    )
    with se.tenant_scope("birch"), db.begin() as conn:
        conn.execute(statement)
    with db.begin() as conn:
        conn.execute(
            sa.update(Patient)
            .where(Patient.id == 3)
            .ordered_values((Patient.clinic_id, "alder"), (Patient.name, "Ordered 3"))
        )

    assert _names(db) == {1: "Original 1", 2: "Ordered", 3: "Ordered 3"}
    assert _key_tenants(db, keyring) == CLINICS


def test_update_returning_in_scope(db: sa.Engine) -> None:
    statement = (
        sa.update(Patient)
        .where(Patient.id.in_([1, 2, 3]))
        .values(name="Returned")
        .returning(Patient.id)
    )
    with se.tenant_scope("alder"), db.begin() as conn:
        ids = sorted(conn.execute(statement).scalars())

    assert ids == [1, 3]


def test_lambda_update_in_scope(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    def rename(new_name: str) -> Any:
        return sa.lambda_stmt(
            lambda: sa.update(Patient).where(Patient.id.in_([1, 2])).values(name=new_name)
        )

    with se.tenant_scope("alder"), db.begin() as conn:
        conn.execute(rename("Lambda A"))
    with se.tenant_scope("birch"), db.begin() as conn:
        conn.execute(rename("Lambda B"))

    assert _names(db) == {1: "Lambda A", 2: "Lambda B", 3: "Original 3"}
    assert _key_tenants(db, keyring) == CLINICS


def test_orm_update_in_scope_skips_other_tenants(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with se.tenant_scope("alder"), Session(db) as session:
        session.execute(
            sa.update(Patient).where(Patient.id.in_([1, 2])).values(name="ORM"),
            execution_options={"synchronize_session": "fetch"},
        )
        session.commit()

    assert _names(db) == {1: "ORM", 2: "Original 2", 3: "Original 3"}
    assert _key_tenants(db, keyring) == CLINICS


def test_update_filtered_on_other_tenant_raises(db: sa.Engine) -> None:
    before = _stored(db)
    with se.tenant_scope("birch"), Session(db) as session:
        with pytest.raises(TenantContextError, match=r"tenant 'alder'.*tenant_scope\('birch'\)"):
            session.execute(
                sa.update(Patient).where(Patient.clinic_id == "alder").values(name="Other")
            )

    assert _stored(db) == before


def test_update_filtered_on_tenant_needs_no_scope(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with db.begin() as conn:
        conn.execute(sa.update(Patient).where(Patient.clinic_id == "alder").values(name="A"))
        conn.execute(
            sa.update(Patient.__table__)
            .where(
                Patient.__table__.c.clinic_id == sa.bindparam("clinic"),
                Patient.__table__.c.id == sa.bindparam("row_id"),
            )
            .values(name=sa.bindparam("new_name")),
            [
                {"clinic": "birch", "row_id": 2, "new_name": "B"},
                {"clinic": "alder", "row_id": 3, "new_name": "C"},
            ],
        )

    assert _names(db) == {1: "A", 2: "B", 3: "C"}
    assert _key_tenants(db, keyring) == CLINICS


def test_update_to_null_needs_no_tenant(db: sa.Engine) -> None:
    with db.begin() as conn:
        result = conn.execute(sa.update(Patient).values(name=None))

    assert result.rowcount == 3


def test_update_without_tenant_names_fix(db: sa.Engine) -> None:
    before = _stored(db)
    with Session(db) as session:
        with pytest.raises(TenantContextError) as raised:
            session.execute(sa.update(Patient), [{"id": 1, "name": "Secret Name"}])

    message = str(raised.value)
    assert "table patients" in message
    assert "patients.name" in message
    assert "tenant_scope(tenant_id)" in message
    assert "'clinic_id'" in message
    assert "give the table a tenant column" not in message
    assert_no_secret(exception_texts(raised.value), "Secret Name")
    assert _stored(db) == before


def test_orm_bulk_update_names_other_tenant_row(db: sa.Engine) -> None:
    before = _stored(db)
    with se.tenant_scope("alder"), Session(db) as session:
        with pytest.raises(TenantContextError) as raised:
            session.execute(
                sa.update(Patient),
                [{"id": 1, "name": "Secret A"}, {"id": 2, "name": "Secret B"}],
            )
        session.commit()

    message = str(raised.value)
    assert "table patients" in message
    assert "tenant_scope('alder')" in message
    assert "primary key 2" in message
    assert "nothing was written" in message
    assert "birch" not in message
    assert_no_secret(exception_texts(raised.value), "Secret A", "Secret B")
    assert _stored(db) == before


def test_orm_bulk_update_of_own_rows(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with se.tenant_scope("alder"), Session(db) as session:
        session.execute(
            sa.update(Patient), [{"id": 1, "name": "Bulk 1"}, {"id": 3, "name": "Bulk 3"}]
        )
        session.commit()

    assert _names(db) == {1: "Bulk 1", 2: "Original 2", 3: "Bulk 3"}
    assert _key_tenants(db, keyring) == CLINICS


def test_orm_bulk_update_checks_every_batch(db: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy_encrypted import _statement_tenant

    monkeypatch.setattr(_statement_tenant, "_LOOKUP_BATCH", 1)
    before = _stored(db)
    with se.tenant_scope("alder"), Session(db) as session:
        with pytest.raises(TenantContextError, match=r"names 1 row\(s\).*primary key 2"):
            session.execute(
                sa.update(Patient),
                [{"id": 1, "name": "X"}, {"id": 3, "name": "Y"}, {"id": 2, "name": "Z"}],
            )

    assert _stored(db) == before


def test_orm_bulk_update_missing_row_is_stale(db: sa.Engine) -> None:
    """A primary key that matches no row is SQLAlchemy's StaleDataError, as
    without a tenant column."""
    with se.tenant_scope("alder"), Session(db) as session:
        with pytest.raises(sa.orm.exc.StaleDataError):
            session.execute(sa.update(Patient), [{"id": 1, "name": "X"}, {"id": 99, "name": "Y"}])


def test_orm_bulk_update_with_tenant_column(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with Session(db) as session:
        session.execute(
            sa.update(Patient),
            [
                {"id": 1, "clinic_id": "alder", "name": "Per row 1"},
                {"id": 2, "clinic_id": "birch", "name": "Per row 2"},
            ],
        )
        session.commit()

    assert _names(db) == {1: "Per row 1", 2: "Per row 2", 3: "Original 3"}
    assert _key_tenants(db, keyring) == CLINICS


def test_bulk_update_by_key_with_tenant(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    """The tenant column in the primary key names each row's tenant."""
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Membership(tenant_id="alder", user_key="u1", role="reader"))
        session.add(Membership(tenant_id="birch", user_key="u1", role="reader"))
        session.commit()
        session.execute(
            sa.update(Membership),
            [
                {"tenant_id": "alder", "user_key": "u1", "role": "owner"},
                {"tenant_id": "birch", "user_key": "u1", "role": "admin"},
            ],
        )
        session.commit()

    for tenant, role in (("alder", "owner"), ("birch", "admin")):
        with se.tenant_scope(tenant), Session(engine) as session:
            member = session.get(Membership, (tenant, "u1"))
            assert member is not None
            assert member.role == role
    with se.tenant_scope("alder"), Session(engine) as session:
        with pytest.raises(TenantContextError, match="tenant 'birch'"):
            session.execute(
                sa.update(Membership), [{"tenant_id": "birch", "user_key": "u1", "role": "x"}]
            )


def test_other_tenant_still_reads_its_row(db: sa.Engine) -> None:
    """After alder's rejected bulk update, birch still reads its row and alder cannot."""
    with se.tenant_scope("alder"), Session(db) as session:
        with pytest.raises(TenantContextError):
            session.execute(sa.update(Patient), [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}])
    with se.tenant_scope("birch"), Session(db) as session:
        patient = session.get(Patient, 2)
        assert patient is not None
        assert patient.name == "Original 2"
    with se.tenant_scope("alder"), Session(db) as session:
        with pytest.raises(TenantMismatchError):
            session.get(Patient, 2)


def test_flush_keeps_row_tenants(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    """ORM flushes bind each object's values to its tenant and are not limited."""
    with Session(db) as session:
        for patient in session.scalars(sa.select(Patient)):
            patient.name = f"Flushed {patient.id}"
        session.commit()

    assert _names(db) == {1: "Flushed 1", 2: "Flushed 2", 3: "Flushed 3"}
    assert _key_tenants(db, keyring) == CLINICS


def test_multi_values_insert_without_tenant_message(db: sa.Engine) -> None:
    rows = [
        {"id": 10, "clinic_id": "alder", "name": "Multi A"},
        {"id": 11, "clinic_id": "birch", "name": "Multi B"},
    ]
    with db.begin() as conn:
        with pytest.raises(TenantContextError) as raised:
            conn.execute(sa.insert(Patient).values(rows))

    message = str(raised.value)
    assert "None" not in message
    assert "neither is set" in message
    assert "list of parameter dicts" in message
