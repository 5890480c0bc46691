"""Lookups on a deterministic column through explicit bound parameters.

``bindparam(name, value)`` and ``literal(value)`` take the type of their
value (String for a str). Compared with an encrypted column they must be
sealed like a plain value, never sent to the database as plaintext.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import tenant_scope
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .models import Base, Person

SEARCHED = "a@example.test"
OTHER = "b@example.test"

CONDITIONS: dict[str, Callable[[], Any]] = {
    "bindparam with a value": lambda: Person.email == sa.bindparam("e", SEARCHED),
    "literal": lambda: Person.email == sa.literal(SEARCHED),
    "bindparam typed String": lambda: (
        Person.email == sa.bindparam("e", SEARCHED, type_=sa.String(50))
    ),
    "expanding bindparam": lambda: Person.email.in_(sa.bindparam("e", [SEARCHED], expanding=True)),
    "not equal to a bindparam": lambda: Person.email != sa.bindparam("e", OTHER),
}


@pytest.fixture
def people(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            [
                Person(id=1, tenant_id="t-acme", name="A", email=SEARCHED),
                Person(id=2, tenant_id="t-acme", name="B", email=OTHER),
            ]
        )
        session.commit()
    yield engine


def _sent_parameters(engine: sa.Engine, run: Callable[[], Any]) -> tuple[Any, list[Any]]:
    """Run ``run`` and return its result and every parameter value sent to the driver."""
    sent: list[Any] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        rows = parameters if isinstance(parameters, list) else [parameters]
        for row in rows:
            sent.extend(row.values() if isinstance(row, dict) else row)

    event.listen(engine, "before_cursor_execute", record)
    try:
        result = run()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return result, sent


@pytest.mark.parametrize("case", list(CONDITIONS))
def test_bound_parameter_is_sealed(people: sa.Engine, case: str) -> None:
    condition = CONDITIONS[case]()

    def lookup() -> list[int]:
        with Session(people) as session, tenant_scope("t-acme"):
            return list(session.scalars(sa.select(Person.id).where(condition)))

    found, sent = _sent_parameters(people, lookup)

    assert found == [1]
    assert sent
    for value in sent:
        assert not isinstance(value, str), f"parameter sent as text: {value!r}"
        # psycopg wraps bytes in psycopg.Binary, which stores them in .obj.
        data = bytes(getattr(value, "obj", value))
        assert SEARCHED.encode() not in data
        assert OTHER.encode() not in data
