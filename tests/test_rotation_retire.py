"""A key version is retired only when the census finds no value under it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from sqlalchemy_encrypted import KeyDestroyedError, KeyInUseError, KeyNotFoundError, KeyPurpose
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.rotation import (
    census,
    check_key_unused,
    reencrypt,
    retire_key_version,
)
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .rotation_support import NOTE_TYPE, Base, Invoice, Note, fill_persons


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
