"""The usage limit of randomized DEKs (case B33 of the shared bug cases).

AES-GCM with random 96-bit nonces must seal at most about 2^32 values per
key. The keyring counts the values each randomized DEK seals in the keyring
table, across processes. A key that reaches the limit is replaced by a new
active version, or its writes raise, as configured. The count may be higher
than the number of values, never lower.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    ConfigurationError,
    Encrypted,
    KeyPurpose,
    KeyUsageLimitError,
    tenant_scope,
)
from sqlalchemy_encrypted.keyring import Keyring, KeyState, lifecycle
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.rotation import reencrypt
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .alembic_env import AlembicEnv
from .keyring_helpers import assert_no_secret, log_text
from .models import Base, Person
from .usage_limit_worker import insert_rows


def _add(engine: sa.Engine, count: int, first: int = 0, tenant: str = "t-acme") -> None:
    for index in range(first, first + count):
        with Session(engine) as session:
            session.add(
                Person(tenant_id=tenant, name=f"Person {index}", email=f"p{index}@example.test")
            )
            session.commit()


def _name_versions(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT name FROM persons ORDER BY id")).all()
    return [se.parse_header(bytes(row[0])).key_version for row in rows]


def _counters(engine: sa.Engine, purpose: KeyPurpose) -> dict[int, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT key_version, sealed_count FROM encryption_keys "
                "WHERE tenant_id = 't-acme' AND purpose = :purpose"
            ),
            {"purpose": purpose.value},
        ).all()
    return {row[0]: row[1] for row in rows}


def _states(keyring: Keyring) -> dict[int, KeyState]:
    return {
        info.version: info.state
        for info in keyring.list_keys("t-acme")
        if info.purpose is KeyPurpose.RANDOMIZED
    }


def _all_names(engine: sa.Engine) -> list[str | None]:
    with Session(engine) as session, tenant_scope("t-acme"):
        return [person.name for person in session.scalars(sa.select(Person).order_by(Person.id))]


def test_sixth_value_goes_to_a_new_version(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    keyring = keyring_factory(key_usage_limit=5)
    Base.metadata.create_all(engine)

    _add(engine, 6)

    assert _name_versions(engine) == [1, 1, 1, 1, 1, 2]
    assert _states(keyring) == {1: KeyState.DECRYPT_ONLY, 2: KeyState.ACTIVE}
    counters = _counters(engine, KeyPurpose.RANDOMIZED)
    assert counters[1] == 5
    assert counters[2] >= 1
    # Deterministic keys use no nonce: not counted, not rotated.
    assert _counters(engine, KeyPurpose.DETERMINISTIC) == {1: 0}
    assert _all_names(engine) == [f"Person {index}" for index in range(6)]
    with Session(engine) as session, tenant_scope("t-acme"):
        found = session.scalars(sa.select(Person).where(Person.email == "p5@example.test"))
        assert [person.name for person in found] == ["Person 5"]


def test_raise_policy_refuses_the_sixth_value(
    engine: sa.Engine, keyring_factory: type[Keyring], caplog: pytest.LogCaptureFixture
) -> None:
    keyring = keyring_factory(key_usage_limit=5, on_key_usage_limit="raise")
    Base.metadata.create_all(engine)
    _add(engine, 5)

    caplog.set_level(logging.DEBUG, logger="sqlalchemy_encrypted")
    with Session(engine) as session:
        session.add(Person(tenant_id="t-acme", name="Sixth Person", email="p6@example.test"))
        with pytest.raises(KeyUsageLimitError) as raised:
            session.commit()

    error = raised.value
    key = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    assert (error.tenant_id, error.key_id, error.version, error.replaced) == (
        "t-acme",
        key.key_id,
        1,
        False,
    )
    text = f"{error} {error!r} {getattr(error, '__notes__', '')}"
    for part in ("'t-acme'", str(key.key_id), "version 1", "limit of 5", "column persons.name"):
        assert part in str(error)
    assert "--purpose randomized --activate-now" in str(error)
    row = keyring._store.get(key.key_id)
    assert row is not None and row.wrapped_dek is not None
    dek = keyring.kms.unwrap(row.wrapped_dek, row.context, row.kek_id)
    everything = text + log_text(caplog.records)
    assert "Sixth Person" not in everything
    assert_no_secret(everything, [dek, row.wrapped_dek])
    assert "key.usage_limit_reached" in log_text(caplog.records)
    # Nothing already stored is lost, and the refused row is not stored.
    assert _name_versions(engine) == [1] * 5
    assert _all_names(engine) == [f"Person {index}" for index in range(5)]
    assert _states(keyring) == {1: KeyState.ACTIVE}
    # Later writes keep failing until the tenant's key is rotated.
    with pytest.raises(KeyUsageLimitError):
        _add(engine, 1, first=6)
    keyring.rotate("t-acme", KeyPurpose.RANDOMIZED, activate_now=True)
    _add(engine, 1, first=6)
    assert _name_versions(engine) == [1] * 5 + [2]


def test_raise_policy_sees_rotation_elsewhere(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    # The active-key lookup stays cached for an hour, so only the usage
    # check can notice that another process rotated the key.
    keyring_factory(key_usage_limit=5, on_key_usage_limit="raise", active_key_ttl=3600)
    Base.metadata.create_all(engine)
    _add(engine, 5)
    with pytest.raises(KeyUsageLimitError):
        _add(engine, 1, first=5)

    operator = Keyring(engine, local_kms, set_default=False)
    operator.rotate("t-acme", KeyPurpose.RANDOMIZED, activate_now=True)
    _add(engine, 1, first=5)

    assert _name_versions(engine) == [1] * 5 + [2]


def test_raise_policy_promotes_a_pending_rotation(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    # An operator rotates without --activate-now: the new randomized version
    # waits as pending, but a full key need not wait for it.
    keyring = keyring_factory(key_usage_limit=5, on_key_usage_limit="raise")
    Base.metadata.create_all(engine)
    _add(engine, 5)
    with pytest.raises(KeyUsageLimitError):
        _add(engine, 1, first=5)
    Keyring(engine, local_kms, set_default=False).rotate("t-acme", KeyPurpose.RANDOMIZED)
    assert _states(keyring) == {1: KeyState.ACTIVE, 2: KeyState.PENDING}

    _add(engine, 1, first=5)

    assert _name_versions(engine) == [1] * 5 + [2]
    assert _states(keyring) == {1: KeyState.DECRYPT_ONLY, 2: KeyState.ACTIVE}


def test_counter_persists_across_a_new_engine(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    keyring_factory(key_usage_limit=5)
    Base.metadata.create_all(engine)
    _add(engine, 3)
    used = _counters(engine, KeyPurpose.RANDOMIZED)[1]
    assert 3 <= used <= 5

    fresh = sa.create_engine(engine.url, connect_args=_connect_args(engine))
    try:
        Keyring(fresh, local_kms, key_usage_limit=5)
        _add(fresh, 3, first=3)
    finally:
        fresh.dispose()

    versions = _name_versions(engine)
    # The second keyring continued from the stored count: without it, all six
    # values would be under version 1.
    assert versions.count(1) == 5 - (used - 3)
    assert versions[-1] == 2
    assert _counters(engine, KeyPurpose.RANDOMIZED)[1] == 5
    assert _all_names(engine) == [f"Person {index}" for index in range(6)]


def _connect_args(engine: sa.Engine) -> dict[str, str]:
    if engine.dialect.name != "postgresql":
        return {}
    with engine.connect() as conn:
        search_path = conn.exec_driver_sql("SHOW search_path").scalar_one()
    return {"options": f"-c search_path={search_path}"}


def test_reencryption_writes_count(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory(key_usage_limit=4)
    Base.metadata.create_all(engine)
    _add(engine, 3)
    keyring.rotate("t-acme", KeyPurpose.RANDOMIZED, activate_now=True)
    _add(engine, 1, first=3)
    assert _name_versions(engine) == [1, 1, 1, 2]

    result = reencrypt(engine, Base, columns=["persons.name"])

    assert result.ok and result.failures_total == 0
    assert _name_versions(engine) == [2, 2, 2, 2]
    # One value written by the application, three by the job: version 2 is full.
    assert _counters(engine, KeyPurpose.RANDOMIZED) == {1: 3, 2: 4}
    assert _all_names(engine) == [f"Person {index}" for index in range(4)]


def test_reencryption_moves_on_when_the_key_is_full(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    keyring = keyring_factory(key_usage_limit=3)
    Base.metadata.create_all(engine)
    _add(engine, 3)
    keyring.rotate("t-acme", KeyPurpose.RANDOMIZED, activate_now=True)
    _add(engine, 1, first=3)

    result = reencrypt(engine, Base, columns=["persons.name"], max_passes=1)

    # Version 2 fills up while the job writes, so the job seals the rest under
    # the version that replaced it. No value fails and none is lost; values
    # left under a version older than the newest stay for the next run.
    assert result.failures_total == 0
    assert result.values_reencrypted >= 3
    versions = _name_versions(engine)
    counters = _counters(engine, KeyPurpose.RANDOMIZED)
    assert max(counters) >= 3
    for version, counter in counters.items():
        assert versions.count(version) <= counter <= 3
    assert _all_names(engine) == [f"Person {index}" for index in range(4)]


def test_two_processes_never_undercount(
    engine: sa.Engine, keyring_factory: type[Keyring], tmp_path: Path
) -> None:
    key_file = tmp_path / "usage.key"
    keyring_factory(engine, LocalKms.create(key_file))
    Base.metadata.create_all(engine)
    connect_args = _connect_args(engine)
    search_path = connect_args["options"].split("=", 1)[1] if connect_args else None
    url = engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    # A limit of 4 for 6 values: one of the two processes must replace the key.
    processes = [
        context.Process(
            target=insert_rows, args=(url, search_path, str(key_file), 4, first, 3, barrier)
        )
        for first in (100, 200)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0, 0]

    versions = _name_versions(engine)
    counters = _counters(engine, KeyPurpose.RANDOMIZED)
    assert len(versions) == 6
    assert sum(counters.values()) >= 6
    for version, counter in counters.items():
        assert versions.count(version) <= counter <= 4
    with Session(engine) as session, tenant_scope("t-acme"):
        names = sorted(p.name or "" for p in session.scalars(sa.select(Person)))
    assert names == sorted(f"worker {first} row {row}" for first in (100, 200) for row in range(3))


def test_full_key_is_replaced_once(
    engine: sa.Engine,
    keyring_factory: type[Keyring],
    local_kms: LocalKms,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keyring = keyring_factory(key_usage_limit=3)
    other_engine = sa.create_engine(engine.url, connect_args=_connect_args(engine))
    other = Keyring(other_engine, local_kms, key_usage_limit=3, set_default=False)
    column = Encrypted(sa.String(20), keyring=keyring, context="persons.name")
    for index in range(3):
        column.seal(f"v{index}", tenant_id="t-acme")
    rotate_one = lifecycle._rotate_one

    def rotated_by_another_process_first(
        provider: Keyring, tenant: str, purpose: KeyPurpose, activate_now: bool, **options: object
    ) -> object:
        # Both processes found version 1 full and active; the other one
        # rotates between this keyring's read and its rotation.
        if provider is keyring:
            rotate_one(other, tenant, purpose, activate_now)
        return rotate_one(provider, tenant, purpose, activate_now, **options)

    monkeypatch.setattr(lifecycle, "_rotate_one", rotated_by_another_process_first)
    try:
        sealed = column.seal("v3", tenant_id="t-acme")
    finally:
        other_engine.dispose()

    # The version the other process made active is used, not replaced again.
    assert se.parse_header(sealed).key_version == 2
    assert _states(keyring) == {1: KeyState.DECRYPT_ONLY, 2: KeyState.ACTIVE}
    assert column.decrypt(sealed) == "v3"


def test_threads_never_exceed_the_limit(keyring: InMemoryKeyring) -> None:
    limited = InMemoryKeyring(key_usage_limit=1000)
    column = Encrypted(sa.String(20), keyring=limited, context="persons.name")
    sealed: list[bytes] = []

    def seal_many() -> None:
        for index in range(700):
            sealed.append(column.seal(f"value {index}", tenant_id="t-acme"))

    threads = [threading.Thread(target=seal_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    per_version: dict[int, int] = {}
    for value in sealed:
        version = se.parse_header(value).key_version
        per_version[version] = per_version.get(version, 0) + 1
    assert sum(per_version.values()) == 2800
    assert sorted(per_version) == [1, 2, 3]
    for version, count in per_version.items():
        key = next(
            key
            for key in limited._by_id.values()
            if key.key.version == version and key.key.purpose is KeyPurpose.RANDOMIZED
        )
        assert count <= limited.sealed_count(key.key.key_id) <= 1000


def test_in_memory_keyring_limit(keyring: InMemoryKeyring) -> None:
    limited = InMemoryKeyring(key_usage_limit=2)
    column = Encrypted(sa.String(20), keyring=limited, context="persons.name")
    values = [column.seal(f"v{index}", tenant_id="t-acme") for index in range(5)]
    assert [se.parse_header(value).key_version for value in values] == [1, 1, 2, 2, 3]
    assert [column.decrypt(value) for value in values] == [f"v{index}" for index in range(5)]

    strict = InMemoryKeyring(key_usage_limit=2, on_key_usage_limit="raise")
    column = Encrypted(sa.String(20), keyring=strict, context="persons.name")
    column.seal("a", tenant_id="t-acme")
    column.seal("b", tenant_id="t-acme")
    with pytest.raises(KeyUsageLimitError, match="limit of 2") as raised:
        column.seal("c", tenant_id="t-acme")
    assert "encrypted column persons.name" in str(raised.value)
    assert raised.value.replaced is False

    unlimited = InMemoryKeyring(key_usage_limit=None)
    column = Encrypted(sa.String(20), keyring=unlimited, context="persons.name")
    key = unlimited.active_key("t-acme", KeyPurpose.RANDOMIZED)
    for index in range(50):
        column.seal(f"v{index}", tenant_id="t-acme")
    assert unlimited.sealed_count(key.key_id) == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"key_usage_limit": 0}, "key_usage_limit"),
        ({"key_usage_limit": -5}, "key_usage_limit"),
        ({"key_usage_limit": "5"}, "key_usage_limit"),
        ({"key_usage_limit": True}, "key_usage_limit"),
        # sealed_count is a BIGINT, which cannot store a larger count.
        ({"key_usage_limit": 2**63}, "key_usage_limit"),
        ({"on_key_usage_limit": "explode"}, "on_key_usage_limit"),
    ],
)
def test_bad_settings(
    keyring_factory: type[Keyring], options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        keyring_factory(**options)
    with pytest.raises(ConfigurationError, match=message):
        InMemoryKeyring(**options)  # type: ignore[arg-type]


def _drop_counter(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE encryption_keys DROP COLUMN sealed_count")


def test_keyring_table_without_the_counter(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms, tmp_path: Path
) -> None:
    first = keyring_factory(key_usage_limit=None)
    Base.metadata.create_all(engine)
    _add(engine, 2)
    _drop_counter(engine)
    key_id = first.active_key("t-acme", KeyPurpose.RANDOMIZED).key_id

    # A keyring that does not count keeps reading and writing.
    _add(engine, 1, first=2)
    assert _all_names(engine) == ["Person 0", "Person 1", "Person 2"]

    counting = Keyring(engine, local_kms, key_usage_limit=5)
    assert counting.key_by_id(key_id).version == 1
    assert counting.sealed_counts() is None
    assert _all_names(engine) == ["Person 0", "Person 1", "Person 2"]
    with pytest.raises(ConfigurationError, match="add_keyring_usage_column") as raised:
        _add(engine, 1, first=3)
    assert "encryption_keys" in str(raised.value)
    assert _all_names(engine) == ["Person 0", "Person 1", "Person 2"]

    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision(
        "u1",
        None,
        "from alembic_ext import op as ext_op\next_op.add_keyring_usage_column()",
        "op.drop_column('encryption_keys', 'sealed_count')",
    )
    env.upgrade("u1")
    Keyring(engine, local_kms, key_usage_limit=5)
    _add(engine, 1, first=3)
    assert _all_names(engine) == [f"Person {index}" for index in range(4)]
    assert _counters(engine, KeyPurpose.RANDOMIZED) == {1: 1}
    assert counting.sealed_counts("t-acme") == {
        key_id: 1,
        counting.active_key("t-acme", KeyPurpose.DETERMINISTIC).key_id: 0,
    }


def test_locked_sqlite_keyring_counts_later(tmp_path: Path, local_kms: LocalKms) -> None:
    # The keyring shares the SQLite file with the data, so the application's
    # open transaction holds the write lock when a reservation is due.
    engine = sa.create_engine(f"sqlite:///{tmp_path}/one.db", connect_args={"timeout": 0.2})
    keyring = Keyring(engine, local_kms, key_usage_limit=3)
    keyring.create_table()
    Base.metadata.create_all(engine)
    keyring.provision("t-acme")
    with Session(engine) as session:
        # The first value reserves before the transaction writes; the next two
        # are handed out while the file is locked and owed to the table.
        for index in range(3):
            session.add(Person(tenant_id="t-acme", name=f"P{index}", email=f"p{index}@x.test"))
            session.flush()
        # Version 1 is full, and no new version can be written in the locked file.
        session.add(Person(tenant_id="t-acme", name="P3", email="p3@x.test"))
        with pytest.raises(ConfigurationError, match="locked") as raised:
            session.flush()
    assert "version 1 of tenant 't-acme'" in str(raised.value)
    assert _name_versions(engine) == []

    # The owed seals reach the table once it can be written: three values
    # were sealed (and rolled back), so three are counted.
    keyring.purge_expired()
    assert _counters(engine, KeyPurpose.RANDOMIZED) == {1: 3}
    _add(engine, 2)
    assert _name_versions(engine) == [2, 2]
    assert _all_names(engine) == ["Person 0", "Person 1"]
    engine.dispose()


def test_reserve_unknown_key_id(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    keyring = keyring_factory(key_usage_limit=5)
    with pytest.raises(se.KeyNotFoundError):
        keyring._store.reserve_seals(uuid.uuid4(), 1, 5)


def test_shred_elsewhere_stops_seals(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    # A limit of 40 reserves one seal at a time at first, so the second
    # write reserves again and finds the key destroyed by the other keyring.
    keyring_factory(key_usage_limit=40, active_key_ttl=3600, cache_ttl=3600)
    Base.metadata.create_all(engine)
    _add(engine, 1)
    Keyring(engine, local_kms, set_default=False).shred("t-acme")

    with pytest.raises(se.KeyDestroyedError, match="t-acme"):
        _add(engine, 1, first=1)

    assert len(_name_versions(engine)) == 1


def test_retire_elsewhere_moves_seals_on(
    engine: sa.Engine, keyring_factory: type[Keyring], local_kms: LocalKms
) -> None:
    keyring_factory(key_usage_limit=40, active_key_ttl=3600, cache_ttl=3600)
    Base.metadata.create_all(engine)
    _add(engine, 1)
    operator = Keyring(engine, local_kms, set_default=False)
    operator.rotate("t-acme", KeyPurpose.RANDOMIZED, activate_now=True)
    # Retired without the wait for the application's active-key cache: its
    # next reservation of seals finds the version retired.
    operator.retire("t-acme", 1, KeyPurpose.RANDOMIZED, min_inactive_seconds=0)

    _add(engine, 1, first=1)

    assert _name_versions(engine) == [1, 2]


def test_errors_survive_pickling() -> None:
    full = KeyUsageLimitError(
        "randomized key version 3 of tenant 't-acme' has sealed its limit",
        tenant_id="t-acme",
        key_id=uuid.UUID(int=7),
        version=3,
        replaced=True,
    )
    full.add_note("while encrypting a value for encrypted column persons.name")
    pending = se.KeyPendingError("pending", tenant_id="t-acme", purpose="randomized", version=2)

    copy = pickle.loads(pickle.dumps(full))
    pending_copy = pickle.loads(pickle.dumps(pending))

    assert type(copy) is KeyUsageLimitError
    assert str(copy) == str(full)
    assert (copy.tenant_id, copy.key_id, copy.version, copy.replaced) == (
        "t-acme",
        uuid.UUID(int=7),
        3,
        True,
    )
    assert copy.__notes__ == full.__notes__
    assert (pending_copy.tenant_id, pending_copy.purpose, pending_copy.version) == (
        "t-acme",
        "randomized",
        2,
    )


class _BudgetedProvider:
    """A minimal provider without leases whose randomized keys carry budgets."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sealed: dict[uuid.UUID, int] = {}
        self.keys: list[se.DataKey] = []
        self._new_key()

    def _new_key(self) -> None:
        from sqlalchemy_encrypted._aead import AeadCipher

        key_id = uuid.uuid4()
        budget = se.SealBudget(lambda n: self._reserve(key_id, n), limit=self.limit)
        cipher = AeadCipher(KeyPurpose.RANDOMIZED.algorithm, bytes(range(32)))
        version = len(self.keys) + 1
        self.keys.append(
            se.DataKey(key_id, "t-acme", KeyPurpose.RANDOMIZED, version, cipher, budget)
        )
        self.sealed[key_id] = 0

    def _reserve(self, key_id: uuid.UUID, requested: int) -> int:
        granted = min(requested, self.limit - self.sealed[key_id])
        if granted > 0:
            self.sealed[key_id] += granted
            return granted
        key = next(key for key in self.keys if key.key_id == key_id)
        if key is self.keys[-1]:
            self._new_key()
        raise KeyUsageLimitError(
            "full", tenant_id="t-acme", key_id=key_id, version=key.version, replaced=True
        )

    def active_key(self, tenant_id: str, purpose: KeyPurpose) -> se.DataKey:
        return self.keys[-1]

    def key_by_id(self, key_id: uuid.UUID, expected_tenant: str | None = None) -> se.DataKey:
        return next(key for key in self.keys if key.key_id == key_id)

    def decryptable_keys(self, tenant_id: str, purpose: KeyPurpose) -> list[se.DataKey]:
        return list(reversed(self.keys))


def test_custom_provider_budgets(engine: sa.Engine) -> None:
    provider = _BudgetedProvider(limit=3)
    metadata = sa.MetaData()
    table = sa.Table(
        "notes",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(20), keyring=provider)),
    )
    metadata.create_all(engine)

    with tenant_scope("t-acme"), engine.begin() as conn:
        conn.execute(sa.insert(table), [{"id": i, "body": f"note {i}"} for i in range(7)])
        stored = conn.execute(sa.select(table.c.body).order_by(table.c.id)).scalars().all()

    versions = [
        se.parse_header(bytes(raw)).key_version
        for raw in _raw_values(engine, "SELECT body FROM notes ORDER BY id")
    ]
    assert versions == [1, 1, 1, 2, 2, 2, 3]
    assert stored == [f"note {i}" for i in range(7)]
    assert list(provider.sealed.values()) == [3, 3, 1]


def _raw_values(engine: sa.Engine, sql: str) -> list[bytes]:
    with engine.connect() as conn:
        return [bytes(row[0]) for row in conn.exec_driver_sql(sql)]


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (2**32, [4096, 8192, 16384, 32768, 65536, 65536]),
        (1_000_000, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 15625]),
        (5, [1, 1, 1]),
    ],
)
def test_budget_block_sizes(limit: int, expected: list[int]) -> None:
    requests: list[int] = []

    def reserve(requested: int) -> int:
        requests.append(requested)
        return requested

    budget = se.SealBudget(reserve, limit=limit)
    while len(requests) < len(expected):
        budget.take()

    assert requests == expected
    assert budget.end == sum(expected)


def test_more_keys_than_cache_reserve_once(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    # Each write unwraps its tenant's DEK again, because the cache has room for one.
    keyring = keyring_factory(cache_size=1)
    Base.metadata.create_all(engine)
    tenants = [f"t-{number}" for number in range(10)]
    for round_number in range(3):
        for tenant_number, tenant in enumerate(tenants):
            _add(engine, 1, first=100 * round_number + tenant_number, tenant=tenant)

    counts = keyring.sealed_counts()
    assert counts is not None
    randomized = [k for k in keyring.list_keys() if k.purpose is KeyPurpose.RANDOMIZED]
    assert len(randomized) == len(tenants)
    assert [counts[key.key_id] for key in randomized] == [4096] * len(tenants)


def test_provision_reserves_first_block(
    tmp_path: Path, local_kms: LocalKms, caplog: pytest.LogCaptureFixture
) -> None:
    # The keyring shares the SQLite file with the data, as in the demo.
    engine = sa.create_engine(f"sqlite:///{tmp_path}/one.db", connect_args={"timeout": 0.2})
    keyring = Keyring(engine, local_kms)
    keyring.create_table()
    Base.metadata.create_all(engine)

    keyring.provision("t-acme")

    assert _counters(engine, KeyPurpose.RANDOMIZED) == {1: 4096}
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_encrypted"):
        with Session(engine) as session:
            for index in range(5):
                session.add(Person(tenant_id="t-acme", name=f"P{index}", email=f"p{index}@x.test"))
                session.flush()
            session.commit()
    assert "locked" not in caplog.text
    assert _counters(engine, KeyPurpose.RANDOMIZED) == {1: 4096}
    assert len(_all_names(engine)) == 5
    engine.dispose()
