"""The unique guard on partial indexes, upserts, renames and async sessions.

Each test stores values under key version 1 and rotates the tenant, so the
guard runs its lookups, and then writes something the database accepts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_encrypted import DeterministicEncrypted, DuplicateValueError, tenant_scope
from sqlalchemy_encrypted.rotation import install_unique_guard, remove_unique_guard, unique
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .rotation_support import Base, Contact

CAROL = "carol@example.test"
DAVE = "dave@example.test"
ERIN = "erin@example.test"


class GuardCaseBase(DeclarativeBase):
    pass


class Account(GuardCaseBase):
    """E-mail unique among the rows not soft-deleted (a partial unique index)."""

    __tablename__ = "guard_accounts"
    __table_args__ = (
        sa.Index(
            "uq_guard_accounts_live_email",
            "tenant_id",
            "email",
            unique=True,
            postgresql_where=sa.text("deleted = false"),
            sqlite_where=sa.text("deleted = 0"),
        ),
        {"info": {"tenant_column": "tenant_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    deleted: Mapped[bool] = mapped_column(default=False)
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)))


class Badge(GuardCaseBase):
    """A unique constraint whose NULLs are equal on PostgreSQL 15 and later."""

    __tablename__ = "guard_badges"
    __table_args__ = (
        sa.UniqueConstraint(
            "tenant_id", "kind", "email", name="uq_guard_badges", postgresql_nulls_not_distinct=True
        ),
        {"info": {"tenant_column": "tenant_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    kind: Mapped[str | None] = mapped_column(sa.String(10))
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)))


@pytest.fixture
def tables(engine: sa.Engine) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    GuardCaseBase.metadata.create_all(engine)
    yield engine
    GuardCaseBase.metadata.drop_all(engine)


def _seed(engine: sa.Engine, keyring: InMemoryKeyring, *rows: Any) -> None:
    """Store ``rows`` under key version 1, then rotate the tenant."""
    with tenant_scope("t-acme"), Session(engine) as session:
        session.add_all(rows)
        session.commit()
    keyring.rotate("t-acme")


def _emails(engine: sa.Engine, model: Any) -> list[str | None]:
    with tenant_scope("t-acme"), Session(engine) as session:
        return list(session.scalars(sa.select(model.email).order_by(model.id)))


def _insert(engine: sa.Engine, model: Any) -> Any:
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(model)


# -- partial unique index ------------------------------------------------------


def test_partial_index_allows_flush_reuse(tables: sa.Engine, keyring: InMemoryKeyring) -> None:
    _seed(tables, keyring, Account(id=1, tenant_id="t-acme", email=CAROL, deleted=True))

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        session.add(Account(id=2, tenant_id="t-acme", email=CAROL))
        session.commit()

    assert _emails(tables, Account) == [CAROL, CAROL]


def test_partial_index_allows_statement_reuse(tables: sa.Engine, keyring: InMemoryKeyring) -> None:
    _seed(tables, keyring, Account(id=1, tenant_id="t-acme", email=CAROL, deleted=True))

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        session.execute(sa.insert(Account), [dict(id=2, tenant_id="t-acme", email=CAROL)])
        session.commit()

    assert _emails(tables, Account) == [CAROL, CAROL]


def test_partial_index_rejects_live_duplicate(tables: sa.Engine, keyring: InMemoryKeyring) -> None:
    _seed(tables, keyring, Account(id=1, tenant_id="t-acme", email=CAROL))

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        session.add(Account(id=2, tenant_id="t-acme", email=CAROL))
        with pytest.raises(DuplicateValueError, match=r"guard_accounts.*primary key \(1,\)"):
            session.flush()


# -- upserts -------------------------------------------------------------------


def _store_under_new_version(engine: sa.Engine, contact: Contact) -> None:
    with tenant_scope("t-acme"), Session(engine) as session:
        session.add(contact)
        session.commit()


def test_upsert_conflict_on_guarded_constraint(tables: sa.Engine, keyring: InMemoryKeyring) -> None:
    _seed(tables, keyring, Contact(id=1, tenant_id="t-acme", email=CAROL))
    _store_under_new_version(tables, Contact(id=2, tenant_id="t-acme", email=DAVE))
    upsert = (
        _insert(tables, Contact)
        .values(id=3, tenant_id="t-acme", email=DAVE)
        .on_conflict_do_update(index_elements=["tenant_id", "email"], set_={"tenant_id": "t-acme"})
    )

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        session.execute(upsert)
        session.commit()

    assert _emails(tables, Contact) == [CAROL, DAVE]


def test_upsert_do_nothing_on_conflict(tables: sa.Engine, keyring: InMemoryKeyring) -> None:
    _seed(tables, keyring, Contact(id=1, tenant_id="t-acme", email=CAROL))
    _store_under_new_version(tables, Contact(id=2, tenant_id="t-acme", email=DAVE))
    upsert = (
        _insert(tables, Contact)
        .values(id=3, tenant_id="t-acme", email=DAVE)
        .on_conflict_do_nothing()
    )

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        session.execute(upsert)
        session.commit()

    assert _emails(tables, Contact) == [CAROL, DAVE]


def test_upsert_rejects_set_duplicate(tables: sa.Engine, keyring: InMemoryKeyring) -> None:
    _seed(
        tables,
        keyring,
        Contact(id=1, tenant_id="t-acme", email=CAROL),
        Contact(id=2, tenant_id="t-acme", email=DAVE),
    )
    upsert = (
        _insert(tables, Contact)
        .values(id=2, tenant_id="t-acme", email=ERIN)
        .on_conflict_do_update(index_elements=["id"], set_={"email": CAROL})
    )

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        with pytest.raises(DuplicateValueError, match=r"DO UPDATE SET.*primary key \(1,\)"):
            session.execute(upsert)

    assert _emails(tables, Contact) == [CAROL, DAVE]


def test_upsert_set_own_value_allowed(tables: sa.Engine, keyring: InMemoryKeyring) -> None:
    _seed(tables, keyring, Contact(id=1, tenant_id="t-acme", email=CAROL))
    upsert = (
        _insert(tables, Contact)
        .values(id=1, tenant_id="t-acme", email=CAROL)
        .on_conflict_do_update(index_elements=["id"], set_={"email": CAROL})
    )

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        session.execute(upsert)
        session.commit()

    assert _emails(tables, Contact) == [CAROL]


# -- rename and reuse in one write ---------------------------------------------


def test_flush_rename_then_reuse(tables: sa.Engine, keyring: InMemoryKeyring) -> None:
    _seed(tables, keyring, Contact(id=1, tenant_id="t-acme", email=CAROL))

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        first = session.get(Contact, 1)
        assert first is not None
        first.email = DAVE
        session.add(Contact(id=2, tenant_id="t-acme", email=CAROL))
        session.commit()

    assert _emails(tables, Contact) == [DAVE, CAROL]


def test_bulk_update_rename_then_reuse(tables: sa.Engine, keyring: InMemoryKeyring) -> None:
    _seed(
        tables,
        keyring,
        Contact(id=1, tenant_id="t-acme", email=CAROL),
        Contact(id=2, tenant_id="t-acme", email=ERIN),
    )

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        session.execute(sa.update(Contact), [dict(id=1, email=DAVE), dict(id=2, email=CAROL)])
        session.commit()

    assert _emails(tables, Contact) == [DAVE, CAROL]


def test_bulk_update_keep_then_reuse_rejected(tables: sa.Engine, keyring: InMemoryKeyring) -> None:
    # Row 1 is written with its own value, so it still contains CAROL.
    _seed(
        tables,
        keyring,
        Contact(id=1, tenant_id="t-acme", email=CAROL),
        Contact(id=2, tenant_id="t-acme", email=ERIN),
    )

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        with pytest.raises(DuplicateValueError, match=r"row 2 of the UPDATE.*primary key \(1,\)"):
            session.execute(sa.update(Contact), [dict(id=1, email=CAROL), dict(id=2, email=CAROL)])


def test_update_matching_no_row_allowed(tables: sa.Engine, keyring: InMemoryKeyring) -> None:
    _seed(tables, keyring, Contact(id=1, tenant_id="t-acme", email=CAROL))

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        result = session.execute(sa.update(Contact).where(Contact.id == 99).values(email=CAROL))
        session.commit()

    assert result.rowcount == 0  # type: ignore[attr-defined]


# -- NULLS NOT DISTINCT --------------------------------------------------------


def test_nulls_not_distinct_duplicate(tables: sa.Engine, keyring: InMemoryKeyring) -> None:
    if tables.dialect.name != "postgresql":
        pytest.skip("NULLS NOT DISTINCT is a PostgreSQL 15 option")
    _seed(tables, keyring, Badge(id=1, tenant_id="t-acme", kind=None, email=CAROL))

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        session.add(Badge(id=2, tenant_id="t-acme", kind=None, email=CAROL))
        with pytest.raises(DuplicateValueError, match=r"guard_badges.*primary key \(1,\)"):
            session.flush()


# -- async sessions ------------------------------------------------------------


def _async_engine(engine: sa.Engine) -> AsyncEngine:
    if engine.dialect.name == "sqlite":
        return create_async_engine(engine.url.set(drivername="sqlite+aiosqlite"))
    with engine.connect() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    return create_async_engine(engine.url, connect_args={"options": f"-c search_path={schema}"})


@pytest.mark.parametrize("target", ["AsyncSession", "async_sessionmaker"])
def test_async_targets_guarded(tables: sa.Engine, keyring: InMemoryKeyring, target: str) -> None:
    _seed(tables, keyring, Contact(id=1, tenant_id="t-acme", email=CAROL))
    async_engine = _async_engine(tables)

    async def write_duplicate() -> None:
        maker = async_sessionmaker(async_engine)
        if target == "async_sessionmaker":
            install_unique_guard(maker)
        async with maker() as session:
            if target == "AsyncSession":
                install_unique_guard(session)
            with tenant_scope("t-acme"):
                session.add(Contact(id=2, tenant_id="t-acme", email=CAROL))
                await session.commit()

    try:
        with pytest.raises(DuplicateValueError, match=r"primary key \(1,\)"):
            asyncio.run(write_duplicate())
    finally:
        asyncio.run(async_engine.dispose())

    assert _emails(tables, Contact) == [CAROL]


def test_async_sessionmaker_guard_is_its_own(tables: sa.Engine) -> None:
    """Guarding one async_sessionmaker leaves plain Sessions unguarded."""
    maker = async_sessionmaker(_async_engine(tables))

    install_unique_guard(maker)

    assert not sa.event.contains(Session, "before_flush", unique._before_flush)
    assert maker.kw["sync_session_class"] is not Session


def test_guard_rejects_other_targets() -> None:
    with pytest.raises(TypeError, match="AsyncSession or async_sessionmaker, not str"):
        install_unique_guard("session")  # type: ignore[arg-type]


@pytest.mark.parametrize("clause", ["do_nothing", "do_update"])
def test_upsert_rejects_old_version_holder(
    tables: sa.Engine, keyring: InMemoryKeyring, clause: str
) -> None:
    # CAROL is stored under version 1 only, so the database detects no
    # conflict and would insert a second row.
    _seed(tables, keyring, Contact(id=1, tenant_id="t-acme", email=CAROL))
    insert = _insert(tables, Contact).values(id=2, tenant_id="t-acme", email=CAROL)
    if clause == "do_nothing":
        upsert = insert.on_conflict_do_nothing()
    else:
        upsert = insert.on_conflict_do_update(
            index_elements=["tenant_id", "email"], set_={"tenant_id": "t-acme"}
        )

    with tenant_scope("t-acme"), Session(tables) as session:
        install_unique_guard(session)
        with pytest.raises(DuplicateValueError, match=r"the INSERT statement.*primary key \(1,\)"):
            session.execute(upsert)

    assert _emails(tables, Contact) == [CAROL]


def test_remove_guard_of_unguarded_maker(tables: sa.Engine) -> None:
    """Removing the guard of an unguarded async_sessionmaker keeps Session's."""
    install_unique_guard(Session)
    try:
        remove_unique_guard(async_sessionmaker(_async_engine(tables)))

        assert sa.event.contains(Session, "before_flush", unique._before_flush)
    finally:
        remove_unique_guard(Session)
