from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import tenant_scope

from .models import Base, Person


def test_person_round_trip(engine: sa.Engine, keyring: object) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(tenant_id="t-acme", name="Test Person", email="a@example.test"))
        session.commit()
        session.expunge_all()
        with tenant_scope("t-acme"):
            found = session.scalars(sa.select(Person).where(Person.email == "a@example.test")).one()
        assert found.name == "Test Person"
    with engine.connect() as conn:
        raw = conn.exec_driver_sql("SELECT name FROM persons").scalar_one()
    assert b"Test Person" not in bytes(raw)
