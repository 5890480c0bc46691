"""Statement caching, reprs and compiled SQL: settings only, never secrets."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.sql.cache_key import NO_CACHE

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    DeterministicEncrypted,
    Encrypted,
    UnsupportedOperationError,
)
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import assert_no_secret, exception_texts, record_key_material
from .models import Base, Person


class AuditedEncrypted(Encrypted[Any]):
    """A user subclass that sets no cache_ok of its own."""


def _variant_tables() -> tuple[sa.Table, sa.Table]:
    metadata = sa.MetaData()
    first = sa.Table(
        "contacts_a",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", DeterministicEncrypted(sa.String(254), context="contacts.email")),
        sa.Column("note", AuditedEncrypted(sa.String(100))),
    )
    second = sa.Table(
        "contacts_b",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", DeterministicEncrypted(sa.String(254), context="archive.email")),
        sa.Column("note", AuditedEncrypted(sa.String(100))),
    )
    return first, second


def test_no_cache_warning_for_types_and_subclasses(engine: sa.Engine, keyring: Any) -> None:
    first, second = _variant_tables()
    first.metadata.create_all(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.exc.SAWarning)
        for table in (first, second):
            for column in table.c:
                key = column.type._static_cache_key
                assert key is not NO_CACHE
                hash(key)
        with se.tenant_scope("t-acme"), engine.begin() as conn:
            conn.execute(first.insert(), [{"id": 1, "email": "a@example.test", "note": "x"}])
            conn.execute(sa.select(first).where(first.c.email == "a@example.test")).all()


def test_second_execution_uses_statement_cache(
    engine: sa.Engine, keyring: InMemoryKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(tenant_id="t-acme", name="Test Person", email="a@example.test"))
        session.commit()
    engine.echo = True
    try:
        with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"), engine.connect() as conn:
            with se.tenant_scope("t-acme"):
                for _ in range(2):
                    caplog.clear()
                    rows = conn.execute(
                        sa.select(Person.__table__).where(Person.email == "a@example.test")
                    ).all()
                    assert len(rows) == 1
    finally:
        engine.echo = False
    assert any("cached since" in record.getMessage() for record in caplog.records)


def test_option_variants_do_not_share_bind_processing(
    engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    """Two deterministic columns that differ only in their context= get
    their own compiled statements: each lookup finds its own row."""
    first, second = _variant_tables()
    first.metadata.create_all(engine)
    with se.tenant_scope("t-acme"), engine.begin() as conn:
        conn.execute(first.insert(), [{"id": 1, "email": "same@example.test"}])
        conn.execute(second.insert(), [{"id": 2, "email": "same@example.test"}])
        raw_first = conn.exec_driver_sql("SELECT email FROM contacts_a").scalar_one()
        raw_second = conn.exec_driver_sql("SELECT email FROM contacts_b").scalar_one()
        assert bytes(raw_first) != bytes(raw_second)
        for table, expected in ((first, 1), (second, 2)):
            text = sa.text("SELECT id FROM " + table.name + " WHERE email = :e").bindparams(
                sa.bindparam("e", type_=table.c.email.type)
            )
            for _ in range(2):
                found = conn.execute(text, {"e": "same@example.test"}).scalars().all()
                assert found == [expected]


def test_cache_keys_differ_by_column_identity() -> None:
    first, second = _variant_tables()
    assert first.c.email.type._static_cache_key != second.c.email.type._static_cache_key
    assert first.c.note.type._static_cache_key != second.c.note.type._static_cache_key
    assert Encrypted(sa.String(10))._static_cache_key == Encrypted(sa.String(10))._static_cache_key


def test_repr_and_cache_key_keyless(
    engine: sa.Engine, keyring: InMemoryKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = record_key_material(monkeypatch)
    Base.metadata.create_all(engine)
    explicit = InMemoryKeyring()
    column_types: list[Any] = [
        Person.__table__.c.name.type,
        Person.__table__.c.email.type,
        Encrypted(sa.String(10), keyring=explicit, context="x.y"),
        DeterministicEncrypted(sa.String(10), storage="base64", context="x.z"),
    ]
    with se.tenant_scope("t-acme"), Session(engine) as session:
        session.add(Person(tenant_id="t-acme", name="Test Person", email="a@example.test"))
        session.commit()
        statement = sa.select(Person).where(Person.email == "a@example.test")
        session.execute(statement).all()
        cache_key = statement._generate_cache_key()
        compiled = statement.compile(engine)
        texts = [repr(t) for t in column_types]
        texts += [repr(t._static_cache_key) for t in column_types]
        texts += [repr(cache_key), str(compiled), repr(compiled.params)]
    assert len(created) >= 2
    assert_no_secret(texts, *created, "Test Person", "a@example.test")
    assert repr(column_types[2]) == (
        "Encrypted(String(length=10), context='x.y', keyring=<InMemoryKeyring>)"
    )


def test_literal_binds_never_render_plaintext(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    Base.metadata.create_all(engine)
    # Give the tenant its keys, so the deterministic lookups have tokens to render.
    keyring.active_key("t-acme", se.KeyPurpose.DETERMINISTIC)
    statements = [
        sa.insert(Person).values(tenant_id="t-acme", name="Test Person", email="a@example.test"),
        sa.update(Person).where(Person.id == 1).values(name="Test Person"),
        sa.select(Person.id).where(Person.email == "a@example.test"),
        sa.select(Person.id).where(Person.email.in_(["a@example.test", "b@example.test"])),
    ]
    for statement in statements:
        with se.tenant_scope("t-acme"):
            with pytest.raises(UnsupportedOperationError) as caught:
                statement.compile(engine, compile_kwargs={"literal_binds": True})
        assert_no_secret(exception_texts(caught.value), "Test Person", "a@example.test")
        assert "cannot be rendered as a SQL literal" in str(caught.value)
        assert "Test Person" not in str(statement)
        assert "a@example.test" not in str(statement)
