"""Comparisons on a randomized (AES-GCM) column fail before any SQL is sent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import UnsupportedOperationError
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import count_statements
from .models import Base, Person


@pytest.fixture
def people(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(
            Person(id=1, tenant_id="t-acme", name="Test Person", email="alice@example.test")
        )
        session.add(Person(id=2, tenant_id="t-acme", name=None, email=None))
        session.commit()
    with se.tenant_scope("t-acme"):
        yield engine


REJECTED: dict[str, Callable[[], Any]] = {
    "eq": lambda: sa.select(Person).where(Person.name == "Test Person"),
    "ne": lambda: sa.select(Person).where(Person.name != "Test Person"),
    "reversed eq": lambda: sa.select(Person).where("Test Person" == Person.name),
    "in": lambda: sa.select(Person).where(Person.name.in_(["Test Person"])),
    "not in": lambda: sa.select(Person).where(Person.name.not_in(["Test Person"])),
    "is distinct from": lambda: sa.select(Person).where(Person.name.is_distinct_from("x")),
    "like": lambda: sa.select(Person).where(Person.name.like("Test%")),
    "ilike": lambda: sa.select(Person).where(Person.name.ilike("test%")),
    "startswith": lambda: sa.select(Person).where(Person.name.startswith("Test")),
    "contains": lambda: sa.select(Person).where(Person.name.contains("Person")),
    "lt": lambda: sa.select(Person).where(Person.name < "M"),
    "ge": lambda: sa.select(Person).where(Person.name >= "M"),
    "between": lambda: sa.select(Person).where(Person.name.between("A", "Z")),
    "order by": lambda: sa.select(Person).order_by(Person.name),
    "order by desc": lambda: sa.select(Person).order_by(Person.name.desc()),
    "min": lambda: sa.select(sa.func.min(Person.name)),
    "max": lambda: sa.select(sa.func.max(Person.name)),
    "group by": lambda: sa.select(Person.name, sa.func.count()).group_by(Person.name),
    "other column": lambda: sa.select(Person).where(Person.name == Person.email),
    "negated other column": lambda: sa.select(Person).where(~(Person.name == Person.tenant_id)),
    "concat": lambda: sa.select(Person.name + "x"),
    "update where": lambda: sa.update(Person).where(Person.name == "x").values(tenant_id="t"),
    "delete where": lambda: sa.delete(Person).where(Person.name.in_(["x"])),
}


@pytest.mark.parametrize("build", REJECTED.values(), ids=REJECTED.keys())
def test_randomized_operation_raises_before_sql(
    people: sa.Engine, build: Callable[[], Any]
) -> None:
    with count_statements(people) as counter, Session(people) as session:
        with pytest.raises(UnsupportedOperationError) as caught:
            session.execute(build())
    assert counter.count == 0
    message = str(caught.value)
    assert "persons.name" in message
    assert "Test Person" not in message


def test_equality_error_suggests_deterministic_type() -> None:
    with pytest.raises(UnsupportedOperationError) as caught:
        sa.select(Person).where(Person.name == "Test Person")
    assert "persons.name" in str(caught.value)
    assert "DeterministicEncrypted" in str(caught.value)


def test_null_tests_work_on_randomized_column(people: sa.Engine) -> None:
    with Session(people) as session:
        with_name = session.scalars(sa.select(Person.id).where(Person.name.is_not(None))).all()
        without = session.scalars(sa.select(Person.id).where(Person.name.is_(None))).all()
        eq_none = session.scalars(sa.select(Person.id).where(Person.name == None)).all()  # noqa: E711
        ne_none = session.scalars(sa.select(Person.id).where(Person.name != None)).all()  # noqa: E711
    assert with_name == [1]
    assert without == [2]
    assert eq_none == [2]
    assert ne_none == [1]


def test_deterministic_equality_still_finds_row(people: sa.Engine) -> None:
    with Session(people) as session:
        found = session.scalars(sa.select(Person).where(Person.email == "alice@example.test")).all()
    assert [person.name for person in found] == ["Test Person"]


def test_select_and_label_return_plaintext(people: sa.Engine) -> None:
    with Session(people) as session:
        names = session.scalars(sa.select(Person.name).where(Person.id == 1)).all()
        labelled = session.execute(sa.select(Person.name.label("n")).where(Person.id == 1)).one()
        counted = session.scalar(sa.select(sa.func.count(Person.name)))
    assert names == ["Test Person"]
    assert labelled.n == "Test Person"
    assert counted == 1
