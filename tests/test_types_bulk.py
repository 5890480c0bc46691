"""Bulk write paths encrypt every row, each under its own tenant."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted.envelope import parse_header
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import count_statements
from .models import Base, Person

ROWS = 30


@pytest.fixture
def db(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    yield engine


def _rows(
    prefix: str, tenants: tuple[str, ...] = ("t-acme", "t-globex")
) -> list[dict[str, object]]:
    return [
        {
            "id": number,
            "tenant_id": tenants[number % len(tenants)],
            "name": f"{prefix} Name {number:03}",
            "email": f"{prefix.lower()}{number:03}@example.test",
        }
        for number in range(1, ROWS + 1)
    ]


def _assert_stored_encrypted(engine: sa.Engine, rows: list[dict[str, object]]) -> None:
    """Check raw bytes hold no plaintext, and each value names its row's tenant's key."""
    with engine.connect() as conn:
        raw = conn.exec_driver_sql("SELECT id, tenant_id, name, email FROM persons").all()
    by_id = {row["id"]: row for row in rows}
    key_tenants: dict[object, str] = {}
    for row_id, tenant, name, email in raw:
        expected = by_id[row_id]
        for stored, plain in ((name, expected["name"]), (email, expected["email"])):
            data = bytes(stored)
            assert str(plain).encode() not in data
            key_id = parse_header(data).key_id
            assert key_tenants.setdefault(key_id, tenant) == tenant
    assert len(raw) == len(rows)


def _assert_readable(engine: sa.Engine, rows: list[dict[str, object]]) -> None:
    for tenant in {str(row["tenant_id"]) for row in rows}:
        expected = sorted(
            (int(str(row["id"])), row["name"], row["email"])
            for row in rows
            if row["tenant_id"] == tenant
        )
        with se.tenant_scope(tenant), Session(engine) as session:
            found = session.execute(
                sa.select(Person.id, Person.name, Person.email)
                .where(Person.tenant_id == tenant)
                .order_by(Person.id)
            ).all()
            assert [tuple(row) for row in found] == expected
            first = expected[0]
            by_email = session.scalars(sa.select(Person.id).where(Person.email == first[2]))
            assert by_email.all() == [first[0]]


def test_core_executemany(db: sa.Engine) -> None:
    rows = _rows("Core")
    with db.begin() as conn:
        conn.execute(sa.insert(Person.__table__), rows)
    _assert_stored_encrypted(db, rows)
    _assert_readable(db, rows)


def test_orm_add_all_uses_insertmanyvalues(db: sa.Engine) -> None:
    rows = _rows("Orm")
    with count_statements(db) as counter, Session(db) as session:
        session.add_all([Person(**row) for row in rows])  # type: ignore[arg-type]
        session.commit()
    inserts = [s for s in counter.statements if s.lstrip().upper().startswith("INSERT")]
    # insertmanyvalues sends the rows in batched multi-row INSERT statements.
    assert 1 <= len(inserts) < ROWS
    _assert_stored_encrypted(db, rows)
    _assert_readable(db, rows)


def test_orm_add_all_with_returning(db: sa.Engine) -> None:
    """Rows without explicit ids get them back through INSERT ... RETURNING."""
    rows = _rows("Returning")
    people = []
    with Session(db) as session:
        for row in rows:
            values = dict(row)
            values.pop("id")
            people.append(Person(**values))  # type: ignore[arg-type]
        session.add_all(people)
        session.flush()
        ids = [person.id for person in people]
        session.commit()
    assert len(set(ids)) == ROWS
    for person_id, row in zip(ids, rows, strict=True):
        row["id"] = person_id
    _assert_stored_encrypted(db, rows)
    _assert_readable(db, rows)


def test_orm_bulk_insert(db: sa.Engine) -> None:
    rows = _rows("Bulk")
    with Session(db) as session:
        session.execute(sa.insert(Person), rows)
        session.commit()
    _assert_stored_encrypted(db, rows)
    _assert_readable(db, rows)


def test_orm_bulk_update_by_primary_key(db: sa.Engine) -> None:
    rows = _rows("Before")
    with Session(db) as session:
        session.execute(sa.insert(Person), rows)
        session.commit()
    updated = _rows("After")
    with Session(db) as session:
        session.execute(sa.update(Person), updated)
        session.commit()
    _assert_stored_encrypted(db, updated)
    _assert_readable(db, updated)


def test_orm_bulk_update_in_tenant_scope(db: sa.Engine) -> None:
    """Rows without their tenant key are sealed under the scoped tenant."""
    rows = _rows("Scoped", tenants=("t-acme",))
    with Session(db) as session:
        session.execute(sa.insert(Person), rows)
        session.commit()
    changes = [{"id": row["id"], "name": f"Renamed {row['id']}"} for row in rows]
    with se.tenant_scope("t-acme"), Session(db) as session:
        session.execute(sa.update(Person), changes)
        session.commit()
    for row, change in zip(rows, changes, strict=True):
        row["name"] = change["name"]
    _assert_stored_encrypted(db, rows)
    _assert_readable(db, rows)


def test_orm_bulk_update_without_tenant_raises(db: sa.Engine) -> None:
    rows = _rows("Unscoped", tenants=("t-acme",))
    with Session(db) as session:
        session.execute(sa.insert(Person), rows)
        session.commit()
    with Session(db) as session:
        with pytest.raises(se.TenantContextError):
            session.execute(sa.update(Person), [{"id": 1, "name": "No Tenant"}])


def test_multi_row_values_of_one_tenant(db: sa.Engine) -> None:
    rows = _rows("Values", tenants=("t-acme",))
    with se.tenant_scope("t-acme"), db.begin() as conn:
        conn.execute(sa.insert(Person.__table__).values(rows))
    _assert_stored_encrypted(db, rows)
    _assert_readable(db, rows)


def test_multi_row_values_of_other_tenant_raises(db: sa.Engine) -> None:
    rows = _rows("Mixed")
    with se.tenant_scope("t-acme"), db.begin() as conn:
        with pytest.raises(se.TenantContextError, match="t-globex"):
            conn.execute(sa.insert(Person.__table__).values(rows))
