"""Queries on encrypted columns that once sent plaintext or gave wrong results."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import DeterministicEncrypted
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import count_statements
from .models import Base, Person

SECRET_EMAIL = "carol.secret@example.test"


@pytest.fixture
def people(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            [
                Person(id=1, tenant_id="t-acme", name="Carol", email=SECRET_EMAIL),
                Person(id=2, tenant_id="t-acme", name="Dave", email="dave@example.test"),
            ]
        )
        session.commit()
    with se.tenant_scope("t-acme"):
        yield engine


TYPED_LOOKUPS: dict[str, tuple[Any, dict[str, Any]]] = {
    "eq literal": (Person.email == sa.literal(SECRET_EMAIL), {}),
    "ne literal": (Person.email != sa.literal(SECRET_EMAIL), {}),
    "eq typed bindparam": (Person.email == sa.bindparam("e", type_=sa.String), {"e": SECRET_EMAIL}),
    "in typed expanding bindparam": (
        Person.email.in_(sa.bindparam("es", expanding=True, type_=sa.String)),
        {"es": [SECRET_EMAIL]},
    ),
}
TYPED_EXPECTED = {
    "eq literal": [1],
    "ne literal": [2],
    "eq typed bindparam": [1],
    "in typed expanding bindparam": [1],
}


class _SentParameters:
    """Records the parameters of every statement an engine sends."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        self.texts.append(repr(parameters))


@pytest.mark.parametrize("name", TYPED_LOOKUPS)
def test_typed_parameter_lookup_is_encrypted(people: sa.Engine, name: str) -> None:
    """A search value bound with a plain type is sealed like any other: it
    finds its row, and the plaintext never reaches the database."""
    criterion, params = TYPED_LOOKUPS[name]
    sent = _SentParameters()
    sa.event.listen(people, "before_cursor_execute", sent)
    try:
        with Session(people) as session:
            statement = sa.select(Person.id).where(criterion).order_by(Person.id)
            found = session.scalars(statement, params).all()
    finally:
        sa.event.remove(people, "before_cursor_execute", sent)
    assert found == TYPED_EXPECTED[name]
    assert sent.texts
    assert not any(SECRET_EMAIL in text for text in sent.texts)


def _load_both(session: Session) -> dict[int, Person]:
    return {p.id: p for p in session.scalars(sa.select(Person).order_by(Person.id))}


@pytest.mark.parametrize("synchronize", ["auto", "fetch"])
def test_orm_update_synchronizes_session_objects(people: sa.Engine, synchronize: str) -> None:
    """An ORM UPDATE whose WHERE searches a deterministic column updates the
    objects in the session that match, and only those."""
    with Session(people) as session:
        loaded = _load_both(session)
        session.execute(
            sa.update(Person)
            .where(Person.email == SECRET_EMAIL)
            .values(name="Carol Renamed")
            .execution_options(synchronize_session=synchronize)
        )
        assert loaded[1].name == "Carol Renamed"
        assert loaded[2].name == "Dave"
        session.execute(
            sa.update(Person)
            .where(Person.email != SECRET_EMAIL)
            .values(name="Dave Renamed")
            .execution_options(synchronize_session=synchronize)
        )
        assert loaded[1].name == "Carol Renamed"
        assert loaded[2].name == "Dave Renamed"
        session.commit()
    with Session(people) as session:
        stored = {p.id: p.name for p in _load_both(session).values()}
    assert stored == {1: "Carol Renamed", 2: "Dave Renamed"}


def test_orm_delete_synchronizes_session_objects(people: sa.Engine) -> None:
    with Session(people) as session:
        loaded = _load_both(session)
        session.execute(sa.delete(Person).where(Person.email.not_in([SECRET_EMAIL])))
        assert loaded[1] in session
        assert loaded[2] not in session


def test_orm_update_evaluate_is_refused(people: sa.Engine) -> None:
    """Python cannot evaluate a search over ciphertext against decrypted
    attributes, so "evaluate" raises instead of guessing."""
    with Session(people) as session:
        _load_both(session)
        statement = (
            sa.update(Person)
            .where(Person.email == SECRET_EMAIL)
            .values(name="Never")
            .execution_options(synchronize_session="evaluate")
        )
        with pytest.raises(sa.exc.InvalidRequestError, match="evaluate"):
            session.execute(statement)


class _VisitBase(DeclarativeBase):
    pass


class _Visit(_VisitBase):
    """A second table with an encrypted column, for UNION and CASE checks."""

    __tablename__ = "visits"
    __table_args__ = {"info": {"tenant_column": "tenant_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    code: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(20)))


MIXED_RESULTS: dict[str, Any] = {
    "union of two encrypted columns": lambda: sa.union(
        sa.select(Person.email), sa.select(_Visit.code)
    ),
    "union of encrypted and plaintext": lambda: sa.union_all(
        sa.select(Person.email), sa.select(Person.tenant_id)
    ),
    "union in a subquery": lambda: sa.select(
        sa.union(sa.select(_Visit.code), sa.select(Person.email)).subquery()
    ),
    "case with plaintext branch": lambda: sa.select(
        sa.case((Person.name.is_(None), "no name"), else_=Person.name)
    ),
    "case with two encrypted columns": lambda: sa.select(
        sa.case((Person.id == 1, Person.name), else_=Person.email)
    ),
}


@pytest.mark.parametrize("name", MIXED_RESULTS)
def test_mixed_result_column_raises_before_sql(people: sa.Engine, name: str) -> None:
    """A result column that holds values of an encrypted column and values
    from elsewhere cannot be decrypted with one column's key and identity."""
    _Visit.__table__.create(people)
    with Session(people) as session:
        session.add(_Visit(id=1, tenant_id="t-acme", code="J10"))
        session.commit()
    with count_statements(people) as counter, Session(people) as session:
        with pytest.raises(se.UnsupportedOperationError) as caught:
            session.execute(MIXED_RESULTS[name]()).all()
    assert counter.count == 0
    assert "persons." in str(caught.value)


def test_union_of_one_encrypted_column_works(people: sa.Engine) -> None:
    with Session(people) as session:
        emails = session.scalars(
            sa.union(
                sa.select(Person.email).where(Person.id == 1),
                sa.select(Person.email).where(Person.id == 2),
                sa.select(sa.null()),
            )
        ).all()
        names = session.scalars(
            sa.select(sa.case((Person.id == 1, Person.name), else_=None)).order_by(Person.id)
        ).all()
    assert sorted(emails, key=str) == sorted([SECRET_EMAIL, "dave@example.test", None], key=str)
    assert names == ["Carol", None]
