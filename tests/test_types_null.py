"""NULL stays SQL NULL, "" is a value, and pad-like characters survive."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted
from sqlalchemy_encrypted.testing import InMemoryKeyring

GCM_OVERHEAD = 24 + 12 + 16
SIV_OVERHEAD = 24 + 16 + 1


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "persons"
    __table_args__ = {"info": {"tenant_column": "tenant_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    name: Mapped[str | None] = mapped_column(Encrypted(sa.String(100)))
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)))
    age: Mapped[int | None] = mapped_column(Encrypted(sa.Integer()))


class Secret(Base):
    __tablename__ = "secrets"
    __table_args__ = {"info": {"tenant_column": "tenant_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    value: Mapped[str] = mapped_column(Encrypted(sa.Text()))
    token: Mapped[str] = mapped_column(DeterministicEncrypted(sa.String(64)))


@pytest.fixture
def db(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with se.tenant_scope("t-acme"):
        yield engine


def test_null_stays_sql_null(db: sa.Engine) -> None:
    with Session(db) as session:
        session.add(Person(id=1, tenant_id="t-acme", name=None, email=None, age=None))
        session.add(Person(id=2, tenant_id="t-acme", name="x", email="x@example.test", age=0))
        session.commit()
    with db.connect() as conn:
        nulls = conn.exec_driver_sql(
            "SELECT count(*) FROM persons WHERE name IS NULL AND email IS NULL AND age IS NULL"
        ).scalar_one()
    assert nulls == 1
    with Session(db) as session:
        empty = session.get(Person, 1)
        assert empty is not None
        assert empty.name is None
        assert empty.email is None
        assert empty.age is None
        zero = session.get(Person, 2)
        assert zero is not None
        assert zero.age == 0
        by_is = session.scalars(sa.select(Person.id).where(Person.email.is_(None))).all()
        by_eq = session.scalars(sa.select(Person.id).where(Person.email == None)).all()  # noqa: E711
        assert by_is == [1]
        assert by_eq == [1]
        zero.name = None
        session.commit()
    assert "IS NULL" in str(sa.select(Person.id).where(Person.email == None))  # noqa: E711
    with db.connect() as conn:
        assert conn.exec_driver_sql("SELECT name FROM persons WHERE id = 2").scalar_one() is None


def test_empty_string_is_a_value(db: sa.Engine) -> None:
    with Session(db) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="", email=""))
        session.add(Person(id=2, tenant_id="t-acme", name=None, email=None))
        session.commit()
    with Session(db) as session:
        person = session.get(Person, 1)
        assert person is not None
        assert person.name == ""
        assert isinstance(person.name, str)
        assert person.email == ""
        assert session.scalars(sa.select(Person.id).where(Person.email == "")).all() == [1]
    with db.connect() as conn:
        name, email = conn.exec_driver_sql("SELECT name, email FROM persons WHERE id = 1").one()
    assert len(bytes(name)) == GCM_OVERHEAD
    assert len(bytes(email)) == SIV_OVERHEAD


PAD_LIKE = ["hunter2*", "*", "****", "x" + "*" * 31, "pad\x00", "ends with space ", "\t", "a" * 16]


def test_pad_like_characters_round_trip(db: sa.Engine) -> None:
    with Session(db) as session:
        for number, text in enumerate(PAD_LIKE, start=1):
            session.add(Secret(id=number, tenant_id="t-acme", value=text, token=text))
        session.commit()
        session.expunge_all()
        for number, text in enumerate(PAD_LIKE, start=1):
            secret = session.get(Secret, number)
            assert secret is not None
            assert type(secret.value) is str
            assert secret.value == text
            assert secret.token == text
            found = session.scalars(sa.select(Secret.id).where(Secret.token == text)).all()
            assert found == [number]
    with db.connect() as conn:
        star = conn.exec_driver_sql("SELECT token FROM secrets WHERE id = 2").scalar_one()
        stars = conn.exec_driver_sql("SELECT token FROM secrets WHERE id = 3").scalar_one()
    assert bytes(star) != bytes(stars)
