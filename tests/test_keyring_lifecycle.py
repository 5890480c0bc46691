"""Key lifecycle: rotate, promote, rewrap, retire, shred, and the audit log."""

from __future__ import annotations

import datetime
import hashlib
import logging
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    KeyDestroyedError,
    KeyNotFoundError,
    KeyPendingError,
    KeyPurpose,
    KeyStateError,
    tenant_scope,
)
from sqlalchemy_encrypted.keyring import Keyring, KeyState
from sqlalchemy_encrypted.kms import LocalKms

from .keyring_helpers import (
    CountingKms,
    FakeClock,
    assert_no_secret,
    log_text,
)
from .models import Base, Person


def _add(engine: sa.Engine, tenant: str, name: str, email: str) -> int:
    with Session(engine) as session:
        person = Person(tenant_id=tenant, name=name, email=email)
        session.add(person)
        session.commit()
        return person.id


def _raw_rows(engine: sa.Engine) -> list[tuple[int, bytes, bytes]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, name, email FROM persons ORDER BY id")).all()
    return [(row[0], bytes(row[1]), bytes(row[2])) for row in rows]


def _versions(keyring: Keyring, tenant: str, purpose: KeyPurpose) -> dict[int, KeyState]:
    return {k.version: k.state for k in keyring.list_keys(tenant) if k.purpose is purpose}


def _name_version(engine: sa.Engine, person_id: int) -> int:
    raw = {row[0]: row[1] for row in _raw_rows(engine)}[person_id]
    return se.parse_header(raw).key_version


def test_rotate_activate_now(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    Base.metadata.create_all(engine)
    old_id = _add(engine, "t-acme", "Old Person", "old@example.test")

    created = keyring.rotate("t-acme", activate_now=True)

    assert sorted(k.purpose for k in created) == sorted(KeyPurpose)
    assert {k.version for k in created} == {2}
    assert _versions(keyring, "t-acme", KeyPurpose.RANDOMIZED) == {
        1: KeyState.DECRYPT_ONLY,
        2: KeyState.ACTIVE,
    }
    new_id = _add(engine, "t-acme", "New Person", "new@example.test")
    assert _name_version(engine, old_id) == 1
    assert _name_version(engine, new_id) == 2
    with Session(engine) as session, tenant_scope("t-acme"):
        assert session.get(Person, old_id).name == "Old Person"  # type: ignore[union-attr]
        found = session.scalars(sa.select(Person).where(Person.email == "old@example.test"))
        assert [p.id for p in found] == [old_id]


def test_rotate_pending_then_promoted(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    clock = FakeClock()
    wall = [datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)]
    keyring = keyring_factory(active_key_ttl=60.0, clock=clock, wall_clock=lambda: wall[0])
    Base.metadata.create_all(engine)
    _add(engine, "t-acme", "First", "first@example.test")

    keyring.rotate("t-acme", KeyPurpose.RANDOMIZED)
    assert _versions(keyring, "t-acme", KeyPurpose.RANDOMIZED) == {
        1: KeyState.ACTIVE,
        2: KeyState.PENDING,
    }
    with pytest.raises(KeyStateError, match="pending"):
        keyring.rotate("t-acme", KeyPurpose.RANDOMIZED)
    pending_id = _add(engine, "t-acme", "During", "during@example.test")
    assert _name_version(engine, pending_id) == 1
    assert keyring.promote_pending() == []

    clock.advance(61)
    wall[0] += datetime.timedelta(seconds=61)
    promoted_id = _add(engine, "t-acme", "After", "after@example.test")
    assert _name_version(engine, promoted_id) == 2
    assert _versions(keyring, "t-acme", KeyPurpose.RANDOMIZED) == {
        1: KeyState.DECRYPT_ONLY,
        2: KeyState.ACTIVE,
    }


def test_rotate_pending_error_names_api(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory(active_key_ttl=60.0)
    keyring.provision("t-acme")
    keyring.rotate("t-acme", KeyPurpose.DETERMINISTIC)

    with pytest.raises(KeyPendingError) as caught:
        keyring.rotate("t-acme", KeyPurpose.DETERMINISTIC)

    assert isinstance(caught.value, KeyStateError)
    assert caught.value.tenant_id == "t-acme"
    assert caught.value.purpose == "deterministic"
    assert caught.value.version == 2
    assert "promote_pending" in str(caught.value)
    assert "activate_now=True" in str(caught.value)


def test_promote_pending_explicit(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory(active_key_ttl=0)
    keyring.provision("t-acme")
    keyring.rotate("t-acme", KeyPurpose.DETERMINISTIC)
    promoted = keyring.promote_pending("t-acme")
    assert [(k.purpose, k.version, k.state) for k in promoted] == [
        (KeyPurpose.DETERMINISTIC, 2, KeyState.ACTIVE)
    ]
    assert keyring.active_key("t-acme", KeyPurpose.DETERMINISTIC).version == 2


def test_pending_key_decrypts(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    """A process that already promoted a key writes with it; others must read that."""
    slow = keyring_factory(active_key_ttl=3600)
    slow.provision("t-acme")
    slow.rotate("t-acme", KeyPurpose.RANDOMIZED)
    pending = next(k for k in slow.list_keys("t-acme") if k.state is KeyState.PENDING)
    assert slow.key_by_id(pending.key_id).version == 2
    versions = [k.version for k in slow.decryptable_keys("t-acme", KeyPurpose.RANDOMIZED)]
    assert versions == [1, 2]


def test_rewrap_to_new_local_kek(
    engine: sa.Engine, keyring_factory: type[Keyring], tmp_path: Path
) -> None:
    key_file = tmp_path / "rotating.key"
    old_kms = LocalKms.create(key_file, kek="kek-2024")
    keyring_factory(engine, old_kms)
    Base.metadata.create_all(engine)
    for index in range(20):
        _add(engine, "t-acme", f"Person {index}", f"p{index}@example.test")
    _add(engine, "t-globex", "Other", "o@example.test")
    before = _raw_rows(engine)
    digests = [hashlib.sha256(row[1]).hexdigest() for row in before]

    new_kms = LocalKms.add_kek(key_file, "kek-2025")
    keyring = keyring_factory(engine, old_kms)
    assert keyring.rewrap(new_kms) == 4
    assert {k.kek_id for k in keyring.list_keys()} == {new_kms.kek_id}
    assert all(k.kek_id == new_kms.kek_id for k in keyring.list_keys())
    assert _raw_rows(engine) == before

    LocalKms.remove_kek(key_file, "kek-2024")
    counting = CountingKms(LocalKms(key_file))
    cold = keyring_factory(engine, counting)
    for _ in range(2):
        with Session(engine) as session:
            assert session.get(Person, 1).name == "Person 0"  # type: ignore[union-attr]
            assert session.get(Person, 1).name == "Person 0"  # type: ignore[union-attr]
    with Session(engine) as session:
        names = [p.name for p in session.scalars(sa.select(Person).order_by(Person.id))]
    assert names == [f"Person {i}" for i in range(20)] + ["Other"]
    assert [hashlib.sha256(row[1]).hexdigest() for row in _raw_rows(engine)] == digests
    # One unwrap per DEK in this process: 2 for t-acme, 2 for t-globex.
    assert counting.calls["unwrap"] == 4
    assert cold.cache.stats.kms_calls == 4


def test_rewrap_one_tenant(
    engine: sa.Engine, keyring_factory: type[Keyring], tmp_path: Path
) -> None:
    keyring = keyring_factory()
    keyring.provision("t-acme")
    keyring.provision("t-globex")
    other = LocalKms.create(tmp_path / "other.key", kek="kek-z")
    assert keyring.rewrap(other, tenant_id="t-acme") == 2
    keks = {(k.tenant_id, k.kek_id) for k in keyring.list_keys()}
    assert keks == {("t-acme", other.kek_id), ("t-globex", keyring.kms.kek_id)}
    assert keyring.kms.kek_id != other.kek_id
    keyring.cache.clear()
    assert keyring.active_key("t-acme", KeyPurpose.RANDOMIZED).version == 1
    assert keyring.active_key("t-globex", KeyPurpose.RANDOMIZED).version == 1


def test_shred_tenant(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    Base.metadata.create_all(engine)
    acme_id = _add(engine, "t-acme", "Test Person", "a@example.test")
    globex_id = _add(engine, "t-globex", "Other Person", "b@example.test")
    keyring.rotate("t-acme", activate_now=True)

    assert keyring.shred("t-acme") == 4

    keys = keyring.list_keys("t-acme")
    assert len(keys) == 4
    assert {k.state for k in keys} == {KeyState.DESTROYED}
    assert all(k.destroyed_at is not None for k in keys)
    with engine.connect() as conn:
        wrapped = conn.execute(
            sa.select(keyring.table.c.wrapped_dek).where(keyring.table.c.tenant_id == "t-acme")
        ).scalars()
        assert list(wrapped) == [None] * 4
    with Session(engine) as session:
        with pytest.raises(KeyDestroyedError, match="t-acme"):
            session.get(Person, acme_id)
    with Session(engine) as session:
        assert session.get(Person, globex_id).name == "Other Person"  # type: ignore[union-attr]
    with pytest.raises(KeyDestroyedError, match="t-acme"):
        _add(engine, "t-acme", "New Person", "n@example.test")
    # A lookup fails as a read does, rather than finding no row.
    with Session(engine) as session, tenant_scope("t-acme"):
        with pytest.raises(KeyDestroyedError, match="t-acme"):
            session.scalars(sa.select(Person).where(Person.email == "a@example.test")).all()
        statement = sa.select(Person).where(Person.email == sa.bindparam("e"))
        with pytest.raises(KeyDestroyedError, match="t-acme"):
            session.scalars(statement, {"e": "a@example.test"}).all()
    with pytest.raises(KeyDestroyedError):
        keyring.rotate("t-acme")
    cold = keyring_factory()
    with Session(engine) as session:
        with pytest.raises(KeyDestroyedError, match="t-acme"):
            session.get(Person, acme_id)
    assert cold.shred("t-acme") == 0


def test_retire_version(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    keyring.provision("t-acme")
    with pytest.raises(KeyStateError, match="active"):
        keyring.retire("t-acme", 1)
    keyring.rotate("t-acme", KeyPurpose.RANDOMIZED, activate_now=True)
    old = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    assert old.version == 2
    v1 = next(
        k
        for k in keyring.list_keys("t-acme")
        if k.version == 1 and k.purpose is KeyPurpose.RANDOMIZED
    )

    # No other process uses the keyring, so the wait after a rotation is not needed.
    retired = keyring.retire("t-acme", 1, KeyPurpose.RANDOMIZED, min_inactive_seconds=0)

    assert [(k.version, k.state) for k in retired] == [(1, KeyState.RETIRED)]
    with pytest.raises(KeyNotFoundError, match="retired"):
        keyring.key_by_id(v1.key_id)
    versions = [k.version for k in keyring.decryptable_keys("t-acme", KeyPurpose.RANDOMIZED)]
    assert versions == [2]
    assert keyring.retire("t-acme", 1, KeyPurpose.RANDOMIZED) == []
    with pytest.raises(KeyNotFoundError):
        keyring.retire("t-acme", 9)


def test_reinstate_retired_version(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    Base.metadata.create_all(engine)
    person_id = _add(engine, "t-acme", "Test Person", "a@example.test")
    keyring.rotate("t-acme", activate_now=True)
    keyring.retire("t-acme", 1, min_inactive_seconds=0)
    elsewhere = keyring_factory()
    with Session(engine) as session:
        with pytest.raises(KeyNotFoundError) as retired:
            session.get(Person, person_id)
    assert "keyring.reinstate('t-acme', 1)" in str(retired.value)

    reinstated = keyring.reinstate("t-acme", 1)

    assert sorted((k.purpose.value, k.state) for k in reinstated) == [
        ("deterministic", KeyState.DECRYPT_ONLY),
        ("randomized", KeyState.DECRYPT_ONLY),
    ]
    assert all(k.retired_at is None for k in reinstated)
    for reader in (keyring, elsewhere):
        se.set_default_key_provider(reader)
        with Session(engine) as session:
            assert session.get(Person, person_id).name == "Test Person"  # type: ignore[union-attr]
    with tenant_scope("t-acme"), Session(engine) as session:
        found = session.scalars(sa.select(Person).where(Person.email == "a@example.test")).all()
        assert [p.id for p in found] == [person_id]
    with pytest.raises(KeyStateError, match="not retired"):
        keyring.reinstate("t-acme", 1)
    with pytest.raises(KeyNotFoundError, match="no randomized key version 7"):
        keyring.reinstate("t-acme", 7, KeyPurpose.RANDOMIZED)
    keyring.shred("t-acme")
    with pytest.raises(KeyDestroyedError, match="crypto-shredded"):
        keyring.reinstate("t-acme", 1)


def test_rotate_only_used_purposes(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    """A tenant with deterministic keys only gets no first randomized key,
    which would be an active version 1 that retire then rejects."""
    keyring = keyring_factory()
    keyring.active_key("t-acme", KeyPurpose.DETERMINISTIC)

    created = keyring.rotate("t-acme", activate_now=True)

    assert [(k.purpose, k.version) for k in created] == [(KeyPurpose.DETERMINISTIC, 2)]
    assert _versions(keyring, "t-acme", KeyPurpose.RANDOMIZED) == {}
    assert _versions(keyring, "t-acme", KeyPurpose.DETERMINISTIC) == {
        1: KeyState.DECRYPT_ONLY,
        2: KeyState.ACTIVE,
    }


def test_rotate_new_tenant_creates_both(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()

    created = keyring.rotate("t-new")

    assert sorted((k.purpose.value, k.version, k.state) for k in created) == [
        ("deterministic", 1, KeyState.ACTIVE),
        ("randomized", 1, KeyState.ACTIVE),
    ]


def test_rotate_named_purpose_creates_first_key(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    keyring = keyring_factory()
    keyring.active_key("t-acme", KeyPurpose.DETERMINISTIC)

    created = keyring.rotate("t-acme", KeyPurpose.RANDOMIZED)

    assert [(k.purpose, k.version) for k in created] == [(KeyPurpose.RANDOMIZED, 1)]


def test_retire_skips_active_purpose(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory()
    keyring.provision("t-acme")
    keyring.rotate("t-acme", KeyPurpose.DETERMINISTIC, activate_now=True)

    retired = keyring.retire("t-acme", 1, min_inactive_seconds=0)

    assert [(k.purpose, k.version) for k in retired] == [(KeyPurpose.DETERMINISTIC, 1)]
    assert _versions(keyring, "t-acme", KeyPurpose.RANDOMIZED) == {1: KeyState.ACTIVE}
    # Run again: the deterministic version is already retired, so nothing
    # fails, and the active randomized version still stays.
    assert keyring.retire("t-acme", 1) == []
    assert _versions(keyring, "t-acme", KeyPurpose.RANDOMIZED) == {1: KeyState.ACTIVE}


def test_retire_active_message_not_circular(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    keyring = keyring_factory()
    keyring.provision("t-acme")
    keyring.rotate("t-acme", KeyPurpose.DETERMINISTIC, activate_now=True)

    with pytest.raises(KeyStateError) as named:
        keyring.retire("t-acme", 1, KeyPurpose.RANDOMIZED)
    with pytest.raises(KeyStateError) as unnamed:
        keyring.retire("t-acme", 2)

    message = str(named.value)
    assert "key version 1 of tenant 't-acme' (randomized: active)" in message
    assert "newer randomized version" in message
    assert "rotate the tenant's keys" not in message
    assert "(deterministic: active)" in str(unnamed.value)
    with pytest.raises(KeyNotFoundError, match="no randomized key version 2"):
        keyring.retire("t-acme", 2, KeyPurpose.RANDOMIZED)


def test_audit_log_has_ids_only(
    engine: sa.Engine,
    keyring_factory: type[Keyring],
    local_kms: LocalKms,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="sqlalchemy_encrypted")
    keyring = keyring_factory()
    keyring.provision("t-acme")
    keyring.rotate("t-acme", activate_now=True)
    keyring.rotate("t-acme")
    keyring.promote_pending()
    keyring.retire("t-acme", 1, min_inactive_seconds=0)
    next_kms = LocalKms.create(tmp_path / "next.key")
    keyring.rewrap(next_kms)
    failing = CountingKms(local_kms)
    failing.fail_with = se.KmsUnavailableError("local test failure")
    broken = keyring_factory(engine, failing, previous_kms=[next_kms])
    with pytest.raises(se.KmsUnavailableError):
        broken.active_key("t-new", KeyPurpose.RANDOMIZED)
    secrets: list[bytes] = []
    for row in keyring._store.rows():
        assert row.wrapped_dek is not None
        secrets.append(row.wrapped_dek)
        provider = keyring._provider_for(row)
        secrets.append(provider.unwrap(row.wrapped_dek, row.context, row.kek_id))
    assert len(secrets) == 12  # 3 versions x 2 purposes, wrapped and unwrapped
    keyring.shred("t-acme")

    events = [getattr(r, "audit_event", None) for r in caplog.records]
    for expected in (
        "key.created",
        "key.rotated",
        "key.demoted",
        "key.retired",
        "key.rewrapped",
        "key.destroyed",
        "tenant.shredded",
        "kms.failed",
    ):
        assert expected in events
    text = log_text(caplog.records)
    assert_no_secret(text, secrets)
    assert all(r.name.startswith("sqlalchemy_encrypted") for r in caplog.records)
    failure = next(r for r in caplog.records if getattr(r, "audit_event", None) == "kms.failed")
    assert "t-new" in failure.getMessage()
    assert "KmsUnavailableError" in failure.getMessage()
