"""The Keyring as key provider: first keys, lookups, tenants, integrity checks."""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    ConfigurationError,
    DecryptionError,
    Encrypted,
    KeyNotFoundError,
    KeyPurpose,
    KeyringIntegrityError,
    KmsKeyNotFoundError,
    TenantContextError,
    tenant_scope,
)
from sqlalchemy_encrypted.keyring import Keyring, KeyState
from sqlalchemy_encrypted.kms import LocalKms

from .keyring_helpers import (
    CountingKms,
    assert_no_secret,
)
from .models import Base, Person


def _add_person(engine: sa.Engine, tenant: str, name: str, email: str) -> int:
    with Session(engine) as session:
        person = Person(tenant_id=tenant, name=name, email=email)
        session.add(person)
        session.commit()
        return person.id


def _raw(engine: sa.Engine, column: str, person_id: int) -> bytes:
    with engine.connect() as conn:
        value = conn.execute(
            sa.text(f"SELECT {column} FROM persons WHERE id = :id"), {"id": person_id}
        ).scalar_one()
    return bytes(value)


def test_first_write_creates_keys(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    Base.metadata.create_all(engine)
    assert se.get_default_key_provider() is keyring

    person_id = _add_person(engine, "t-acme", "Test Person", "a@example.test")

    keys = keyring.list_keys("t-acme")
    assert sorted(key.purpose for key in keys) == sorted(KeyPurpose)
    assert {key.state for key in keys} == {KeyState.ACTIVE}
    assert {key.version for key in keys} == {1}
    assert all(key.kek_id == keyring.kms.kek_id for key in keys)
    assert all(key.kms_provider == "local" for key in keys)
    header = se.parse_header(_raw(engine, "name", person_id))
    randomized = next(key for key in keys if key.purpose is KeyPurpose.RANDOMIZED)
    assert header.key_id == randomized.key_id
    assert header.key_version == 1


def test_read_with_cold_keyring(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring_factory()
    Base.metadata.create_all(engine)
    person_id = _add_person(engine, "t-acme", "Test Person", "a@example.test")

    fresh = keyring_factory()
    with Session(engine) as session:
        person = session.get(Person, person_id)
        assert person is not None
        assert person.name == "Test Person"
        assert person.email == "a@example.test"
    assert fresh.cache.stats.kms_calls == 2


def test_writes_reuse_active_key_lookup(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory(active_key_ttl=60.0)
    Base.metadata.create_all(engine)
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "encryption_keys" in statement:
            statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        for index in range(50):
            _add_person(engine, "t-acme", f"Person {index}", f"p{index}@example.test")
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    # One lookup and one insert per purpose for the first row, and one look at
    # the KEKs of the table's keys before the first key. None for the other 49.
    assert len(selects) == 3
    assert len(inserts) == 2
    assert keyring.cache.stats.kms_calls == 2


def test_column_names_its_keyring(engine: sa.Engine, tmp_path: Path) -> None:
    """A column bound to a keyring in another database uses it, not the default."""
    kms_one = LocalKms.create(tmp_path / "one.key")
    kms_two = LocalKms.create(tmp_path / "two.key")
    keyring_engine = sa.create_engine(f"sqlite:///{tmp_path}/keyring.db")
    default = Keyring(engine, kms_one)
    default.create_table()
    separate = Keyring(keyring_engine, kms_two, set_default=False)
    separate.create_table()
    metadata = sa.MetaData()
    notes = sa.Table(
        "notes",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(50), keyring=separate)),
        sa.Column("title", Encrypted(sa.String(50))),
    )
    metadata.create_all(engine)

    with tenant_scope("t-acme"), engine.begin() as conn:
        conn.execute(notes.insert(), {"id": 1, "body": "secret body", "title": "a title"})
    with engine.connect() as conn:
        row = conn.execute(sa.select(notes.c.body, notes.c.title)).one()
    assert row.body == "secret body"
    assert row.title == "a title"

    assert [key.purpose for key in separate.list_keys("t-acme")] == [KeyPurpose.RANDOMIZED]
    assert [key.purpose for key in default.list_keys("t-acme")] == [KeyPurpose.RANDOMIZED]
    with engine.connect() as conn:
        tables = sa.inspect(conn).get_table_names()
    assert "encryption_keys" in tables
    with engine.connect() as conn:
        raw_body = bytes(conn.execute(sa.text("SELECT body FROM notes")).scalar_one())
    body_key = se.parse_header(raw_body).key_id
    assert body_key == separate.list_keys("t-acme")[0].key_id
    keyring_engine.dispose()


def test_keyring_in_separate_database(engine: sa.Engine, tmp_path: Path) -> None:
    keyring_engine = sa.create_engine(f"sqlite:///{tmp_path}/keyring.db")
    keyring = Keyring(keyring_engine, LocalKms.create(tmp_path / "master.key"))
    keyring.create_table()
    Base.metadata.create_all(engine)

    person_id = _add_person(engine, "t-acme", "Test Person", "a@example.test")

    with engine.connect() as conn:
        assert "encryption_keys" not in sa.inspect(conn).get_table_names()
    assert len(keyring.list_keys("t-acme")) == 2
    keyring.cache.clear()
    with Session(engine) as session:
        person = session.get(Person, person_id)
        assert person is not None
        assert person.name == "Test Person"
    keyring_engine.dispose()


def test_flush_of_several_tenants(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    Base.metadata.create_all(engine)
    tenants = ["t-acme", "t-globex", "t-initech"]

    with Session(engine) as session:
        session.add_all(
            [Person(tenant_id=t, name=f"name of {t}", email=f"x@{t}.test") for t in tenants]
        )
        session.commit()

    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT tenant_id, name, email FROM persons")).all()
    assert len(rows) == 3
    for tenant, name, email in rows:
        keys = {key.key_id: key for key in keyring.list_keys(tenant)}
        for stored in (name, email):
            header = se.parse_header(bytes(stored))
            assert header.key_id in keys
            assert keys[header.key_id].tenant_id == tenant
    with Session(engine) as session:
        loaded = {p.tenant_id: p.name for p in session.scalars(sa.select(Person))}
    assert loaded == {t: f"name of {t}" for t in tenants}


def test_row_tenant_mismatch_with_scope(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    Base.metadata.create_all(engine)
    with Session(engine) as session, tenant_scope("t-acme"):
        session.add(Person(tenant_id="t-globex", name="Test Person", email="a@example.test"))
        with pytest.raises(TenantContextError, match="t-globex"):
            session.commit()
    assert keyring.list_keys("t-globex") == []


def test_no_tenant_raises(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    metadata = sa.MetaData()
    notes = sa.Table(
        "notes",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(50))),
    )
    metadata.create_all(engine)
    # Errors of this package are not wrapped in StatementError (DontWrapMixin).
    with pytest.raises(TenantContextError), engine.begin() as conn:
        conn.execute(notes.insert(), {"id": 1, "body": "no tenant"})
    assert keyring.list_keys() == []

    se.set_default_tenant("single")
    with engine.begin() as conn:
        conn.execute(notes.insert(), {"id": 1, "body": "default tenant"})
    assert [key.tenant_id for key in keyring.list_keys()] == ["single"]


def test_other_tenant_cannot_read(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    counting = CountingKms(local_kms)
    keyring_factory(engine, counting)
    Base.metadata.create_all(engine)
    acme_id = _add_person(engine, "t-acme", "Test Person", "shared@example.test")

    keyring = keyring_factory(engine, counting)  # cold cache
    counting.unwrapped.clear()
    with Session(engine) as session, tenant_scope("t-globex"):
        with pytest.raises(TenantContextError) as caught:
            session.get(Person, acme_id)
        assert "Test Person" not in str(caught.value)
        assert counting.unwrapped["t-acme"] == 0
        found = session.scalars(
            sa.select(Person).where(Person.email == "shared@example.test")
        ).all()
        assert found == []

    globex_id = _add_person(engine, "t-globex", "Other Person", "shared@example.test")
    assert _raw(engine, "email", acme_id) != _raw(engine, "email", globex_id)
    for tenant, expected in (("t-acme", acme_id), ("t-globex", globex_id)):
        with Session(engine) as session, tenant_scope(tenant):
            ids = session.scalars(
                sa.select(Person.id).where(Person.email == "shared@example.test")
            ).all()
        assert ids == [expected]
    assert counting.unwrapped["t-acme"] == 1
    assert keyring.cache.stats.size >= 2


def test_key_by_id_other_tenant_before_unwrap(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    counting = CountingKms(LocalKms.from_key_material(bytes(range(32))))
    keyring = keyring_factory(engine, counting)
    key = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    keyring.cache.clear()
    before = counting.calls["unwrap"]

    with pytest.raises(TenantContextError, match="t-acme"):
        keyring.key_by_id(key.key_id, expected_tenant="t-globex")
    assert counting.calls["unwrap"] == before

    assert keyring.key_by_id(key.key_id, expected_tenant="t-acme").key_id == key.key_id
    with pytest.raises(TenantContextError):
        keyring.key_by_id(key.key_id, expected_tenant="t-globex")


def test_copied_value_fails_in_other_row(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring_factory()
    Base.metadata.create_all(engine)
    acme_id = _add_person(engine, "t-acme", "Test Person", "a@example.test")
    globex_id = _add_person(engine, "t-globex", "Other Person", "b@example.test")
    stolen = _raw(engine, "name", acme_id)
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE persons SET name = :v WHERE id = :id"), {"v": stolen, "id": globex_id}
        )
    with Session(engine) as session, tenant_scope("t-globex"):
        with pytest.raises(TenantContextError):
            session.get(Person, globex_id)


def test_unknown_key_id(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    missing = uuid.uuid4()
    with pytest.raises(KeyNotFoundError, match=str(missing)):
        keyring.key_by_id(missing)


def test_unknown_key_id_in_stored_value(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring_factory()
    Base.metadata.create_all(engine)
    person_id = _add_person(engine, "t-acme", "Test Person", "a@example.test")
    stored = bytearray(_raw(engine, "name", person_id))
    missing = uuid.uuid4()
    stored[4:20] = missing.bytes
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE persons SET name = :v WHERE id = :id"),
            {"v": bytes(stored), "id": person_id},
        )
    with Session(engine) as session:
        with pytest.raises(KeyNotFoundError, match=str(missing)):
            session.get(Person, person_id)


def test_key_check_mismatch(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    """A wrapped DEK swapped for another one under the same KEK fails the key check."""
    keyring = keyring_factory()
    key = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    other = keyring.kms.generate_data_key(32, keyring._store.get(key.key_id).context)  # type: ignore[union-attr]
    with keyring.engine.begin() as conn:
        conn.execute(
            keyring.table.update()
            .where(keyring.table.c.key_id == key.key_id)
            .values(wrapped_dek=other.wrapped)
        )
    keyring.cache.clear()
    with pytest.raises(KeyringIntegrityError) as caught:
        keyring.key_by_id(key.key_id)
    message = str(caught.value)
    assert str(key.key_id) in message
    assert "t-acme" in message
    assert isinstance(caught.value, DecryptionError)
    assert other.plaintext.hex() not in message


def test_restored_keyring_row(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    """A keyring row from another environment: data fails as DecryptionError, not Unicode."""
    keyring = keyring_factory()
    Base.metadata.create_all(engine)
    person_id = _add_person(engine, "t-acme", "Test Person", "a@example.test")
    info = next(k for k in keyring.list_keys("t-acme") if k.purpose is KeyPurpose.RANDOMIZED)
    row = keyring._store.get(info.key_id)
    assert row is not None
    other = keyring.kms.generate_data_key(32, row.context)
    with keyring.engine.begin() as conn:
        conn.execute(
            keyring.table.update()
            .where(keyring.table.c.key_id == info.key_id)
            .values(
                wrapped_dek=other.wrapped,
                key_check=se.keyring.key_check_value(
                    other.plaintext, info.key_id, KeyPurpose.RANDOMIZED
                ),
            )
        )
    keyring.cache.clear()
    with Session(engine) as session:
        with pytest.raises(DecryptionError) as caught:
            session.get(Person, person_id)
    message = str(caught.value)
    assert not isinstance(caught.value, UnicodeDecodeError)
    assert "persons.name" in message
    assert "t-acme" in message
    assert "key version 1" in message


def test_missing_kek_is_kms_error(
    engine: sa.Engine, keyring_factory: type[Keyring], tmp_path: Path
) -> None:
    keyring_factory()
    Base.metadata.create_all(engine)
    person_id = _add_person(engine, "t-acme", "Test Person", "a@example.test")
    keyring_factory(engine, LocalKms.create(tmp_path / "other.key", kek="kek-b"))
    with Session(engine) as session:
        with pytest.raises(KmsKeyNotFoundError) as caught:
            session.get(Person, person_id)
    message = str(caught.value)
    assert "kek-a" in message
    assert "t-acme" in message
    assert not isinstance(caught.value, DecryptionError)


def test_sqlite_locked_keyring_is_explained(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/one.db", connect_args={"timeout": 0.2})
    keyring = Keyring(engine, LocalKms.create(tmp_path / "master.key"))
    keyring.create_table()
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(tenant_id="t-acme", name="A", email="a@example.test"))
        session.flush()
        session.add(Person(tenant_id="t-globex", name="B", email="b@example.test"))
        with pytest.raises(ConfigurationError, match="provision"):
            session.flush()

    keyring.provision("t-globex")
    with Session(engine) as session:
        session.add(Person(tenant_id="t-acme", name="A", email="a@example.test"))
        session.flush()
        session.add(Person(tenant_id="t-globex", name="B", email="b@example.test"))
        session.commit()
    engine.dispose()


def test_key_holders_refuse_pickling(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    key = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    row = keyring._store.get(key.key_id)
    assert row is not None and row.wrapped_dek is not None
    dek = keyring.kms.unwrap(row.wrapped_dek, row.context, row.kek_id)
    entry = next(iter(keyring.cache._entries.values()))
    for holder in (keyring, keyring.kms, keyring.cache, entry, key, key.cipher):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(holder)
        assert_no_secret(repr(holder) + str(holder), [dek, row.wrapped_dek])
    assert_no_secret(repr(row) + repr(row.info()), [dek, row.wrapped_dek])
