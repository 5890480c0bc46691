"""Deterministic lookups and uniqueness while a tenant has two key versions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import DuplicateValueError, tenant_scope
from sqlalchemy_encrypted.rotation import (
    install_unique_guard,
    reencrypt,
    remove_unique_guard,
    retire_key_version,
)
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .rotation_support import Base, Contact, Person, raw_values

CAROL = "carol@example.test"
DAVE = "dave@example.test"


@pytest.fixture
def schema(engine: sa.Engine, keyring: InMemoryKeyring) -> sa.Engine:
    Base.metadata.create_all(engine)
    return engine


class _Statements:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.selects: list[tuple[str, Any]] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            self.selects.append((statement, parameters))


@pytest.fixture
def statements(schema: sa.Engine) -> Iterator[_Statements]:
    recorder = _Statements(schema)
    sa.event.listen(schema, "before_cursor_execute", recorder)
    yield recorder
    sa.event.remove(schema, "before_cursor_execute", recorder)


def _tokens(parameters: Any) -> list[bytes]:
    values = parameters.values() if isinstance(parameters, dict) else parameters
    # psycopg wraps bytes in psycopg.Binary, whose ``obj`` is the bytes.
    values = [getattr(value, "obj", value) for value in values]
    return [bytes(value) for value in values if isinstance(value, bytes | memoryview)]


def _find(engine: sa.Engine, email: str) -> list[int]:
    with Session(engine) as session, tenant_scope("t-acme"):
        return list(session.scalars(sa.select(Person.id).where(Person.email == email)))


def test_lookup_matches_every_version(
    schema: sa.Engine, keyring: InMemoryKeyring, statements: _Statements
) -> None:
    with Session(schema) as session:
        session.add(Person(id=1, tenant_id="t-acme", email=CAROL))
        session.commit()
    keyring.rotate("t-acme")
    with Session(schema) as session:
        session.add(Person(id=2, tenant_id="t-acme", email=DAVE))
        session.commit()
    statements.selects.clear()

    assert _find(schema, CAROL) == [1]
    assert _find(schema, DAVE) == [2]

    assert len(statements.selects) == 2
    carol_select, carol_parameters = statements.selects[0]
    tokens = _tokens(carol_parameters)
    assert len(tokens) == 2
    assert len(set(tokens)) == 2
    assert " IN " in carol_select.upper()


def test_lookup_binds_one_token_after_retirement(
    schema: sa.Engine, keyring: InMemoryKeyring, statements: _Statements
) -> None:
    with Session(schema) as session:
        session.add(Person(id=1, tenant_id="t-acme", email=CAROL))
        session.commit()
    keyring.rotate("t-acme")

    reencrypt(schema, Base, tables=["persons"])
    retire_key_version(schema, Base, keyring, "t-acme", 1)
    statements.selects.clear()

    assert _find(schema, CAROL) == [1]
    assert len(statements.selects) == 1
    assert len(_tokens(statements.selects[0][1])) == 1


def _add_contact(engine: sa.Engine, contact_id: int, email: str, guard: bool = False) -> None:
    with Session(engine) as session:
        if guard:
            install_unique_guard(session)
        session.add(Contact(id=contact_id, tenant_id="t-acme", email=email))
        session.commit()


def test_unique_index_misses_duplicate_across_versions(
    schema: sa.Engine, keyring: InMemoryKeyring
) -> None:
    _add_contact(schema, 1, CAROL)
    with pytest.raises(IntegrityError):
        _add_contact(schema, 2, CAROL)
    keyring.rotate("t-acme")

    # The bytes differ under version 2, so the database index accepts it:
    # this is the gap the guard closes.
    _add_contact(schema, 3, CAROL)

    stored = raw_values(schema, "contacts", "email")
    assert stored[1] != stored[3]


def test_unique_guard_rejects_duplicate_across_versions(
    schema: sa.Engine, keyring: InMemoryKeyring
) -> None:
    _add_contact(schema, 1, CAROL)
    keyring.rotate("t-acme")

    with pytest.raises(DuplicateValueError) as caught:
        _add_contact(schema, 2, CAROL, guard=True)

    message = str(caught.value)
    assert "contacts" in message
    assert "tenant_id, email" in message
    assert "'t-acme'" in message
    assert "(1,)" in message
    assert CAROL not in message
    _add_contact(schema, 3, DAVE, guard=True)
    assert sorted(raw_values(schema, "contacts", "email")) == [1, 3]


def test_unique_guard_checks_updates(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _add_contact(schema, 1, CAROL)
    _add_contact(schema, 2, DAVE)
    keyring.rotate("t-acme")

    with Session(schema) as session:
        install_unique_guard(session)
        dave = session.get(Contact, 2)
        assert dave is not None
        dave.email = CAROL
        with pytest.raises(DuplicateValueError):
            session.commit()
        session.rollback()
        remove_unique_guard(session)


def test_unique_guard_allows_same_row_and_other_tenant(
    schema: sa.Engine, keyring: InMemoryKeyring
) -> None:
    _add_contact(schema, 1, CAROL)
    keyring.rotate("t-acme")

    with Session(schema) as session:
        install_unique_guard(session)
        carol = session.get(Contact, 1)
        assert carol is not None
        carol.email = CAROL
        session.add(Contact(id=2, tenant_id="t-globex", email=CAROL))
        session.commit()


def test_reencrypting_a_duplicate_fails_that_row(
    schema: sa.Engine, keyring: InMemoryKeyring
) -> None:
    _add_contact(schema, 1, CAROL)
    _add_contact(schema, 2, DAVE)
    keyring.rotate("t-acme")
    _add_contact(schema, 3, CAROL)

    result = reencrypt(schema, Base, tables=["contacts"])

    assert result.status == "failed"
    assert [(f.primary_key, f.error_class) for f in result.failures] == [((1,), "IntegrityError")]
    assert result.remaining == {"contacts.email": 1}
    assert result.values_reencrypted == 1
