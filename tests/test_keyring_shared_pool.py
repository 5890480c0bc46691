"""A Keyring on an engine whose pool shares one connection with the application.

StaticPool gives every user of an engine the same DBAPI connection, and
SingletonThreadPool (the default for in-memory SQLite) does so within a
thread. A Keyring on the application's own engine would then commit or roll
back the application's transaction, so a session that flushed a row and
then wrote a new tenant's first value committed only the later row. The
keyring raises ConfigurationError instead, before it reads or writes
anything, and leaves the application's transaction as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.pool import AssertionPool, SingletonThreadPool, StaticPool

from sqlalchemy_encrypted import ConfigurationError, KeyPurpose
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

from .models import Base, Person

SHARED_ENGINES: dict[str, Callable[[Path], sa.Engine]] = {
    "in-memory, StaticPool": lambda _: sa.create_engine("sqlite://", poolclass=StaticPool),
    # SQLAlchemy's default pool for in-memory SQLite is SingletonThreadPool.
    "in-memory, default pool": lambda _: sa.create_engine("sqlite://"),
    "file, StaticPool": lambda path: sa.create_engine(
        f"sqlite:///{path}/app.db", poolclass=StaticPool
    ),
    "file, SingletonThreadPool": lambda path: sa.create_engine(
        f"sqlite:///{path}/app.db", poolclass=SingletonThreadPool
    ),
}


@pytest.fixture(params=sorted(SHARED_ENGINES))
def shared_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    engine = SHARED_ENGINES[request.param](tmp_path)
    yield engine
    engine.dispose()


def _keyring(engine: sa.Engine, kms: LocalKms) -> Keyring:
    keyring = Keyring(engine, kms)
    keyring.create_table()
    Base.metadata.create_all(engine)
    return keyring


def _person_rows(engine: sa.Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, tenant_id FROM persons ORDER BY id"))
        return [(row[0], row[1]) for row in rows]


def _key_tenants(keyring: Keyring) -> list[str]:
    return sorted({key.tenant_id for key in keyring.list_keys()})


def _insert_person(conn: sa.Connection, person_id: int, tenant_id: str) -> None:
    conn.execute(
        sa.insert(Person).values(id=person_id, tenant_id=tenant_id, name=f"person {person_id}")
    )


def _assert_shared_message(error: ConfigurationError, pool: str) -> None:
    message = str(error)
    assert message.startswith(
        "the keyring cannot use its engine for keyring table encryption_keys: "
        f"the engine's {pool} gives the keyring the connection of another user"
    )
    assert "inside a transaction" in message
    assert "The keyring read and wrote nothing" in message
    assert "Create the Keyring on an engine of its own" in message
    assert "InMemoryKeyring" in message


def test_shared_pool_session_flush_rejected(shared_engine: sa.Engine, local_kms: LocalKms) -> None:
    keyring = _keyring(shared_engine, local_kms)

    with Session(shared_engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Ada"))
        session.flush()
        # The first value of t-globex needs the keyring table while the
        # session's transaction contains row 1.
        session.add(Person(id=2, tenant_id="t-globex", name="Grace"))
        with pytest.raises(ConfigurationError) as caught:
            session.flush()

    _assert_shared_message(caught.value, type(shared_engine.pool).__name__)
    assert "Grace" not in str(caught.value)
    assert _person_rows(shared_engine) == []
    assert _key_tenants(keyring) == ["t-acme"]


def test_shared_pool_keeps_caller_transaction(
    shared_engine: sa.Engine, local_kms: LocalKms
) -> None:
    keyring = _keyring(shared_engine, local_kms)
    keyring.provision("t-acme")

    with shared_engine.connect() as conn:
        _insert_person(conn, 1, "t-acme")
        with pytest.raises(ConfigurationError):
            _insert_person(conn, 2, "t-globex")
        with pytest.raises(ConfigurationError):
            keyring.list_keys()
        # t-acme's key is cached, so this write needs no keyring table.
        _insert_person(conn, 3, "t-acme")
        with pytest.raises(ConfigurationError):
            keyring.rotate("t-acme")
        conn.commit()

    assert _person_rows(shared_engine) == [(1, "t-acme"), (3, "t-acme")]
    assert _key_tenants(keyring) == ["t-acme"]
    assert {key.version for key in keyring.list_keys()} == {1}


def test_shared_pool_works_between_transactions(
    shared_engine: sa.Engine, local_kms: LocalKms
) -> None:
    keyring = _keyring(shared_engine, local_kms)

    # Each tenant's first key is created while the session's connection has
    # not begun a database transaction yet, before its first INSERT.
    with Session(shared_engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Ada"))
        session.commit()
    with Session(shared_engine) as session:
        session.add(Person(id=2, tenant_id="t-globex", name="Grace"))
        session.commit()

    assert _person_rows(shared_engine) == [(1, "t-acme"), (2, "t-globex")]
    assert _key_tenants(keyring) == ["t-acme", "t-globex"]
    keyring.cache.clear()
    with Session(shared_engine) as session:
        names = session.scalars(sa.select(Person.name).order_by(Person.id)).all()
    assert names == ["Ada", "Grace"]


def test_assertion_pool_checked_out_rejected(tmp_path: Path, local_kms: LocalKms) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/app.db", poolclass=AssertionPool)
    keyring = _keyring(engine, local_kms)
    # Caches t-acme's active key and reserves its first block of seals, so
    # that its writes need no keyring table.
    keyring.provision("t-acme")
    keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)

    with engine.connect() as conn:
        _insert_person(conn, 1, "t-acme")
        with pytest.raises(ConfigurationError) as caught:
            _insert_person(conn, 2, "t-globex")
        conn.commit()

    message = str(caught.value)
    assert message.startswith(
        "the keyring cannot use its engine for keyring table encryption_keys: the engine's "
        "AssertionPool allows one checked-out connection, and another user of the engine has it."
    )
    assert "Create the Keyring on an engine of its own" in message
    assert _person_rows(engine) == [(1, "t-acme")]
    assert _key_tenants(keyring) == ["t-acme"]
    engine.dispose()


@pytest.mark.parametrize("poolclass", [StaticPool, SingletonThreadPool, AssertionPool])
def test_keyring_on_own_single_connection_engine(
    local_kms: LocalKms, poolclass: type[sa.Pool]
) -> None:
    app_engine = sa.create_engine("sqlite://", poolclass=StaticPool)
    keyring = Keyring(sa.create_engine("sqlite://", poolclass=poolclass), local_kms)
    keyring.create_table()
    Base.metadata.create_all(app_engine)

    with Session(app_engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Ada"))
        session.flush()
        session.add(Person(id=2, tenant_id="t-globex", name="Grace"))
        session.flush()
        session.commit()

    assert _person_rows(app_engine) == [(1, "t-acme"), (2, "t-globex")]
    keyring.rotate("t-acme", KeyPurpose.RANDOMIZED, activate_now=True)
    # No other process uses this keyring, so the wait after a rotation is not needed.
    assert keyring.retire("t-acme", 1, KeyPurpose.RANDOMIZED, min_inactive_seconds=0)
    assert keyring.shred("t-globex") == 1
    states = {(key.tenant_id, key.version): key.state.value for key in keyring.list_keys()}
    assert states[("t-acme", 1)] == "retired"
    assert states[("t-acme", 2)] == "active"
    assert states[("t-globex", 1)] == "destroyed"
    keyring.engine.dispose()
    app_engine.dispose()


def test_postgresql_shared_queue_pool_unaffected(pg_engine: sa.Engine, local_kms: LocalKms) -> None:
    # QueuePool gives each checkout a connection of its own, so the keyring
    # may share the application's engine.
    keyring = _keyring(pg_engine, local_kms)

    with Session(pg_engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Ada"))
        session.flush()
        session.add(Person(id=2, tenant_id="t-globex", name="Grace"))
        session.flush()
        session.commit()

    assert _person_rows(pg_engine) == [(1, "t-acme"), (2, "t-globex")]
    assert _key_tenants(keyring) == ["t-acme", "t-globex"]


def test_postgresql_shared_static_pool_rejected(pg_engine: sa.Engine, local_kms: LocalKms) -> None:
    engine = sa.create_engine(
        pg_engine.url, poolclass=StaticPool, connect_args={"options": _search_path(pg_engine)}
    )
    keyring = _keyring(engine, local_kms)
    keyring.provision("t-acme")

    with engine.connect() as conn:
        _insert_person(conn, 1, "t-acme")
        with pytest.raises(ConfigurationError) as caught:
            _insert_person(conn, 2, "t-globex")
        conn.commit()

    _assert_shared_message(caught.value, "StaticPool")
    assert _person_rows(engine) == [(1, "t-acme")]
    assert _key_tenants(keyring) == ["t-acme"]
    engine.dispose()


def _search_path(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
    return f"-c search_path={schema}"
