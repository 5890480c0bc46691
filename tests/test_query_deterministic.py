"""Equality lookups on a deterministic (AES-SIV) column."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    DeterministicEncrypted,
    Encrypted,
    KeyPurpose,
    ValueTypeError,
)
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .models import Base, Person


class UniqueBase(DeclarativeBase):
    pass


class Account(UniqueBase):
    __tablename__ = "accounts"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "login"),
        {"info": {"tenant_column": "tenant_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    login: Mapped[str] = mapped_column(DeterministicEncrypted(sa.String(64)))
    surname: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(64)))


class Tag(str):
    """A str subclass, as some libraries hand out."""


@pytest.fixture
def people(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            [
                Person(id=1, tenant_id="t-acme", name="A", email="a@example.test"),
                Person(id=2, tenant_id="t-acme", name="B", email="b@example.test"),
                Person(id=3, tenant_id="t-acme", name="C", email="b@example.test"),
                Person(id=4, tenant_id="t-acme", name="D", email=None),
                Person(id=5, tenant_id="t-acme", name="E", email=""),
            ]
        )
        session.commit()
    with se.tenant_scope("t-acme"):
        yield engine


def _ids(engine: sa.Engine, criterion: Any) -> list[int]:
    with Session(engine) as session:
        return sorted(session.scalars(sa.select(Person.id).where(criterion)).all())


def test_equality_and_inequality(people: sa.Engine) -> None:
    assert _ids(people, Person.email == "b@example.test") == [2, 3]
    assert _ids(people, "b@example.test" == Person.email) == [2, 3]
    assert _ids(people, Person.email != "b@example.test") == [1, 5]
    assert _ids(people, Person.email == "nobody@example.test") == []


def test_in_and_not_in(people: sa.Engine) -> None:
    assert _ids(people, Person.email.in_(["a@example.test", "b@example.test"])) == [1, 2, 3]
    assert _ids(people, Person.email.not_in(["a@example.test", "b@example.test"])) == [5]
    assert _ids(people, Person.email.in_([])) == []


def test_null_and_empty_string_are_distinct(people: sa.Engine) -> None:
    assert _ids(people, Person.email.is_(None)) == [4]
    assert _ids(people, Person.email == None) == [4]  # noqa: E711
    assert _ids(people, Person.email.is_not(None)) == [1, 2, 3, 5]
    assert _ids(people, Person.email == "") == [5]
    compiled = str(sa.select(Person.id).where(Person.email == None))  # noqa: E711
    assert "IS NULL" in compiled


def test_orm_update_and_delete_by_deterministic_value(people: sa.Engine) -> None:
    with Session(people) as session:
        session.execute(
            sa.update(Person).where(Person.email == "a@example.test").values(name="Renamed")
        )
        session.execute(sa.delete(Person).where(Person.email.in_(["b@example.test"])))
        session.commit()
        remaining = session.execute(sa.select(Person.id, Person.name).order_by(Person.id)).all()
    assert [tuple(row) for row in remaining] == [(1, "Renamed"), (4, "D"), (5, "E")]


def test_wrong_type_fails_at_build_time(people: sa.Engine) -> None:
    with pytest.raises(ValueTypeError, match=r"persons\.email"):
        Person.email == b"a@example.test"  # noqa: B015
    with pytest.raises(ValueTypeError, match=r"persons\.email"):
        Person.email.in_(["ok@example.test", 5])


def test_unique_constraint_rejects_duplicate(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    UniqueBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Account(tenant_id="t-acme", login="carol"))
        session.add(Account(tenant_id="t-globex", login="carol"))
        session.commit()
    with Session(engine) as session:
        session.add(Account(tenant_id="t-acme", login="carol"))
        with pytest.raises(sa.exc.IntegrityError):
            session.commit()


def test_lookup_finds_rows_under_every_key_version(
    people: sa.Engine, keyring: InMemoryKeyring
) -> None:
    """During a rotation one SELECT binds the value once per decryptable key
    version, so rows sealed under the old version are still found."""
    keyring.rotate("t-acme")
    with Session(people) as session:
        session.add(Person(id=6, tenant_id="t-acme", name="F", email="dave@example.test"))
        session.commit()
    parameters: list[Any] = []

    def _record(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            parameters.append(params)

    event.listen(people, "before_cursor_execute", _record)
    try:
        found_old = _ids(people, Person.email == "a@example.test")
        found_new = _ids(people, Person.email == "dave@example.test")
        found_both = _ids(people, Person.email.in_(["a@example.test", "dave@example.test"]))
        not_old = _ids(people, Person.email != "a@example.test")
    finally:
        event.remove(people, "before_cursor_execute", _record)
    assert found_old == [1]
    assert found_new == [6]
    assert found_both == [1, 6]
    assert not_old == [2, 3, 5, 6]
    assert len(parameters) == 4
    tokens = _bytes_parameters(parameters[0])
    assert len(tokens) == 2
    assert len(set(tokens)) == 2
    assert len(_bytes_parameters(parameters[2])) == 4

    keyring.retire("t-acme", 1)
    parameters.clear()
    event.listen(people, "before_cursor_execute", _record)
    try:
        assert _ids(people, Person.email == "dave@example.test") == [6]
    finally:
        event.remove(people, "before_cursor_execute", _record)
    assert len(_bytes_parameters(parameters[0])) == 1


def _bytes_parameters(params: Any) -> list[bytes]:
    """Return the parameters of a lookup as bytes; psycopg wraps them in Binary."""
    values = params.values() if isinstance(params, dict) else params
    return [bytes(getattr(value, "obj", value)) for value in values]


def test_lambda_statements_bind_each_call(people: sa.Engine) -> None:
    def find(value: str) -> Any:
        return sa.lambda_stmt(lambda: sa.select(Person.id).where(Person.email == value))

    def rename(person_id: int, new_name: str) -> Any:
        return sa.lambda_stmt(
            lambda: sa.update(Person).where(Person.id == person_id).values(name=new_name)
        )

    with Session(people) as session:
        assert session.scalars(find("a@example.test")).all() == [1]
        assert sorted(session.scalars(find("b@example.test")).all()) == [2, 3]
        session.execute(rename(1, "Renamed Person"))
        session.execute(rename(2, "Second Rename"))
        session.commit()
        assert session.get(Person, 1).name == "Renamed Person"  # type: ignore[union-attr]
        assert session.get(Person, 2).name == "Second Rename"  # type: ignore[union-attr]
    with people.connect() as conn:
        raw = [bytes(value) for value in conn.exec_driver_sql("SELECT name FROM persons").scalars()]
    assert not any(b"Renamed" in value or b"Second" in value for value in raw)


def test_typed_values_are_still_encrypted(people: sa.Engine) -> None:
    """A value bound with a plain type (literal(), bindparam(type_=String))
    is retyped to the column's encrypted type; SQL expressions are refused."""
    with Session(people) as session:
        session.execute(
            sa.update(Person).where(Person.id == 1).values(name=sa.literal("Literal Name"))
        )
        session.execute(
            sa.update(Person).where(Person.id == 2).values(name=sa.bindparam("n", type_=sa.String)),
            {"n": "Typed Name"},
        )
        session.commit()
        assert session.get(Person, 1).name == "Literal Name"  # type: ignore[union-attr]
        assert session.get(Person, 2).name == "Typed Name"  # type: ignore[union-attr]
        with pytest.raises(se.UnsupportedOperationError, match=r"persons\.name"):
            session.execute(sa.update(Person).values(name=Person.tenant_id))
        with pytest.raises(se.UnsupportedOperationError, match=r"persons\.name"):
            session.execute(sa.update(Person).values(name=sa.func.upper("x")))
    with people.connect() as conn:
        raw = [bytes(value) for value in conn.exec_driver_sql("SELECT name FROM persons").scalars()]
    assert not any(b"Name" in value for value in raw)


def test_hand_written_sql_needs_the_column_type(people: sa.Engine) -> None:
    """A plain text query cannot match plaintext; with the column type bound,
    or with search tokens, it can; decrypt() reads raw values."""
    email_type = Person.__table__.c.email.type
    assert isinstance(email_type, DeterministicEncrypted)
    query = "SELECT id, email FROM persons WHERE email = :e"
    with people.connect() as conn:
        plain = conn.execute(sa.text(query), {"e": "a@example.test"}).all()
        typed = conn.execute(
            sa.text(query)
            .bindparams(sa.bindparam("e", type_=email_type))
            .columns(id=sa.Integer, email=email_type),
            {"e": "a@example.test"},
        ).all()
        tokens = email_type.search_tokens("a@example.test")
        by_token = conn.execute(
            sa.text("SELECT id, email FROM persons WHERE email IN :tokens").bindparams(
                sa.bindparam("tokens", expanding=True)
            ),
            {"tokens": tokens},
        ).all()
    assert plain == []
    assert [tuple(row) for row in typed] == [(1, "a@example.test")]
    assert [row.id for row in by_token] == [1]
    assert email_type.decrypt(by_token[0].email) == "a@example.test"


def test_unicode_normalization_is_not_applied(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    """NFC and NFD spellings are different values: no silent normalization."""
    UniqueBase.metadata.create_all(engine)
    nfc = "M\u00fcller"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    with se.tenant_scope("t-acme"), Session(engine) as session:
        session.add(Account(id=1, tenant_id="t-acme", login="m1", surname=nfc))
        session.commit()
        by_nfc = session.scalars(sa.select(Account.id).where(Account.surname == nfc)).all()
        by_nfd = session.scalars(sa.select(Account.id).where(Account.surname == nfd)).all()
    assert by_nfc == [1]
    assert by_nfd == []


def test_bytes_into_string_column_raises(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    UniqueBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Account(id=1, tenant_id="t-acme", login="m1", surname=b"M\xc3\xbcller"))  # type: ignore[arg-type]
        with pytest.raises(ValueTypeError) as caught:
            session.commit()
    assert "accounts.surname" in str(caught.value)
    assert "bytes" in str(caught.value)


def test_str_subclass_seals_like_str(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    UniqueBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Account(id=1, tenant_id="t-acme", login="m1", surname="M\u00fcller"))
        session.add(Account(id=2, tenant_id="t-acme", login="m2", surname=Tag("M\u00fcller")))
        session.commit()
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT surname FROM accounts ORDER BY id").scalars().all()
    assert bytes(stored[0]) == bytes(stored[1])


def test_search_tokens_cover_every_version(keyring: InMemoryKeyring) -> None:
    column_type = Person.__table__.c.email.type
    assert isinstance(column_type, DeterministicEncrypted)
    assert column_type.search_tokens("a@example.test", tenant_id="t-new") == []
    first = column_type.seal("a@example.test", tenant_id="t-new")
    keyring.rotate("t-new", KeyPurpose.DETERMINISTIC)
    second = column_type.seal("a@example.test", tenant_id="t-new")
    tokens = column_type.search_tokens("a@example.test", tenant_id="t-new")
    assert tokens == [second, first]


def test_deterministic_low_cardinality_needs_opt_in() -> None:
    metadata = sa.MetaData()
    with pytest.raises(se.ConfigurationError, match=r"flags\.active") as caught:
        sa.Table("flags", metadata, sa.Column("active", DeterministicEncrypted(sa.Boolean())))
    assert "allow_low_cardinality=True" in str(caught.value)
    with pytest.raises(se.ConfigurationError, match=r"flags\.blood"):
        sa.Table(
            "flags",
            metadata,
            sa.Column("blood", DeterministicEncrypted(sa.Enum("A", "B", "AB", "O", name="b"))),
            extend_existing=True,
        )
    table = sa.Table(
        "opted",
        metadata,
        sa.Column("active", DeterministicEncrypted(sa.Boolean(), allow_low_cardinality=True)),
        sa.Column("note", Encrypted(sa.Boolean())),
    )
    assert isinstance(table.c.active.type, DeterministicEncrypted)


def test_deterministic_length_leak_is_documented(keyring: InMemoryKeyring) -> None:
    """Without padding, stored length follows plaintext length: "O-" and
    "AB+" differ by one byte, as the docs state."""
    column_type = DeterministicEncrypted(sa.String(8), context="donors.blood_type")
    short = column_type.seal("O-", tenant_id="t-acme")
    longer = column_type.seal("AB+", tenant_id="t-acme")
    assert len(longer) - len(short) == 1


class _RelBase(DeclarativeBase):
    pass


class _Customer(_RelBase):
    __tablename__ = "rel_customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    addresses: Mapped[list[_Address]] = sa.orm.relationship(order_by="_Address.id")


class _Address(_RelBase):
    __tablename__ = "rel_addresses"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(sa.ForeignKey("rel_customers.id"))
    postcode: Mapped[str] = mapped_column(DeterministicEncrypted(sa.String(10)))


def test_relationship_criteria_on_deterministic_column(
    engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    # The ORM matches the bound parameters of and_() criteria up with ==,
    # and the criteria must still find values under every key version.
    _RelBase.metadata.create_all(engine)
    with se.tenant_scope("t-acme"), Session(engine) as session:
        session.add_all([_Customer(id=1), _Customer(id=2)])
        session.add(_Address(id=1, customer_id=1, postcode="111"))
        session.commit()
        keyring.rotate("t-acme")
        session.add(_Address(id=2, customer_id=2, postcode="111"))
        session.add(_Address(id=3, customer_id=2, postcode="222"))
        session.commit()

        joined = session.scalars(
            sa.select(_Customer.id)
            .join(_Customer.addresses.and_(_Address.postcode == "111"))
            .order_by(_Customer.id)
        ).all()
        loaded = session.scalars(
            sa.select(_Customer).options(
                sa.orm.selectinload(_Customer.addresses.and_(_Address.postcode == "222"))
            )
        ).all()

    assert joined == [1, 2]
    assert {c.id: [a.id for a in c.addresses] for c in loaded} == {1: [], 2: [3]}
