"""The DEK cache: bounds, TTL, single-flight, counters, and KMS calls per DEK."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import KeyDestroyedError, KeyPurpose, TenantContextError, tenant_scope
from sqlalchemy_encrypted.keyring import Keyring, TtlCache
from sqlalchemy_encrypted.kms import LocalKms

from .keyring_helpers import CountingKms, FakeClock
from .models import Base, Person


def test_cache_bounded_lru() -> None:
    cache: TtlCache[str, int] = TtlCache(max_entries=2, ttl=60.0)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert cache.get("b") is None
    assert cache.get("a") == 1
    assert cache.get("c") == 3
    assert cache.stats.size == 2
    assert cache.stats.evictions == 1


def test_cache_ttl_expiry() -> None:
    clock = FakeClock()
    cache: TtlCache[str, int] = TtlCache(max_entries=10, ttl=5.0, clock=clock)
    loads = []
    assert cache.get_or_load("a", lambda: loads.append(1) or 1) == 1
    clock.advance(4.9)
    assert cache.get_or_load("a", lambda: loads.append(1) or 1) == 1
    assert len(loads) == 1
    clock.advance(0.2)
    assert cache.get_or_load("a", lambda: loads.append(1) or 1) == 1
    assert len(loads) == 2
    assert cache.stats.hits == 1
    assert cache.stats.misses == 2


def test_cache_ttl_zero_disables() -> None:
    cache: TtlCache[str, int] = TtlCache(max_entries=10, ttl=0)
    loads = []
    for _ in range(3):
        assert cache.get_or_load("a", lambda: loads.append(1) or 1) == 1
    cache.put("b", 2)
    assert len(loads) == 3
    assert cache.get("b") is None
    assert cache.stats.size == 0


def test_cache_single_flight() -> None:
    cache: TtlCache[str, int] = TtlCache(max_entries=10, ttl=60.0)
    started = threading.Event()
    release = threading.Event()
    loads = []
    results = []

    def loader() -> int:
        loads.append(1)
        started.set()
        release.wait(5)
        return 42

    def worker() -> None:
        results.append(cache.get_or_load("k", loader))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    threads[0].start()
    started.wait(5)
    for thread in threads[1:]:
        thread.start()
    # A thread that joins the load in flight counts as a hit; wait for all 7.
    deadline = time.monotonic() + 5
    while cache.stats.hits < 7 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert cache.stats.hits == 7
    release.set()
    for thread in threads:
        thread.join(5)
    assert results == [42] * 8
    assert len(loads) == 1
    assert cache.stats.misses == 1


def test_cache_single_flight_error() -> None:
    cache: TtlCache[str, int] = TtlCache(max_entries=10, ttl=60.0)

    def failing() -> int:
        raise RuntimeError("load failed")

    with pytest.raises(RuntimeError):
        cache.get_or_load("k", failing)
    assert cache.get_or_load("k", lambda: 7) == 7
    assert cache._flights == {}


def test_cache_invalidation_during_load() -> None:
    cache: TtlCache[str, int] = TtlCache(max_entries=10, ttl=60.0)

    def loader() -> int:
        cache.invalidate("k")
        return 1

    assert cache.get_or_load("k", loader) == 1
    assert cache.get("k") is None


def test_keyring_single_flight_threads(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    counting = CountingKms(local_kms)
    keyring = keyring_factory(engine, counting)
    key = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    cold = keyring_factory(engine, counting)
    counting.calls.clear()
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            barrier.wait(5)
            cold.key_by_id(key.key_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert counting.calls["unwrap"] == 1


def _bulk_insert(engine: sa.Engine, tenant: str, count: int, start: int = 0) -> None:
    rows = [
        {"id": start + i, "tenant_id": tenant, "name": f"Person {i}", "email": f"p{i}@example.test"}
        for i in range(count)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(Person.__table__), rows)


def test_ten_thousand_rows_one_unwrap(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    counting = CountingKms(local_kms)
    clock = FakeClock()
    keyring_factory(engine, counting)
    Base.metadata.create_all(engine)
    _bulk_insert(engine, "t-acme", 10_000)

    reader = keyring_factory(engine, counting, cache_ttl=300.0, clock=clock)
    counting.calls.clear()
    with Session(engine) as session:
        people = session.scalars(sa.select(Person)).all()
    assert len(people) == 10_000
    assert people[-1].name == "Person 9999"
    # One DEK per purpose: the randomized name and the deterministic email.
    assert counting.calls["unwrap"] == 2
    assert reader.cache.stats.kms_calls == 2
    assert reader.cache.stats.misses == 2

    clock.advance(301)
    with Session(engine) as session:
        assert len(session.scalars(sa.select(Person)).all()) == 10_000
    assert counting.calls["unwrap"] == 4


def test_several_tenants_and_versions(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    counting = CountingKms(local_kms)
    writer = keyring_factory(engine, counting)
    Base.metadata.create_all(engine)
    tenants = ["t-acme", "t-globex", "t-initech"]
    for index, tenant in enumerate(tenants):
        _bulk_insert(engine, tenant, 20, start=index * 100)
        writer.rotate(tenant, KeyPurpose.RANDOMIZED, activate_now=True)
        _bulk_insert(engine, tenant, 20, start=index * 100 + 50)

    reader = keyring_factory(engine, counting)
    counting.calls.clear()
    with Session(engine) as session:
        people = session.scalars(sa.select(Person)).all()
    assert len(people) == 120
    # 3 tenants x (2 randomized versions + 1 deterministic version).
    assert counting.calls["unwrap"] == 9
    assert reader.cache.stats.kms_calls == 9


def test_cache_capacity_smaller_than_keys(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    counting = CountingKms(local_kms)
    keyring_factory(engine, counting)
    Base.metadata.create_all(engine)
    tenants = ["t-acme", "t-globex", "t-initech"]
    for index, tenant in enumerate(tenants):
        _bulk_insert(engine, tenant, 5, start=index * 10)

    reader = keyring_factory(engine, counting, cache_size=2)
    with Session(engine) as session:
        names = sorted(p.name for p in session.scalars(sa.select(Person)))
    assert names == sorted([f"Person {i}" for i in range(5)] * 3)
    assert reader.cache.stats.size <= 2
    assert reader.cache.stats.evictions > 0
    for tenant in tenants:
        with Session(engine) as session, tenant_scope(tenant):
            found = session.scalars(sa.select(Person).where(Person.email == "p3@example.test"))
            assert [p.tenant_id for p in found] == [tenant]


def test_cache_ttl_zero_unwraps_every_time(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    counting = CountingKms(local_kms)
    keyring = keyring_factory(engine, counting, cache_ttl=0)
    key = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    counting.calls.clear()
    for _ in range(3):
        keyring.key_by_id(key.key_id)
    assert counting.calls["unwrap"] == 3


def test_active_key_expires_with_dek_ttl(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    counting = CountingKms(local_kms)
    keyring_factory(engine, counting).provision("t-acme")
    clock = FakeClock()
    reader = keyring_factory(engine, counting, cache_ttl=10.0, active_key_ttl=60.0, clock=clock)
    counting.calls.clear()

    first = reader.active_key("t-acme", KeyPurpose.RANDOMIZED)
    assert reader.active_key("t-acme", KeyPurpose.RANDOMIZED) is first
    assert reader.key_by_id(first.key_id) is first
    assert counting.calls["unwrap"] == 1

    # The active row is still cached, but the DEK's shorter TTL has run out.
    clock.advance(11)
    reader.active_key("t-acme", KeyPurpose.RANDOMIZED)
    assert counting.calls["unwrap"] == 2
    clock.advance(11)
    reader.key_by_id(first.key_id)
    assert counting.calls["unwrap"] == 3


def test_hot_keys_follow_invalidation(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    keyring = keyring_factory(engine, local_kms)
    key = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    assert keyring.key_by_id(key.key_id, expected_tenant="t-acme") is key
    with pytest.raises(TenantContextError):
        keyring.key_by_id(key.key_id, expected_tenant="t-globex")

    keyring.rotate("t-acme", KeyPurpose.RANDOMIZED, activate_now=True)
    rotated = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    assert rotated.key_id != key.key_id
    assert rotated.version == 2

    keyring.shred("t-acme")
    with pytest.raises(KeyDestroyedError):
        keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    with pytest.raises(KeyDestroyedError):
        keyring.key_by_id(key.key_id)


def test_hot_keys_follow_eviction(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    counting = CountingKms(local_kms)
    writer = keyring_factory(engine, counting)
    others = [
        writer.active_key(tenant, KeyPurpose.RANDOMIZED).key_id
        for tenant in ("t-globex", "t-initech")
    ]
    writer.provision("t-acme")
    reader = keyring_factory(engine, counting, cache_size=2)
    counting.calls.clear()

    reader.active_key("t-acme", KeyPurpose.RANDOMIZED)
    for key_id in others:
        reader.key_by_id(key_id)
    assert counting.calls["unwrap"] == 3
    # The acme DEK was evicted from the DEK cache, so it is unwrapped again
    # instead of being served from a copy that outlived the cache entry.
    reader.active_key("t-acme", KeyPurpose.RANDOMIZED)
    assert counting.calls["unwrap"] == 4
    assert reader.cache.stats.size <= 2
