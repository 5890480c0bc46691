"""Each row is sealed under its own tenant, and reads in a tenant scope see
only that tenant's values."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    DataKey,
    DecryptionError,
    DeterministicEncrypted,
    Encrypted,
    KeyPurpose,
    TenantContextError,
    TenantMismatchError,
)
from sqlalchemy_encrypted.envelope import parse_header
from sqlalchemy_encrypted.tenancy import TenantBound
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import assert_no_secret, exception_texts


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "persons"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "email"),
        {"info": {"tenant_column": "tenant_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    name: Mapped[str | None] = mapped_column(Encrypted(sa.String(100)))
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)))


class CountingKeyring(InMemoryKeyring):
    """Records the tenant of every DEK handed out for decryption."""

    def __init__(self) -> None:
        super().__init__()
        self.handed_out: list[str] = []

    def key_by_id(self, key_id: uuid.UUID, expected_tenant: str | None = None) -> DataKey:
        key = super().key_by_id(key_id, expected_tenant)
        self.handed_out.append(key.tenant_id)
        return key

    def decryptable_keys(self, tenant_id: str, purpose: KeyPurpose) -> Sequence[DataKey]:
        keys = super().decryptable_keys(tenant_id, purpose)
        self.handed_out += [key.tenant_id for key in keys]
        return keys


@pytest.fixture
def counting_keyring() -> Iterator[CountingKeyring]:
    provider = CountingKeyring()
    se.set_default_key_provider(provider)
    yield provider


@pytest.fixture
def db(engine: sa.Engine, counting_keyring: CountingKeyring) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    yield engine


def _key_tenants(engine: sa.Engine, column: str) -> dict[int, uuid.UUID]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT id, {column} FROM persons").all()
    return {row_id: parse_header(bytes(value)).key_id for row_id, value in rows if value}


def test_flush_seals_rows_per_tenant(db: sa.Engine, counting_keyring: CountingKeyring) -> None:
    with Session(db) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Acme Person"))
        session.add(Person(id=2, tenant_id="t-globex", name="Globex Person"))
        session.commit()
    key_ids = _key_tenants(db, "name")
    acme = counting_keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    globex = counting_keyring.active_key("t-globex", KeyPurpose.RANDOMIZED)
    assert key_ids == {1: acme.key_id, 2: globex.key_id}


def test_orm_update_uses_row_tenant(db: sa.Engine, counting_keyring: CountingKeyring) -> None:
    """An update that does not touch the tenant column is sealed under the
    loaded object's tenant, also without a tenant scope."""
    with Session(db) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Before"))
        session.add(Person(id=2, tenant_id="t-globex", name="Before"))
        session.commit()
        for person in session.scalars(sa.select(Person)):
            person.name = f"After {person.id}"
        session.commit()
    key_ids = _key_tenants(db, "name")
    assert key_ids[1] == counting_keyring.active_key("t-acme", KeyPurpose.RANDOMIZED).key_id
    assert key_ids[2] == counting_keyring.active_key("t-globex", KeyPurpose.RANDOMIZED).key_id
    with se.tenant_scope("t-globex"), Session(db) as session:
        assert session.get(Person, 2).name == "After 2"  # type: ignore[union-attr]


def test_update_after_commit_loads_tenant(db: sa.Engine, counting_keyring: CountingKeyring) -> None:
    """commit() expires every attribute, the tenant column included; an
    update set on the expired object reads the row's tenant from the database."""
    with Session(db) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Before"))
        session.add(Person(id=2, tenant_id="t-globex", name="Before"))
        session.commit()
    with Session(db) as session:
        person = session.get(Person, 2)
        assert person is not None
        session.commit()
        assert "tenant_id" not in sa.inspect(person).dict
        person.name = "After"
        session.commit()
    key_ids = _key_tenants(db, "name")
    assert key_ids[2] == counting_keyring.active_key("t-globex", KeyPurpose.RANDOMIZED).key_id
    with se.tenant_scope("t-globex"), Session(db) as session:
        assert session.get(Person, 2).name == "After"  # type: ignore[union-attr]


def test_update_with_tenant_not_loaded(db: sa.Engine, counting_keyring: CountingKeyring) -> None:
    """load_only() leaves the tenant column unloaded; the flush reads it."""
    with Session(db) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Before"))
        session.commit()
    with se.tenant_scope("t-acme"), Session(db) as session:
        statement = sa.select(Person).options(sa.orm.load_only(Person.name))
        person = session.scalars(statement).one()
        assert "tenant_id" not in sa.inspect(person).dict
        person.name = "After"
        session.commit()
    key_ids = _key_tenants(db, "name")
    assert key_ids[1] == counting_keyring.active_key("t-acme", KeyPurpose.RANDOMIZED).key_id


def test_unloaded_tenant_other_scope_raises(db: sa.Engine) -> None:
    with Session(db) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Before"))
        session.commit()
    with Session(db) as session:
        person = session.get(Person, 1)
        assert person is not None
        session.commit()
        with se.tenant_scope("t-globex"):
            person.name = "Hijacked"
            with pytest.raises(TenantContextError, match="t-acme"):
                session.flush()


def test_update_in_other_tenant_scope_raises(db: sa.Engine) -> None:
    with Session(db) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Before"))
        session.commit()
    with Session(db) as session:
        person = session.get(Person, 1)
        assert person is not None
        with se.tenant_scope("t-globex"):
            person.name = "Hijacked"
            with pytest.raises(TenantContextError, match="t-acme"):
                session.flush()


def test_failed_flush_leaves_no_wrapper_on_objects(db: sa.Engine) -> None:
    """The update hook wraps changed values during the flush only; a flush
    that fails on a unique constraint leaves plain values behind."""
    with Session(db) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="One", email="one@example.test"))
        session.add(Person(id=2, tenant_id="t-acme", name="Two", email="two@example.test"))
        session.commit()
    with Session(db) as session:
        first = session.get(Person, 1)
        second = session.get(Person, 2)
        assert first is not None
        assert second is not None
        first.name = "One Renamed"
        second.name = "Two Renamed"
        second.email = "one@example.test"
        with pytest.raises(sa.exc.IntegrityError):
            session.flush()
        for person in (first, second):
            state = sa.inspect(person)
            assert not any(isinstance(v, TenantBound) for v in state.dict.values())
            assert not any(isinstance(v, TenantBound) for v in vars(person).values())
            assert not any(isinstance(v, TenantBound) for v in state.committed_state.values())
        session.rollback()
        assert first.name == "One"
        assert second.email == "two@example.test"


def test_statement_values_are_sealed_under_their_tenant(
    db: sa.Engine, counting_keyring: CountingKeyring
) -> None:
    with db.begin() as conn:
        conn.execute(
            sa.insert(Person).values(id=1, tenant_id="t-globex", name="Values", email="v@x.test")
        )
    key_ids = _key_tenants(db, "name")
    assert key_ids[1] == counting_keyring.active_key("t-globex", KeyPurpose.RANDOMIZED).key_id
    with se.tenant_scope("t-acme"), db.begin() as conn:
        with pytest.raises(TenantContextError, match="t-globex"):
            conn.execute(sa.insert(Person).values(id=2, tenant_id="t-globex", name="Other"))


def test_other_tenant_cannot_read_or_find(db: sa.Engine, counting_keyring: CountingKeyring) -> None:
    with Session(db) as session:
        session.add(
            Person(id=1, tenant_id="t-acme", name="Test Person", email="shared@example.test")
        )
        session.commit()
    counting_keyring.handed_out.clear()
    with se.tenant_scope("t-globex"), Session(db) as session:
        with pytest.raises(TenantMismatchError) as caught:
            session.get(Person, 1)
        found = session.scalars(
            sa.select(Person.id).where(Person.email == "shared@example.test")
        ).all()
    assert isinstance(caught.value, DecryptionError)
    assert_no_secret(exception_texts(caught.value), "Test Person", "shared@example.test")
    assert "t-acme" not in counting_keyring.handed_out
    assert found == []

    with Session(db) as session:
        session.add(
            Person(id=2, tenant_id="t-globex", name="Other Person", email="shared@example.test")
        )
        session.commit()
    with db.connect() as conn:
        stored = conn.exec_driver_sql("SELECT email FROM persons ORDER BY id").scalars().all()
    assert bytes(stored[0]) != bytes(stored[1])
    for tenant, expected in (("t-acme", [1]), ("t-globex", [2])):
        with se.tenant_scope(tenant), Session(db) as session:
            ids = session.scalars(
                sa.select(Person.id).where(Person.email == "shared@example.test")
            ).all()
        assert ids == expected


def test_write_without_tenant_raises(db: sa.Engine) -> None:
    table = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(50))),
    )
    table.create(db)
    with pytest.raises(TenantContextError, match=r"notes\.body"), db.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "body": "no tenant"}])
    se.set_default_tenant("single")
    with db.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "body": "default tenant"}])
        assert conn.execute(sa.select(table.c.body)).scalar_one() == "default tenant"


def test_tenant_bound_repr_hides_value() -> None:
    bound: Any = TenantBound("Test Person", "t-acme")
    assert "Test Person" not in repr(bound)
    assert "t-acme" in repr(bound)
