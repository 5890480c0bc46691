"""Moving a row to another tenant seals its encrypted values again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, defer

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import KeyPurpose, TenantContextError, TenantMismatchError
from sqlalchemy_encrypted.envelope import parse_header
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .models import Base, Person


@pytest.fixture
def db(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Moving Person", email="m@example.test"))
        session.add(Person(id=2, tenant_id="t-acme", name="Staying", email="s@example.test"))
        session.commit()
    yield engine


def _stored_key_ids(engine: sa.Engine, row_id: int) -> list[object]:
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT name, email FROM persons WHERE id = :id"), {"id": row_id}
        ).one()
    return [parse_header(bytes(value)).key_id for value in row]


def _assert_belongs_to(engine: sa.Engine, keyring: InMemoryKeyring, tenant: str) -> None:
    expected = [
        keyring.active_key(tenant, KeyPurpose.RANDOMIZED).key_id,
        keyring.active_key(tenant, KeyPurpose.DETERMINISTIC).key_id,
    ]
    assert _stored_key_ids(engine, 1) == expected
    with se.tenant_scope(tenant), Session(engine) as session:
        person = session.get(Person, 1)
        assert person is not None
        assert person.name == "Moving Person"
        found = session.scalars(sa.select(Person.id).where(Person.email == "m@example.test"))
        assert found.all() == [1]


def test_loaded_row_moves_with_its_values(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with Session(db) as session:
        person = session.get(Person, 1)
        assert person is not None
        person.tenant_id = "t-globex"
        session.commit()

    _assert_belongs_to(db, keyring, "t-globex")
    with se.tenant_scope("t-acme"), Session(db) as session:
        with pytest.raises(TenantMismatchError):
            session.get(Person, 1)
        assert session.get(Person, 2).name == "Staying"  # type: ignore[union-attr]


def test_expired_row_moves_with_its_values(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    """After a commit every attribute is expired; the old tenant and the
    values are loaded when the tenant column is set."""
    with Session(db) as session:
        person = session.get(Person, 1)
        assert person is not None
        session.commit()
        person.tenant_id = "t-globex"
        session.commit()

    _assert_belongs_to(db, keyring, "t-globex")


def test_shredding_old_tenant_keeps_moved_row(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with Session(db) as session:
        person = session.get(Person, 1)
        assert person is not None
        person.tenant_id = "t-globex"
        session.commit()

    keyring.shred("t-acme")

    _assert_belongs_to(db, keyring, "t-globex")


def test_setting_same_tenant_rewrites_nothing(db: sa.Engine) -> None:
    before = _stored_key_ids(db, 1)
    with db.connect() as conn:
        raw_before = conn.exec_driver_sql("SELECT name FROM persons WHERE id = 1").scalar_one()
    with Session(db) as session:
        person = session.get(Person, 1)
        assert person is not None
        person.tenant_id = "t-acme"
        session.commit()
    with db.connect() as conn:
        raw_after = conn.exec_driver_sql("SELECT name FROM persons WHERE id = 1").scalar_one()
    assert _stored_key_ids(db, 1) == before
    assert bytes(raw_after) == bytes(raw_before)


def test_move_with_unloaded_value_raises(db: sa.Engine) -> None:
    """A deferred encrypted column cannot be sealed again without its value."""
    with Session(db) as session:
        deferred = sa.select(Person).where(Person.id == 1).options(defer(Person.name))
        moving = session.scalars(deferred).one()
        moving.tenant_id = "t-globex"
        with pytest.raises(TenantContextError) as caught:
            session.commit()
    message = str(caught.value)
    assert "persons.name" in message
    assert "t-acme" in message
    assert "t-globex" in message
    assert "Moving Person" not in message
    with Session(db) as session:
        assert session.get(Person, 1).tenant_id == "t-acme"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "build",
    [
        lambda: sa.select(Person).where(Person.email == "m@example.test"),
        lambda: sa.select(Person).where(
            Person.email == "m@example.test", Person.tenant_id == "t-acme"
        ),
        lambda: sa.select(Person).where(Person.email == sa.bindparam("e", "m@example.test")),
    ],
    ids=["literal", "with tenant column", "bound"],
)
def test_search_without_tenant_names_the_fix(db: sa.Engine, build: object) -> None:
    with Session(db) as session, pytest.raises(TenantContextError) as raised:
        session.execute(build())  # type: ignore[operator]

    message = str(raised.value)
    assert "search on encrypted column persons.email" in message
    assert "tenant_scope(tenant_id)" in message
    assert "give the table a tenant column" not in message
