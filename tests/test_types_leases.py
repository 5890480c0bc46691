"""Column types keep leases on DEKs instead of asking the key provider per
value. These tests check every way a lease must end, on the fast path."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import (
    DataKey,
    DecryptionError,
    DeterministicEncrypted,
    Encrypted,
    KeyLease,
    KeyPurpose,
    LeaseGeneration,
    LeasingKeyProvider,
    StoredKeyDestroyedError,
    StoredKeyNotFoundError,
    TenantMismatchError,
    parse_header,
    set_default_key_provider,
    tenant_scope,
)
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .keyring_helpers import CountingKms, FakeClock
from .models import Base, Person


def _standalone_types(
    keyring: object | None = None,
) -> tuple[Encrypted[str], DeterministicEncrypted[str]]:
    metadata = sa.MetaData()
    table = sa.Table(
        "notes",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(50), keyring=keyring)),  # type: ignore[arg-type]
        sa.Column("email", DeterministicEncrypted(sa.String(50), keyring=keyring)),  # type: ignore[arg-type]
    )
    return table.c.body.type, table.c.email.type  # type: ignore[return-value]


class ProviderWithoutLeases:
    """A key provider with only the three required methods, counting calls."""

    def __init__(self) -> None:
        self.inner = InMemoryKeyring()
        self.active_calls = 0
        self.by_id_calls = 0

    def active_key(self, tenant_id: str, purpose: KeyPurpose) -> DataKey:
        self.active_calls += 1
        return self.inner.active_key(tenant_id, purpose)

    def key_by_id(self, key_id: uuid.UUID, expected_tenant: str | None = None) -> DataKey:
        self.by_id_calls += 1
        return self.inner.key_by_id(key_id, expected_tenant)

    def decryptable_keys(self, tenant_id: str, purpose: KeyPurpose) -> Sequence[DataKey]:
        return self.inner.decryptable_keys(tenant_id, purpose)


def _stored_names(engine: sa.Engine) -> list[bytes]:
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT name FROM persons ORDER BY id")).all()
    return [bytes(row[0]) for row in rows]


def _names(engine: sa.Engine, tenant: str) -> list[str | None]:
    with tenant_scope(tenant), Session(engine) as session:
        return [person.name for person in session.scalars(sa.select(Person).order_by(Person.id))]


def test_lease_current_until_bump_or_expiry() -> None:
    clock = FakeClock()
    generation = LeaseGeneration()
    key = InMemoryKeyring().active_key("t-acme", KeyPurpose.RANDOMIZED)
    lease = KeyLease(key, clock.now + 10, generation, generation.value, clock)

    assert lease.is_current()
    clock.advance(10)
    assert not lease.is_current()

    fresh = KeyLease(key, clock.now + 10, generation, generation.value, clock)
    generation.bump()
    assert not fresh.is_current()
    assert "key material" not in repr(fresh)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(fresh)


def test_both_keyrings_hand_out_leases(local_kms: LocalKms, tmp_path: object) -> None:
    assert isinstance(InMemoryKeyring(), LeasingKeyProvider)
    engine = sa.create_engine("sqlite://")
    keyring = Keyring(engine, local_kms, set_default=False)
    keyring.create_table()
    assert isinstance(keyring, LeasingKeyProvider)
    lease = keyring.active_key_lease("t-acme", KeyPurpose.RANDOMIZED)
    assert lease.is_current()
    assert keyring.key_lease(lease.key.key_id, expected_tenant="t-acme").key is lease.key


def test_read_fails_after_shred_in_process(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    keyring = keyring_factory()
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Ada", email="ada@example.com"))
        session.commit()
    assert _names(engine, "t-acme") == ["Ada"]

    keyring.shred("t-acme")

    with pytest.raises(StoredKeyDestroyedError):
        _names(engine, "t-acme")


def test_read_unwraps_again_after_ttl(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    counting = CountingKms(local_kms)
    clock = FakeClock()
    keyring_factory(engine, counting, cache_ttl=10.0, clock=clock)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Ada"))
        session.commit()
    reader = keyring_factory(engine, counting, cache_ttl=10.0, clock=clock)
    counting.calls.clear()

    assert _names(engine, "t-acme") == ["Ada"]
    assert _names(engine, "t-acme") == ["Ada"]
    assert counting.calls["unwrap"] == 1

    clock.advance(10.5)
    assert _names(engine, "t-acme") == ["Ada"]
    assert counting.calls["unwrap"] == 2
    assert reader.cache.stats.kms_calls == 2


def test_write_after_rotation_uses_new_version(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    keyring = keyring_factory()
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="before"))
        session.commit()

        keyring.rotate("t-acme", KeyPurpose.RANDOMIZED, activate_now=True)

        session.add(Person(id=2, tenant_id="t-acme", name="after"))
        session.commit()

    before, after = (parse_header(value) for value in _stored_names(engine))
    assert before.key_version == 1
    assert after.key_version == 2
    assert _names(engine, "t-acme") == ["before", "after"]


def test_write_after_shred_in_process_raises(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    keyring = keyring_factory()
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="before"))
        session.commit()
        keyring.shred("t-acme")
        session.add(Person(id=2, tenant_id="t-acme", name="after"))
        with pytest.raises(Exception, match="destroyed") as caught:
            session.commit()
    assert "after" not in str(caught.value)
    assert len(_stored_names(engine)) == 1


def test_read_after_eviction(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    counting = CountingKms(local_kms)
    keyring_factory(engine, counting, cache_size=1)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Ada"))
        session.add(Person(id=2, tenant_id="t-globex", name="Grace"))
        session.commit()
    reader = keyring_factory(engine, counting, cache_size=1)

    with Session(engine) as session:
        people = session.scalars(sa.select(Person).order_by(Person.id)).all()
        assert [person.name for person in people] == ["Ada", "Grace"]
    with Session(engine) as session:
        people = session.scalars(sa.select(Person).order_by(Person.id)).all()
        assert [person.name for person in people] == ["Ada", "Grace"]
    # Each read of each tenant's value evicts the other tenant's DEK.
    assert reader.cache.stats.evictions >= 3


def test_scope_checked_on_every_read(keyring: InMemoryKeyring) -> None:
    body, email = _standalone_types()
    with tenant_scope("t-acme"):
        stored_body = body.process_bind_param("note", None)  # type: ignore[arg-type]
        stored_email = email.process_bind_param("a@example.com", None)  # type: ignore[arg-type]
        assert body.decrypt(stored_body) == "note"
        assert email.decrypt(stored_email) == "a@example.com"

    with tenant_scope("t-globex"), pytest.raises(TenantMismatchError):
        body.decrypt(stored_body)
    with tenant_scope("t-globex"), pytest.raises(TenantMismatchError):
        email.decrypt(stored_email)
    assert body.decrypt(stored_body) == "note"


def test_default_provider_swap_ends_plans(keyring: InMemoryKeyring) -> None:
    body, _ = _standalone_types()
    with tenant_scope("t-acme"):
        stored = body.process_bind_param("note", None)  # type: ignore[arg-type]
        assert body.decrypt(stored) == "note"

        other = InMemoryKeyring()
        set_default_key_provider(other)
        with pytest.raises(StoredKeyNotFoundError):
            body.decrypt(stored)
        resealed = body.process_bind_param("note", None)  # type: ignore[arg-type]
    assert parse_header(resealed).key_id == other.active_key("t-acme", KeyPurpose.RANDOMIZED).key_id


def test_retire_ends_read_lease(keyring: InMemoryKeyring) -> None:
    body, _ = _standalone_types()
    with tenant_scope("t-acme"):
        stored = body.process_bind_param("note", None)  # type: ignore[arg-type]
        assert body.decrypt(stored) == "note"
        keyring.rotate("t-acme")
        assert body.decrypt(stored) == "note"
        newer = body.process_bind_param("note", None)  # type: ignore[arg-type]
        assert parse_header(newer).key_version == 2

        keyring.retire("t-acme", 1)
        with pytest.raises(StoredKeyNotFoundError):
            body.decrypt(stored)
        assert body.decrypt(newer) == "note"


def test_tampered_value_fails_with_warm_plan(keyring: InMemoryKeyring) -> None:
    body, email = _standalone_types()
    with tenant_scope("t-acme"):
        for column_type, value in ((body, "note"), (email, "a@example.com")):
            stored = column_type.process_bind_param(value, None)  # type: ignore[arg-type]
            assert column_type.decrypt(stored) == value
            for position in (len(stored) - 1, 30, 24):
                damaged = bytearray(stored)
                damaged[position] ^= 0x01
                with pytest.raises(DecryptionError):
                    column_type.decrypt(bytes(damaged))
            with pytest.raises(DecryptionError):
                column_type.decrypt(stored[:-1])
            with pytest.raises(DecryptionError):
                column_type.decrypt(stored[:30])
            assert column_type.decrypt(stored) == value


def test_moved_value_fails_warm_plans(keyring: InMemoryKeyring) -> None:
    first, _ = _standalone_types()
    second, _ = _standalone_types()
    second.context = "other.body"
    with tenant_scope("t-acme"):
        stored = first.process_bind_param("note", None)  # type: ignore[arg-type]
        assert first.decrypt(stored) == "note"
        own = second.process_bind_param("note", None)  # type: ignore[arg-type]
        assert second.decrypt(own) == "note"
        # Same tenant, key and header: only the AAD's column identity differs.
        assert stored[:24] == own[:24]
        with pytest.raises(DecryptionError):
            second.decrypt(stored)

        # A column whose identity changes after use does not reuse its plans.
        first.context = "other.body"
        with pytest.raises(DecryptionError):
            first.decrypt(stored)
        assert first.decrypt(own) == "note"


def test_provider_without_leases_is_asked_per_value() -> None:
    provider = ProviderWithoutLeases()
    assert not isinstance(provider, LeasingKeyProvider)
    body, email = _standalone_types(provider)
    with tenant_scope("t-acme"):
        stored = [body.process_bind_param(f"note {n}", None) for n in range(5)]  # type: ignore[arg-type]
        tokens = [email.process_bind_param(f"{n}@example.com", None) for n in range(5)]  # type: ignore[arg-type]
        assert [body.decrypt(value) for value in stored] == [f"note {n}" for n in range(5)]
        assert [email.decrypt(value) for value in tokens] == [f"{n}@example.com" for n in range(5)]
    assert provider.active_calls == 10
    assert provider.by_id_calls == 10


def test_new_tenant_keeps_other_leases(local_kms: LocalKms) -> None:
    engine = sa.create_engine("sqlite://")
    keyring = Keyring(engine, local_kms, set_default=False)
    keyring.create_table()
    acme = keyring.active_key_lease("t-acme", KeyPurpose.RANDOMIZED)
    assert acme.is_current()

    keyring.active_key_lease("t-globex", KeyPurpose.RANDOMIZED)
    keyring.decryptable_keys("t-globex", KeyPurpose.DETERMINISTIC)
    assert acme.is_current()

    keyring.rotate("t-acme", KeyPurpose.RANDOMIZED, activate_now=True)
    assert not acme.is_current()


def test_purge_drops_expired_deks(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    counting = CountingKms(local_kms)
    clock = FakeClock()
    keyring = keyring_factory(engine, counting, cache_ttl=10.0, active_key_ttl=5.0, clock=clock)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Ada", email="ada@example.com"))
        session.commit()
    assert _names(engine, "t-acme") == ["Ada"]
    name_type = Person.__table__.c.name.type.dialect_impl(engine.dialect)
    assert name_type._hot.read_plans
    assert keyring.cache.stats.size == 2

    # Nothing has expired yet: the purge keeps every DEK and plan.
    assert keyring.purge_expired() == 0
    assert name_type._hot.read_plans

    clock.advance(10.5)
    assert keyring.purge_expired() == 2
    assert keyring.cache.stats.size == 0
    assert not name_type._hot.read_plans
    assert not name_type._hot.write_plans

    # The next read unwraps both DEKs (name and e-mail) again and works as before.
    counting.calls.clear()
    assert _names(engine, "t-acme") == ["Ada"]
    assert counting.calls["unwrap"] == 2


class _GrowingLease:
    """A lease that adds an entry to ``leases`` when its expiry is read,
    as another thread would while the purge filters the dict."""

    def __init__(self, leases: dict[object, object]) -> None:
        self.leases = leases

    @property
    def expires_at(self) -> float:
        self.leases[object()] = self
        return float("inf")

    def is_current(self) -> bool:
        self.leases[object()] = self
        return True


def test_purge_tolerates_concurrent_additions(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    keyring = keyring_factory()
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Ada", email="ada@example.com"))
        session.commit()
    name_type = Person.__table__.c.name.type.dialect_impl(engine.dialect)
    name_type._hot.read_plans[b"growing"] = _GrowingLease(name_type._hot.read_plans)
    keyring._active_leases[("t-growing", KeyPurpose.RANDOMIZED)] = _GrowingLease(
        keyring._active_leases  # type: ignore[arg-type]
    )
    keyring._id_leases[0] = _GrowingLease(keyring._id_leases)  # type: ignore[arg-type]

    assert keyring.purge_expired() == 0

    assert b"growing" in name_type._hot.read_plans
    assert ("t-growing", KeyPurpose.RANDOMIZED) in keyring._active_leases
    assert _names(engine, "t-acme") == ["Ada"]
