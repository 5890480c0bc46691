"""The unique guard's batched lookups on statements and flushes of many rows.

Each test stores contacts under key version 1 and rotates the tenant, so
the guard looks up every written value under versions 1 and 2.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import DuplicateValueError, tenant_scope
from sqlalchemy_encrypted.rotation import install_unique_guard
from sqlalchemy_encrypted.rotation.unique_lookup import MAX_BATCH_PARAMETERS
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import count_statements
from .rotation_support import Base, Contact, raw_values

CAROL = "carol@example.test"
DAVE = "dave@example.test"
ROW_COUNT = 500


@pytest.fixture
def contacts(engine: sa.Engine, keyring: InMemoryKeyring) -> sa.Engine:
    """Contacts 1 (CAROL, t-acme) and 2 (DAVE, t-beta) under version 1,
    then a rotation of both tenants."""
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Contact(tenant_id="t-acme", email=CAROL))
        session.flush()
        session.add(Contact(tenant_id="t-beta", email=DAVE))
        session.commit()
    keyring.rotate("t-acme")
    keyring.rotate("t-beta")
    return engine


def _new_rows(count: int, *, with_ids: bool = True) -> list[dict[str, Any]]:
    rows = [{"tenant_id": "t-acme", "email": f"user{n}@example.test"} for n in range(count)]
    if with_ids:
        for n, row in enumerate(rows):
            row["id"] = 100 + n
    return rows


def _selects(statements: list[str]) -> list[str]:
    return [s for s in statements if s.lstrip().upper().startswith("SELECT")]


@pytest.mark.parametrize("with_ids", [True, False], ids=["with ids", "without ids"])
def test_bulk_insert_batches_lookups(contacts: sa.Engine, with_ids: bool) -> None:
    rows = _new_rows(ROW_COUNT, with_ids=with_ids)

    with tenant_scope("t-acme"), Session(contacts) as session:
        install_unique_guard(session)
        with count_statements(contacts) as counter:
            session.execute(sa.insert(Contact), rows)
        session.commit()

    # Each row costs at most 4 parameters (tenant, two key versions, its
    # primary key), so 500 rows fit in 3 batches.
    assert len(_selects(counter.statements)) <= 3
    assert len(raw_values(contacts, "contacts", "email")) == ROW_COUNT + 2


def test_flush_batches_lookups(contacts: sa.Engine) -> None:
    with tenant_scope("t-acme"), Session(contacts) as session:
        install_unique_guard(session)
        session.add_all(Contact(**row) for row in _new_rows(ROW_COUNT))
        with count_statements(contacts) as counter:
            session.flush()
        session.commit()

    # The lookups of new objects match the value and tenant only: 3
    # parameters a row, so 500 rows fit in 2 batches.
    assert len(_selects(counter.statements)) <= 2


@pytest.mark.parametrize("position", [1, 250, ROW_COUNT])
def test_bulk_insert_names_duplicate_row(contacts: sa.Engine, position: int) -> None:
    rows = _new_rows(ROW_COUNT)
    rows[position - 1]["email"] = CAROL
    before = raw_values(contacts, "contacts", "email")

    with tenant_scope("t-acme"), Session(contacts) as session:
        install_unique_guard(session)
        with pytest.raises(DuplicateValueError) as caught:
            session.execute(sa.insert(Contact), rows)

    message = str(caught.value)
    assert f"in row {position} of the INSERT statement " in message
    assert "primary key (1,)" in message
    assert CAROL not in message
    assert raw_values(contacts, "contacts", "email") == before


def test_bulk_insert_names_first_duplicate(contacts: sa.Engine) -> None:
    rows = _new_rows(ROW_COUNT)
    rows[400]["email"] = CAROL
    rows[450]["email"] = CAROL

    with tenant_scope("t-acme"), Session(contacts) as session:
        install_unique_guard(session)
        with pytest.raises(DuplicateValueError, match=r"in row 401 of the INSERT statement "):
            session.execute(sa.insert(Contact), rows)


def test_bulk_insert_matches_tenant_per_row(contacts: sa.Engine) -> None:
    # DAVE is stored for t-beta only, so t-acme may take it. CAROL is
    # stored for t-acme only, so t-beta may take it, but not t-acme.
    rows = _new_rows(10)
    rows[3].update(tenant_id="t-beta", email=CAROL)
    rows[5].update(email=DAVE)
    with Session(contacts) as session:
        install_unique_guard(session)
        session.execute(sa.insert(Contact), rows)
        session.rollback()

    rows[7].update(tenant_id="t-beta", email=DAVE)
    with Session(contacts) as session:
        install_unique_guard(session)
        with pytest.raises(DuplicateValueError) as caught:
            session.execute(sa.insert(Contact), rows)

    message = str(caught.value)
    assert "'t-beta' in row 8 of the INSERT statement " in message
    assert "primary key (2,)" in message


def test_flush_names_duplicate_object(contacts: sa.Engine) -> None:
    with tenant_scope("t-acme"), Session(contacts) as session:
        install_unique_guard(session)
        objects = [Contact(**row) for row in _new_rows(ROW_COUNT)]
        objects[300].email = CAROL
        session.add_all(objects)
        with pytest.raises(DuplicateValueError, match=r"primary key \(1,\)"):
            session.flush()


def test_batch_stays_below_parameter_limit(contacts: sa.Engine) -> None:
    compiled_sizes: list[int] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            compiled_sizes.append(len(parameters))

    sa.event.listen(contacts, "before_cursor_execute", record)
    try:
        with tenant_scope("t-acme"), Session(contacts) as session:
            install_unique_guard(session)
            session.execute(sa.insert(Contact), _new_rows(2 * ROW_COUNT))
            session.rollback()
    finally:
        sa.event.remove(contacts, "before_cursor_execute", record)

    assert compiled_sizes
    assert max(compiled_sizes) <= MAX_BATCH_PARAMETERS
