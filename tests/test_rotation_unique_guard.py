"""The unique guard on INSERT and UPDATE statements a session executes.

Each test stores a value under key version 1, rotates the tenant, and then
writes the same value again through a statement, which the database index
cannot catch because the new version seals it into other bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_encrypted import DeterministicEncrypted, DuplicateValueError, tenant_scope
from sqlalchemy_encrypted.rotation import install_unique_guard
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .rotation_support import Base, Contact, raw_values

CAROL = "carol@example.test"
DAVE = "dave@example.test"
ERIN = "erin@example.test"
FRANK = "frank@example.test"

Statement = Callable[[Session], Any]
CONTACTS = Base.metadata.tables["contacts"]


class HandleBase(DeclarativeBase):
    pass


class Handle(HandleBase):
    """A unique constraint over the tenant, a plain column and a deterministic one."""

    __tablename__ = "handles"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "kind", "email", name="uq_handles_tenant_kind_email"),
        {"info": {"tenant_column": "tenant_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    kind: Mapped[str] = mapped_column(sa.String(10), default="home")
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)))


@pytest.fixture
def contacts(engine: sa.Engine, keyring: InMemoryKeyring) -> sa.Engine:
    """Contacts 1 (CAROL) and 2 (DAVE) under version 1, then a rotation."""
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Contact(id=1, tenant_id="t-acme", email=CAROL))
        session.add(Contact(id=2, tenant_id="t-acme", email=DAVE))
        session.commit()
    keyring.rotate("t-acme")
    return engine


@pytest.fixture
def handles(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    """Handles 1 (work, CAROL), 2 (home, DAVE) and 3 (home, ERIN) under
    version 1, then a rotation."""
    HandleBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Handle(id=1, tenant_id="t-acme", kind="work", email=CAROL))
        session.add(Handle(id=2, tenant_id="t-acme", kind="home", email=DAVE))
        session.add(Handle(id=3, tenant_id="t-acme", kind="home", email=ERIN))
        session.commit()
    keyring.rotate("t-acme")
    yield engine
    HandleBase.metadata.drop_all(engine)


def _run_guarded(engine: sa.Engine, statement: Statement) -> None:
    """Run ``statement`` in a guarded session inside the tenant's scope and commit."""
    with tenant_scope("t-acme"), Session(engine) as session:
        install_unique_guard(session)
        statement(session)
        session.commit()


DUPLICATE_STATEMENTS: dict[str, tuple[Statement, str]] = {
    "ORM bulk INSERT": (
        lambda s: s.execute(
            sa.insert(Contact),
            [
                dict(id=3, tenant_id="t-acme", email=ERIN),
                dict(id=4, tenant_id="t-acme", email=CAROL),
            ],
        ),
        "row 2 of the INSERT statement",
    ),
    "insert().values()": (
        lambda s: s.execute(sa.insert(Contact).values(id=3, tenant_id="t-acme", email=CAROL)),
        "the INSERT statement",
    ),
    "insert().values() by attribute": (
        lambda s: s.execute(
            sa.insert(Contact).values(
                {Contact.id: 3, Contact.tenant_id: "t-acme", Contact.email: CAROL}
            )
        ),
        "the INSERT statement",
    ),
    "multi-row insert().values()": (
        lambda s: s.execute(
            sa.insert(Contact).values(
                [
                    dict(id=3, tenant_id="t-acme", email=ERIN),
                    dict(id=4, tenant_id="t-acme", email=CAROL),
                ]
            )
        ),
        "row 2 of the INSERT statement",
    ),
    "insert().values() with a tuple row": (
        lambda s: s.execute(sa.insert(Contact).values([(3, "t-acme", CAROL)])),
        "the INSERT statement",
    ),
    "Core insert() of the Table": (
        lambda s: s.execute(sa.insert(CONTACTS), [dict(id=3, tenant_id="t-acme", email=CAROL)]),
        "the INSERT statement",
    ),
    "ORM bulk UPDATE by primary key": (
        lambda s: s.execute(sa.update(Contact), [dict(id=1, email=CAROL), dict(id=2, email=CAROL)]),
        "row 2 of the UPDATE statement",
    ),
    "update().where().values()": (
        lambda s: s.execute(sa.update(Contact).where(Contact.id == 2).values(email=CAROL)),
        "the UPDATE statement",
    ),
    "update() with SET values as parameters": (
        lambda s: s.execute(sa.update(Contact).where(Contact.id == 2), {"email": CAROL}),
        "the UPDATE statement",
    ),
    "update() with bound parameters": (
        lambda s: s.execute(
            sa.update(Contact)
            .where(Contact.id == sa.bindparam("contact_id"))
            .values(email=sa.bindparam("new_email")),
            {"contact_id": 2, "new_email": CAROL},
        ),
        "the UPDATE statement",
    ),
    "Core executemany UPDATE of the Table": (
        lambda s: s.execute(
            sa.update(CONTACTS)
            .where(CONTACTS.c.id == sa.bindparam("contact_id"))
            .values(email=sa.bindparam("new_email")),
            [{"contact_id": 1, "new_email": CAROL}, {"contact_id": 2, "new_email": CAROL}],
        ),
        "row 2 of the UPDATE statement",
    ),
}


@pytest.mark.parametrize("name", list(DUPLICATE_STATEMENTS))
def test_guard_rejects_statement_duplicate(contacts: sa.Engine, name: str) -> None:
    statement, statement_row = DUPLICATE_STATEMENTS[name]
    before = raw_values(contacts, "contacts", "email")

    with pytest.raises(DuplicateValueError) as caught:
        _run_guarded(contacts, statement)

    message = str(caught.value)
    assert message.startswith("table contacts: ")
    assert "unique column(s) tenant_id, email" in message
    assert "'t-acme'" in message
    assert f"in {statement_row} " in message
    assert "primary key (1,)" in message
    assert CAROL not in message
    assert raw_values(contacts, "contacts", "email") == before


ALLOWED_STATEMENTS: dict[str, Statement] = {
    "ORM bulk INSERT of new values": lambda s: s.execute(
        sa.insert(Contact),
        [dict(id=3, tenant_id="t-acme", email=ERIN), dict(id=4, tenant_id="t-acme", email=FRANK)],
    ),
    "ORM bulk UPDATE of a row to its own value": lambda s: s.execute(
        sa.update(Contact), [dict(id=1, email=CAROL)]
    ),
    "update().where().values() of a row to its own value": lambda s: s.execute(
        sa.update(Contact).where(Contact.id == 1).values(email=CAROL)
    ),
    "update() without WHERE of NULL": lambda s: s.execute(sa.update(Contact).values(email=None)),
}


@pytest.mark.parametrize("name", list(ALLOWED_STATEMENTS))
def test_guard_allows_statement(contacts: sa.Engine, name: str) -> None:
    _run_guarded(contacts, ALLOWED_STATEMENTS[name])


def test_guard_rewrites_own_value_under_new_version(contacts: sa.Engine) -> None:
    before = raw_values(contacts, "contacts", "email")

    _run_guarded(contacts, ALLOWED_STATEMENTS["ORM bulk UPDATE of a row to its own value"])

    after = raw_values(contacts, "contacts", "email")
    assert after[1] != before[1]
    assert after[2] == before[2]


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(
            lambda s: s.execute(sa.update(Handle), [dict(id=3, email=DAVE)]),
            id="ORM bulk UPDATE",
        ),
        pytest.param(
            lambda s: s.execute(sa.update(Handle).where(Handle.id == 3).values(email=DAVE)),
            id="update().where()",
        ),
        pytest.param(
            lambda s: s.execute(sa.insert(Handle), [dict(id=4, tenant_id="t-acme", email=DAVE)]),
            id="INSERT with the column default",
        ),
    ],
)
def test_guard_reads_columns_statement_leaves_out(handles: sa.Engine, statement: Statement) -> None:
    # Handle 3 and the new row have kind "home" (stored, or the column
    # default), like handle 2, which contains DAVE.
    with pytest.raises(DuplicateValueError, match=r"tenant_id, kind, email.*primary key \(2,\)"):
        _run_guarded(handles, statement)


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(
            lambda s: s.execute(sa.update(Handle), [dict(id=1, email=DAVE)]),
            id="ORM bulk UPDATE",
        ),
        pytest.param(
            lambda s: s.execute(sa.update(Handle).where(Handle.id == 1).values(email=DAVE)),
            id="update().where()",
        ),
        pytest.param(
            lambda s: s.execute(
                sa.insert(Handle), [dict(id=4, tenant_id="t-acme", kind="work", email=DAVE)]
            ),
            id="INSERT of another kind",
        ),
    ],
)
def test_guard_allows_value_of_other_kind(handles: sa.Engine, statement: Statement) -> None:
    # Handle 1 and the new row have kind "work"; DAVE is stored for "home" only.
    _run_guarded(handles, statement)


def test_guard_skips_legacy_bulk_methods(contacts: sa.Engine) -> None:
    """The documented gap: Session.bulk_insert_mappings() fires no session event."""
    _run_guarded(
        contacts,
        lambda s: s.bulk_insert_mappings(Contact, [dict(id=3, tenant_id="t-acme", email=CAROL)]),
    )

    assert sorted(raw_values(contacts, "contacts", "email")) == [1, 2, 3]


def test_guard_skips_single_version(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    """With one key version the database index rejects every duplicate
    itself, so the guard sends no query."""
    Base.metadata.create_all(engine)
    _run_guarded(engine, lambda s: s.add(Contact(id=1, tenant_id="t-acme", email=CAROL)))
    selects: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        with pytest.raises(sa.exc.IntegrityError):
            _run_guarded(
                engine,
                lambda s: s.execute(
                    sa.insert(Contact), [dict(id=2, tenant_id="t-acme", email=CAROL)]
                ),
            )
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert selects == []
