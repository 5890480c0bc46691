"""Lifecycle changes made by another process end within ``cache_ttl``.

Two Keyring objects on one database stand for two processes: each has its
own caches. The keyring caches table rows ("which key is active", "which
keys decrypt") for ``active_key_ttl`` and unwrapped DEKs for ``cache_ttl``.
When a DEK leaves the cache, it must be unwrapped from the row as it is in
the table now, not from a cached row that predates a shred or retirement.
"""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from sqlalchemy_encrypted import KeyDestroyedError, KeyNotFoundError, KeyPurpose, tenant_scope
from sqlalchemy_encrypted.keyring import Keyring

from .keyring_helpers import CountingKms, FakeClock

TENANT = "t-acme"


@pytest.fixture
def two_processes(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: object
) -> tuple[Keyring, Keyring, FakeClock, CountingKms]:
    clock = FakeClock()
    kms = CountingKms(local_kms)  # type: ignore[arg-type]
    app = keyring_factory(engine, kms, cache_ttl=2.0, active_key_ttl=30.0, clock=clock)
    admin = keyring_factory(set_default=False)
    return app, admin, clock, kms


def test_shred_elsewhere_ends_writes_after_cache_ttl(
    two_processes: tuple[Keyring, Keyring, FakeClock, CountingKms],
) -> None:
    app, admin, clock, kms = two_processes
    app.active_key(TENANT, KeyPurpose.RANDOMIZED)
    admin.shred(TENANT)

    # Within cache_ttl the process may keep using the DEK it holds.
    app.active_key(TENANT, KeyPurpose.RANDOMIZED)
    clock.advance(2.5)
    unwraps = kms.calls["unwrap"]

    with pytest.raises(KeyDestroyedError, match=TENANT):
        app.active_key(TENANT, KeyPurpose.RANDOMIZED)
    assert kms.calls["unwrap"] == unwraps


def test_shred_elsewhere_ends_lookup_keys_after_cache_ttl(
    two_processes: tuple[Keyring, Keyring, FakeClock, CountingKms],
) -> None:
    app, admin, clock, kms = two_processes
    app.provision(TENANT)
    assert len(app.decryptable_keys(TENANT, KeyPurpose.DETERMINISTIC)) == 1
    admin.shred(TENANT)
    clock.advance(2.5)
    unwraps = kms.calls["unwrap"]

    with pytest.raises(KeyDestroyedError, match=TENANT):
        app.decryptable_keys(TENANT, KeyPurpose.DETERMINISTIC)
    with pytest.raises(KeyDestroyedError, match=TENANT):
        admin.decryptable_keys(TENANT, KeyPurpose.DETERMINISTIC)
    assert kms.calls["unwrap"] == unwraps


def test_retire_elsewhere_drops_version_after_cache_ttl(
    two_processes: tuple[Keyring, Keyring, FakeClock, CountingKms],
) -> None:
    app, admin, clock, _ = two_processes
    admin.provision(TENANT)
    admin.rotate(TENANT, KeyPurpose.DETERMINISTIC, activate_now=True)
    versions = [k.version for k in app.decryptable_keys(TENANT, KeyPurpose.DETERMINISTIC)]
    assert versions == [2, 1]
    admin.retire(TENANT, 1, KeyPurpose.DETERMINISTIC, min_inactive_seconds=0)
    clock.advance(2.5)

    keys = app.decryptable_keys(TENANT, KeyPurpose.DETERMINISTIC)

    assert [k.version for k in keys] == [2]


def test_unchanged_keys_unwrap_again_after_cache_ttl(
    two_processes: tuple[Keyring, Keyring, FakeClock, CountingKms],
) -> None:
    app, _, clock, kms = two_processes
    with tenant_scope(TENANT):
        first = app.active_key(TENANT, KeyPurpose.RANDOMIZED)
    clock.advance(2.5)
    unwraps = kms.calls["unwrap"]

    again = app.active_key(TENANT, KeyPurpose.RANDOMIZED)

    assert again.key_id == first.key_id
    assert kms.calls["unwrap"] == unwraps + 1


def test_waiting_thread_gets_public_error(
    two_processes: tuple[Keyring, Keyring, FakeClock, CountingKms],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The loader thread reloads the DEK from a cached row and finds it
    # retired. The waiter thread read the row before the retirement, and
    # waits for the loader's load of the same key.
    app, admin, clock, _ = two_processes
    admin.provision(TENANT)
    admin.rotate(TENANT, KeyPurpose.DETERMINISTIC, activate_now=True)
    cached = [k for k in app.decryptable_keys(TENANT, KeyPurpose.DETERMINISTIC)]
    old = next(key for key in cached if key.version == 1)
    snapshot = app._store.get(old.key_id)
    assert snapshot is not None
    admin.retire(TENANT, 1, KeyPurpose.DETERMINISTIC, min_inactive_seconds=0)
    clock.advance(2.5)
    app.cache.invalidate(old.key_id)

    started = threading.Event()
    release = threading.Event()
    real_get = app._store.get

    def slow_get(key_id: object) -> object:
        if threading.current_thread().name == "loader":
            started.set()
            release.wait(10)
        return real_get(key_id)  # type: ignore[arg-type]

    monkeypatch.setattr(app._store, "get", slow_get)
    errors: dict[str, BaseException] = {}

    def run(name: str, fresh: bool) -> None:
        try:
            app._data_key(snapshot, fresh=fresh)
        except BaseException as exc:
            errors[name] = exc

    loader = threading.Thread(target=run, args=("loader", False), name="loader")
    loader.start()
    assert started.wait(10)
    hits = app.cache.stats.hits
    waiter = threading.Thread(target=run, args=("waiter", True), name="waiter")
    waiter.start()
    while app.cache.stats.hits == hits:
        time.sleep(0.001)
    release.set()
    loader.join(10)
    waiter.join(10)

    assert type(errors["waiter"]) is KeyNotFoundError
    assert "is retired" in str(errors["waiter"])
    assert TENANT in str(errors["waiter"])
