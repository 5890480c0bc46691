"""A key version is retired only when the census finds no value under it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    KeyDestroyedError,
    KeyInUseError,
    KeyNotFoundError,
    KeyPurpose,
    KeyStateError,
)
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.rotation import (
    census,
    check_key_unused,
    reencrypt,
    retire_key_version,
)
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .rotation_support import NOTE_TYPE, Base, Invoice, Note, Person, fill_persons


@pytest.fixture
def rotated(engine: sa.Engine, keyring: InMemoryKeyring) -> sa.Engine:
    """Persons, invoices and an external column, all of t-acme under version 1,
    then a rotation of t-acme to version 2."""
    Base.metadata.create_all(engine)
    fill_persons(engine, 6)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Invoice.__table__),
            [{"id": i, "tenant_id": "t-acme", "iban": f"DE{i:020d}"} for i in range(1, 4)],
        )
        conn.execute(
            sa.insert(Note.__table__),
            [{"id": i, "blob": NOTE_TYPE.seal(f"note {i}", tenant_id="t-acme")} for i in (1, 2)],
        )
    keyring.rotate("t-acme")
    return engine


def test_census_lists_columns_left_behind(rotated: sa.Engine) -> None:
    reencrypt(rotated, Base, tables=["persons"])

    report = census(rotated, Base, tenants=["t-acme"])

    by_column = {}
    for entry in report:
        by_column.setdefault(entry.label, set()).add(entry.key_version)
    assert by_column == {
        "persons.name": {2},
        "persons.email": {2},
        "invoices.iban": {1},
        "notes.blob": {1},
    }


def test_retire_refuses_while_values_remain(rotated: sa.Engine, keyring: InMemoryKeyring) -> None:
    reencrypt(rotated, Base, tables=["persons"])

    with pytest.raises(KeyInUseError) as caught:
        retire_key_version(rotated, Base, keyring, "t-acme", 1)

    message = str(caught.value)
    assert "invoices.iban: 3" in message
    assert "notes.blob: 2" in message
    assert "persons" not in message
    assert "'t-acme'" in message
    assert caught.value.references == {"invoices.iban": 3, "notes.blob": 2}
    # Nothing was retired: version 1 still decrypts.
    assert keyring.decryptable_keys("t-acme", KeyPurpose.RANDOMIZED)[-1].version == 1


def test_retire_after_full_reencryption(rotated: sa.Engine, keyring: InMemoryKeyring) -> None:
    old_key = keyring.decryptable_keys("t-acme", KeyPurpose.RANDOMIZED)[-1]
    reencrypt(rotated, Base, tables=["persons"])
    reencrypt(rotated, Base, tables=["invoices", "notes"])

    retire_key_version(rotated, Base, keyring, "t-acme", 1)

    with pytest.raises(KeyNotFoundError, match="retired"):
        keyring.key_by_id(old_key.key_id)


def test_retire_check_per_purpose(rotated: sa.Engine, keyring: InMemoryKeyring) -> None:
    reencrypt(rotated, Base, columns=["persons.email"])

    check_key_unused(rotated, Base, "t-acme", 1, KeyPurpose.DETERMINISTIC)
    with pytest.raises(KeyInUseError, match="randomized key version 1"):
        check_key_unused(rotated, Base, "t-acme", 1, KeyPurpose.RANDOMIZED)


def test_other_tenant_does_not_block(rotated: sa.Engine) -> None:
    reencrypt(rotated, Base, tenants=["t-acme"])

    check_key_unused(rotated, Base, "t-acme", 1)
    with pytest.raises(KeyInUseError, match=r"persons\.name: 3"):
        check_key_unused(rotated, Base, "t-globex", 1)


def test_retire_shredded_tenant_is_destroyed(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    """Values under a shredded tenant's keys cannot be re-encrypted, so the
    error must not advise it."""
    keyring = keyring_factory()
    Base.metadata.create_all(engine)
    fill_persons(engine, 4)
    keyring.shred("t-globex")

    with pytest.raises(KeyDestroyedError) as caught:
        retire_key_version(engine, Base, keyring, "t-globex", 1)

    message = str(caught.value)
    assert "tenant 't-globex'" in message
    assert "destroyed (crypto-shredded)" in message
    assert "4 stored value(s)" in message
    assert "re-encrypt" not in message


@pytest.fixture(params=["in_memory", "keyring"])
def any_keyring(
    request: pytest.FixtureRequest, keyring: InMemoryKeyring, keyring_factory: type[Keyring]
) -> InMemoryKeyring | Keyring:
    """The in-memory keyring, or a real one installed as the default provider."""
    if request.param == "in_memory":
        return keyring
    real = keyring_factory(active_key_ttl=0)
    se.set_default_key_provider(real)
    return real


def _rotate(keyring: InMemoryKeyring | Keyring, tenant: str, purpose: KeyPurpose) -> None:
    if isinstance(keyring, Keyring):
        keyring.rotate(tenant, purpose, activate_now=True)
    else:
        keyring.rotate(tenant, purpose)


def _states(keyring: InMemoryKeyring | Keyring, tenant: str, purpose: KeyPurpose) -> list[int]:
    return sorted(key.version for key in keyring.decryptable_keys(tenant, purpose))


def test_retire_skips_purpose_still_active(
    engine: sa.Engine, any_keyring: InMemoryKeyring | Keyring
) -> None:
    """Only the deterministic keys were rotated: version 1 is retired there,
    while the randomized values stay under their active version 1."""
    Base.metadata.create_all(engine)
    fill_persons(engine, 4)
    _rotate(any_keyring, "t-acme", KeyPurpose.DETERMINISTIC)
    reencrypt(engine, Base, columns=["persons.email"])

    retired = retire_key_version(engine, Base, any_keyring, "t-acme", 1, min_inactive_seconds=0)

    assert [(key.purpose, key.version) for key in retired] == [(KeyPurpose.DETERMINISTIC, 1)]
    assert _states(any_keyring, "t-acme", KeyPurpose.DETERMINISTIC) == [2]
    assert _states(any_keyring, "t-acme", KeyPurpose.RANDOMIZED) == [1]
    with Session(engine) as session, se.tenant_scope("t-acme"):
        query = sa.select(Person.name).where(Person.tenant_id == "t-acme").order_by(Person.id)
        names = session.scalars(query).all()
    assert names == ["Person 2", "Person 4"]


def test_retire_every_purpose_active_fails(
    engine: sa.Engine, any_keyring: InMemoryKeyring | Keyring
) -> None:
    Base.metadata.create_all(engine)
    fill_persons(engine, 4)

    with pytest.raises(KeyStateError) as caught:
        retire_key_version(engine, Base, any_keyring, "t-acme", 1)

    message = str(caught.value)
    assert "randomized version 1 is active" in message
    assert "deterministic version 1 is active" in message
    assert "rotate the tenant's keys and re-encrypt" not in message
    assert _states(any_keyring, "t-acme", KeyPurpose.RANDOMIZED) == [1]


def test_retire_other_purpose_not_decrypt_only(
    engine: sa.Engine, any_keyring: InMemoryKeyring | Keyring
) -> None:
    """Randomized values use active version 1 and the deterministic purpose
    has version 1 active too, but no values: nothing can be retired."""
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Person.__table__), [{"id": 1, "tenant_id": "t-acme", "name": "A"}])
    any_keyring.active_key("t-acme", KeyPurpose.DETERMINISTIC)

    with pytest.raises(KeyStateError) as caught:
        retire_key_version(engine, Base, any_keyring, "t-acme", 1)

    message = str(caught.value)
    assert "randomized version 1 is active" in message
    assert "deterministic" in message
    assert _states(any_keyring, "t-acme", KeyPurpose.DETERMINISTIC) == [1]


def test_retire_blocked_by_decrypt_only_values(
    engine: sa.Engine, any_keyring: InMemoryKeyring | Keyring
) -> None:
    Base.metadata.create_all(engine)
    fill_persons(engine, 4)
    _rotate(any_keyring, "t-acme", KeyPurpose.DETERMINISTIC)

    with pytest.raises(KeyInUseError) as caught:
        retire_key_version(engine, Base, any_keyring, "t-acme", 1, min_inactive_seconds=0)

    assert caught.value.references == {"persons.email": 2}
    assert "deterministic key version 1" in str(caught.value)


def test_in_memory_rotate_only_used_purposes(keyring: InMemoryKeyring) -> None:
    keyring.active_key("t-acme", KeyPurpose.DETERMINISTIC)

    keyring.rotate("t-acme")
    keyring.rotate("t-new")

    assert _states(keyring, "t-acme", KeyPurpose.DETERMINISTIC) == [1, 2]
    assert _states(keyring, "t-acme", KeyPurpose.RANDOMIZED) == []
    assert _states(keyring, "t-new", KeyPurpose.RANDOMIZED) == [1]
    assert _states(keyring, "t-new", KeyPurpose.DETERMINISTIC) == [1]
