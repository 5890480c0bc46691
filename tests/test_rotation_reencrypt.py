"""The re-encryption engine on SQLite and PostgreSQL with the in-memory keyring."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import logging
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import (
    ConfigurationError,
    KeyPurpose,
    KmsUnavailableError,
    ReencryptionError,
    tenant_scope,
)
from sqlalchemy_encrypted.keys import DataKey
from sqlalchemy_encrypted.rotation import (
    CheckpointStore,
    ReencryptionJob,
    ReencryptionProgress,
    census,
    reencrypt,
)
from sqlalchemy_encrypted.rotation.checkpoint import Checkpoint
from sqlalchemy_encrypted.rotation.ratelimit import RateLimiter
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .rotation_support import (
    Base,
    Color,
    Membership,
    Person,
    Typed,
    fill_persons,
    key_versions,
    raw_values,
)


@pytest.fixture
def schema(engine: sa.Engine, keyring: InMemoryKeyring) -> sa.Engine:
    Base.metadata.create_all(engine)
    return engine


def _people(engine: sa.Engine) -> dict[int, tuple[str | None, str | None]]:
    with Session(engine) as session:
        return {p.id: (p.name, p.email) for p in session.scalars(sa.select(Person))}


def test_reencrypt_moves_stale_values(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 23)
    before = _people(schema)
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")

    result = ReencryptionJob(schema, Base, tables=["persons"], batch_size=5).run()

    assert result.status == "succeeded"
    assert result.planned == {"persons.name": 23, "persons.email": 23}
    assert result.remaining == {}
    assert result.values_reencrypted == 46
    assert result.failures == []
    assert key_versions(raw_values(schema, "persons", "name").values()) == [2]
    assert key_versions(raw_values(schema, "persons", "email").values()) == [2]
    assert _people(schema) == before
    assert census(schema, Base, tables=["persons"]).stale() == {}


def test_reencrypt_keeps_tenant_of_each_value(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 6)
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")

    reencrypt(schema, Base, tables=["persons"])

    for entry in census(schema, Base, tables=["persons"]):
        assert entry.key_version == 2
        assert entry.count == 3
    with Session(schema) as session, tenant_scope("t-acme"):
        found = session.scalars(sa.select(Person).where(Person.email == "person2@example.test"))
        assert [p.tenant_id for p in found] == ["t-acme"]


def test_reencrypt_one_tenant_only(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 10)
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")

    result = reencrypt(schema, Base, tables=["persons"], tenants=["t-acme"])

    assert result.ok
    after = census(schema, Base, tables=["persons"])
    assert after.stale(tenants=["t-acme"]) == {}
    assert after.stale(tenants=["t-globex"]) == {"persons.name": 5, "persons.email": 5}


def test_reencrypt_named_version(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 4)
    keyring.rotate("t-acme")
    fill_persons(schema, 4, start=5)
    keyring.rotate("t-acme")

    result = reencrypt(schema, Base, columns=["persons.name"], tenants=["t-acme"], versions=[1])

    assert result.ok
    versions = {
        (e.tenant_id, e.key_version): e.count for e in census(schema, Base, columns=["name"])
    }
    assert versions == {("t-acme", 2): 2, ("t-acme", 3): 2, ("t-globex", 1): 4}


def test_dry_run_writes_nothing(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 8)
    keyring.rotate("t-acme")
    stored = raw_values(schema, "persons", "name")

    result = ReencryptionJob(schema, Base, dry_run=True).run()

    assert result.status == "dry_run"
    assert result.ok
    assert result.planned == {"persons.name": 4, "persons.email": 4}
    assert result.values_reencrypted == 0
    assert raw_values(schema, "persons", "name") == stored
    assert not sa.inspect(schema).has_table("encryption_reencrypt_checkpoints")


def test_reencrypt_with_nothing_stale(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 3)

    result = reencrypt(schema, Base)

    assert result.status == "succeeded"
    assert result.planned == {}
    assert result.passes == 0


def test_reencrypt_preserves_every_value_type(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    row = {
        "id": 1,
        "tenant_id": "t-acme",
        "text_b64": "tëxt",
        "number": -(2**40),
        "amount": decimal.Decimal("1234.50"),
        "ratio": 0.1,
        "flag": False,
        "born": dt.date(1990, 2, 28),
        "seen": dt.datetime(2024, 5, 1, 12, 30, 1, 5, tzinfo=dt.UTC),
        "ref": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "doc": {"b": [1, 2.5, None], "a": "z"},
        "color": Color.BLUE,
        "raw": b"\x00\xff",
    }
    with Session(schema) as session:
        session.add(Typed(**row))
        session.add(Typed(id=2, tenant_id="t-acme"))
        session.commit()
    keyring.rotate("t-acme")

    result = reencrypt(schema, Base, tables=["typed_values"])

    assert result.ok
    assert result.values_reencrypted == len(row) - 2
    with Session(schema) as session:
        loaded = session.get(Typed, 1)
        empty = session.get(Typed, 2)
        assert loaded is not None and empty is not None
        for name, value in row.items():
            assert getattr(loaded, name) == value, name
        assert empty.text_b64 is None
        assert empty.doc is None
    assert key_versions(raw_values(schema, "typed_values", "number").values()) == [2]


def test_reencrypt_composite_primary_key(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    with schema.begin() as conn:
        conn.execute(
            sa.insert(Membership.__table__),
            [
                {"tenant_id": tenant, "user_key": f"u{i}", "role": f"role {i}"}
                for tenant in ("t-acme", "t-globex")
                for i in range(7)
            ],
        )
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")

    result = reencrypt(schema, Base, tables=["memberships"], batch_size=3)

    assert result.ok
    assert result.values_reencrypted == 14
    with Session(schema) as session:
        roles = session.execute(sa.select(Membership.user_key, Membership.role)).all()
    assert sorted(roles) == sorted((f"u{i}", f"role {i}") for i in range(7) for _ in range(2))


def test_progress_reports_running_totals(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 12)
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")
    seen: list[ReencryptionProgress] = []

    reencrypt(schema, Base, tables=["persons"], batch_size=5, progress=seen.append)

    assert [p.rows_scanned for p in seen] == [5, 10, 12]
    assert seen[-1].values_reencrypted == 24
    assert all(p.values_planned == 24 for p in seen)
    assert all(p.table == "persons" and p.pass_number == 1 for p in seen)


class _Crash(Exception):
    pass


def test_resume_from_checkpoint(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 20)
    before = _people(schema)
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")

    def crash_after_two(progress: ReencryptionProgress) -> None:
        if progress.rows_scanned >= 8:
            raise _Crash

    with pytest.raises(_Crash):
        reencrypt(schema, Base, tables=["persons"], batch_size=4, progress=crash_after_two)

    store = CheckpointStore()
    with schema.connect() as conn:
        (checkpoint,) = store.list(conn)
    assert checkpoint.status == "failed"
    assert checkpoint.error is not None and "_Crash" in checkpoint.error
    # The crashing callback ran after the second batch committed.
    assert checkpoint.cursor == (8,)
    assert checkpoint.values_reencrypted == 16

    scanned: list[int] = []
    result = reencrypt(
        schema,
        Base,
        tables=["persons"],
        batch_size=4,
        progress=lambda p: scanned.append(p.rows_scanned),
    )

    assert result.ok
    assert result.values_reencrypted == 24
    assert scanned[-1] == 12
    assert _people(schema) == before
    with schema.connect() as conn:
        (checkpoint,) = store.list(conn)
    assert checkpoint.status == "succeeded"
    assert checkpoint.cursor is None
    assert checkpoint.values_reencrypted == 40


def _corrupt_names(engine: sa.Engine, ids: list[int]) -> dict[int, bytes]:
    """Flip the last byte of each row's stored name, and return the values as they were."""
    stored = raw_values(engine, "persons", "name")
    with engine.begin() as conn:
        for row_id in ids:
            corrupt = bytearray(stored[row_id])
            corrupt[-1] ^= 0x01
            conn.execute(
                sa.text("UPDATE persons SET name = :v WHERE id = :id"),
                {"v": bytes(corrupt), "id": row_id},
            )
    return {row_id: stored[row_id] for row_id in ids}


def _restore_names(engine: sa.Engine, names: dict[int, bytes]) -> None:
    with engine.begin() as conn:
        for row_id, stored in names.items():
            conn.execute(
                sa.text("UPDATE persons SET name = :v WHERE id = :id"), {"v": stored, "id": row_id}
            )


def _checkpoints(engine: sa.Engine) -> list[Checkpoint]:
    with engine.connect() as conn:
        return CheckpointStore().list(conn)


def test_checkpoint_counts_failed_row_once(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    """The second pass tries the failed rows again without counting them twice."""
    fill_persons(schema, 12)
    _corrupt_names(schema, [3, 8])
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")

    result = reencrypt(schema, Base, tables=["persons"], batch_size=4)

    (checkpoint,) = _checkpoints(schema)
    assert result.passes == 2
    assert result.failures_total == 2
    assert checkpoint.rows_failed == 2


def test_resumed_run_counts_own_failures(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 12)
    names = _corrupt_names(schema, [3, 8])
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")
    first = reencrypt(schema, Base, tables=["persons"], batch_size=4)
    _restore_names(schema, {3: names[3]})

    second = reencrypt(schema, Base, tables=["persons"], batch_size=4)

    (checkpoint,) = _checkpoints(schema)
    assert first.failures_total == 2
    assert second.failures_total == 1
    assert checkpoint.status == "failed"
    assert checkpoint.rows_failed == 1


def test_resumed_run_keeps_earlier_failure(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    """The checkpoint counts the resumed run's failures and notes the earlier
    run's, while the run goes on and after it succeeded, until a fresh run."""
    fill_persons(schema, 12)
    names = _corrupt_names(schema, [3])
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")
    first = reencrypt(schema, Base, tables=["persons"], batch_size=4)
    _restore_names(schema, names)
    running: list[Checkpoint] = []

    second = reencrypt(
        schema,
        Base,
        tables=["persons"],
        batch_size=4,
        progress=lambda progress: running.extend(_checkpoints(schema)),
    )

    (finished,) = _checkpoints(schema)
    note = (
        "an earlier run failed: values left under an old key version or failed rows "
        "(1 row(s) failed)"
    )
    assert first.status == "failed"
    assert second.ok
    assert running[0].status == "running"
    assert running[0].rows_failed == 0
    assert running[0].error == note
    assert finished.status == "succeeded"
    assert finished.rows_failed == 0
    assert finished.error == note
    assert finished.values_reencrypted == 24
    keyring.rotate("t-acme")
    assert reencrypt(schema, Base, tables=["persons"]).ok
    (fresh,) = _checkpoints(schema)
    assert fresh.error is None


def test_resumed_failure_after_crash(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    """A run stopped by an error, with rows failed before it, is noted with both."""
    fill_persons(schema, 12)
    names = _corrupt_names(schema, [2])

    def crash_after_first_batch(progress: ReencryptionProgress) -> None:
        raise _Crash("stopped")

    keyring.rotate("t-acme")
    keyring.rotate("t-globex")
    with pytest.raises(_Crash):
        reencrypt(schema, Base, tables=["persons"], batch_size=4, progress=crash_after_first_batch)
    _restore_names(schema, names)

    result = reencrypt(schema, Base, tables=["persons"], batch_size=4)

    (checkpoint,) = _checkpoints(schema)
    assert result.ok
    assert checkpoint.rows_failed == 0
    assert checkpoint.error == "an earlier run failed: _Crash: stopped (1 row(s) failed)"


def test_resume_with_fewer_workers_resets_failures(
    pg_engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    """A slot that the resumed run does not use keeps no failure count of the
    earlier run, only its note."""
    Base.metadata.create_all(pg_engine)
    fill_persons(pg_engine, 40)
    names = _corrupt_names(pg_engine, [5, 15, 25, 35])
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")

    def pause(progress: ReencryptionProgress) -> None:
        # Slow batches, so that both workers take part.
        time.sleep(0.02)

    first = ReencryptionJob(
        pg_engine, Base, tables=["persons"], workers=2, batch_size=4, progress=pause
    ).run()
    after_first = _checkpoints(pg_engine)
    _restore_names(pg_engine, names)

    second = reencrypt(pg_engine, Base, tables=["persons"], batch_size=4)

    after_second = _checkpoints(pg_engine)
    assert first.failures_total == 4
    assert [checkpoint.slot for checkpoint in after_first] == [0, 1]
    assert sum(checkpoint.rows_failed for checkpoint in after_first) == 4
    assert second.ok
    assert [(c.slot, c.status, c.rows_failed) for c in after_second] == [
        (0, "succeeded", 0),
        (1, "succeeded", 0),
    ]
    for checkpoint in after_second:
        assert checkpoint.error is not None
        assert checkpoint.error.startswith("an earlier run failed: "), checkpoint.error


def test_second_run_starts_afresh(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 6)
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")
    assert reencrypt(schema, Base, tables=["persons"]).ok
    keyring.rotate("t-acme")

    result = reencrypt(schema, Base, tables=["persons"])

    assert result.values_reencrypted == 6
    assert census(schema, Base).stale() == {}


def test_failed_rows_are_reported(
    schema: sa.Engine, keyring: InMemoryKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    fill_persons(schema, 6)
    stored = raw_values(schema, "persons", "name")
    corrupt = bytearray(stored[3])
    corrupt[-1] ^= 0x01
    with schema.begin() as conn:
        conn.execute(sa.text("UPDATE persons SET name = :v WHERE id = 3"), {"v": bytes(corrupt)})
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")

    with caplog.at_level(logging.WARNING, logger="sqlalchemy_encrypted"):
        result = reencrypt(schema, Base, tables=["persons"])

    assert result.status == "failed"
    assert not result.ok
    assert result.failures_total == 1
    failure = result.failures[0]
    assert (failure.table, failure.column, failure.primary_key) == ("persons", "name", (3,))
    assert failure.error_class == "DecryptionError"
    assert result.remaining == {"persons.name": 1}
    assert result.values_reencrypted == 11
    assert result.passes == 2
    assert "persons.name primary key (3,): DecryptionError" in caplog.text
    with pytest.raises(ReencryptionError, match=r"persons\.name primary key \(3,\)"):
        result.raise_for_failures()


def test_unknown_key_ids_fail_raise_for_failures(
    schema: sa.Engine, keyring: InMemoryKeyring
) -> None:
    fill_persons(schema, 4)
    foreign = InMemoryKeyring().active_key("t-acme", KeyPurpose.RANDOMIZED)
    envelope = Person.__table__.c.name.type.seal("Ghost", key=foreign)
    with schema.begin() as conn:
        conn.execute(sa.text("UPDATE persons SET name = :v WHERE id = 2"), {"v": envelope})
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")

    result = reencrypt(schema, Base, tables=["persons"])

    assert result.status == "succeeded"
    assert result.unknown_keys == {"persons.name": 1}
    assert result.values_reencrypted == 7
    with pytest.raises(ReencryptionError) as raised:
        result.raise_for_failures()
    assert "missing from the keyring table (persons.name: 1)" in str(raised.value)
    assert "Ghost" not in str(raised.value)


def test_value_of_other_tenant_is_not_resealed(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 4)
    with schema.begin() as conn:
        # Row 2 (t-acme) receives the stored name of row 1 (t-globex).
        conn.exec_driver_sql(
            "UPDATE persons SET name = (SELECT name FROM persons WHERE id = 1) WHERE id = 2"
        )
    moved = raw_values(schema, "persons", "name")[2]
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")

    result = reencrypt(schema, Base, columns=["persons.name"])

    assert [(f.primary_key, f.error_class) for f in result.failures] == [
        ((2,), "TenantContextError")
    ]
    assert raw_values(schema, "persons", "name")[2] == moved


def test_concurrent_write_wins(
    schema: sa.Engine, keyring: InMemoryKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    if schema.dialect.name == "postgresql":
        pytest.skip("PostgreSQL locks the rows (FOR UPDATE); the writer drill covers it")
    fill_persons(schema, 6)
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")
    from sqlalchemy_encrypted.rotation import worker

    original = worker.TableWorker._reseal

    def reseal_then_app_writes(self: Any, rows: Any, failures: Any) -> Any:
        updates = original(self, rows, failures)
        # An application writes row 4 after the worker read it.
        with Session(schema) as session:
            person = session.get(Person, 4)
            assert person is not None
            person.name = "written by the app"
            session.commit()
        return updates

    monkeypatch.setattr(worker.TableWorker, "_reseal", reseal_then_app_writes)
    result = reencrypt(schema, Base, columns=["persons.name"], batch_size=100, max_passes=1)
    monkeypatch.undo()

    assert result.rows_skipped == 1
    assert result.values_reencrypted == 5
    assert _people(schema)[4][0] == "written by the app"


def test_active_key_older_than_value_stops(
    schema: sa.Engine, keyring: InMemoryKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill_persons(schema, 2)
    old_key = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    keyring.rotate("t-acme")
    fill_persons(schema, 2, start=3)
    keyring.rotate("t-acme")

    real_active = keyring.active_key

    def stale_view(tenant_id: str, purpose: KeyPurpose) -> DataKey:
        # A process whose active-key cache still returns version 1.
        if tenant_id == "t-acme" and purpose is KeyPurpose.RANDOMIZED:
            return old_key
        return real_active(tenant_id, purpose)

    monkeypatch.setattr(keyring, "active_key", stale_view)
    with pytest.raises(ReencryptionError, match="wait for the active-key cache"):
        reencrypt(schema, Base, columns=["persons.name"], tenants=["t-acme"])


class _FailingKms:
    """A key provider whose key lookups fail like an unreachable KMS after
    ``budget`` successful calls."""

    def __init__(self, inner: InMemoryKeyring, budget: int) -> None:
        self.inner = inner
        self.budget = budget

    def _spend(self) -> None:
        if self.budget <= 0:
            raise KmsUnavailableError("KMS request timed out for key alias/test (simulated)")
        self.budget -= 1

    def active_key(self, tenant_id: str, purpose: KeyPurpose) -> DataKey:
        self._spend()
        return self.inner.active_key(tenant_id, purpose)

    def key_by_id(self, key_id: uuid.UUID, expected_tenant: str | None = None) -> DataKey:
        self._spend()
        return self.inner.key_by_id(key_id, expected_tenant)

    def decryptable_keys(self, tenant_id: str, purpose: KeyPurpose) -> list[DataKey]:
        return list(self.inner.decryptable_keys(tenant_id, purpose))


def test_kms_failure_stops_job_and_restart_finishes(
    schema: sa.Engine, keyring: InMemoryKeyring
) -> None:
    import sqlalchemy_encrypted as se

    fill_persons(schema, 30)
    before = _people(schema)
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")
    failing = _FailingKms(keyring, budget=60)
    se.set_default_key_provider(failing)

    with pytest.raises(KmsUnavailableError, match="timed out"):
        reencrypt(schema, Base, tables=["persons"], batch_size=4)

    se.set_default_key_provider(keyring)
    assert _people(schema) == before
    partial = census(schema, Base, tables=["persons"])
    assert 0 < partial.stale_total < 60
    with schema.connect() as conn:
        (checkpoint,) = CheckpointStore().list(conn)
    assert checkpoint.status == "failed"
    assert checkpoint.error is not None and "KmsUnavailableError" in checkpoint.error

    result = reencrypt(schema, Base, tables=["persons"], batch_size=4)

    assert result.ok
    assert _people(schema) == before
    assert census(schema, Base).stale() == {}


def test_job_inside_callers_transaction(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 5)
    keyring.rotate("t-acme")
    stored = raw_values(schema, "persons", "name")

    with schema.connect() as conn:
        with conn.begin() as transaction:
            result = reencrypt(conn, Base, tables=["persons"], batch_size=2)
            assert result.ok
            assert census(conn, Base).stale() == {}
            transaction.rollback()

    assert raw_values(schema, "persons", "name") == stored


def test_invalid_options_are_rejected(schema: sa.Engine) -> None:
    with pytest.raises(ConfigurationError, match="batch size"):
        ReencryptionJob(schema, Base, batch_size=0)
    if schema.dialect.name == "sqlite":
        with pytest.raises(ConfigurationError, match="need PostgreSQL"):
            ReencryptionJob(schema, Base, workers=2)
    with schema.connect() as conn, pytest.raises(ConfigurationError, match="checkpoint"):
        ReencryptionJob(conn, Base, checkpoint=True)


def test_rate_limiter_spaces_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    from sqlalchemy_encrypted.rotation import ratelimit

    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(ratelimit.time, "sleep", sleep)
    limiter = RateLimiter(rate=100.0)

    for _ in range(4):
        limiter.acquire(50)

    assert sleeps == pytest.approx([0.5, 0.5, 0.5])
    with pytest.raises(ConfigurationError, match="rows per second"):
        RateLimiter(0)


def test_reseal_keeps_plaintext_and_tenant(keyring: InMemoryKeyring) -> None:
    from sqlalchemy_encrypted import TenantContextError, parse_header

    column_type = Typed.__table__.c.doc.type
    stored = column_type.seal({"b": 1, "a": [1.5, None]}, tenant_id="t-acme")
    keyring.rotate("t-acme")
    new_key = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)

    resealed = column_type.reseal(stored, new_key)

    assert parse_header(resealed).key_version == 2
    assert column_type.decrypt(resealed) == {"b": 1, "a": [1.5, None]}
    other = keyring.active_key("t-globex", KeyPurpose.RANDOMIZED)
    with pytest.raises(TenantContextError, match="cannot re-encrypt a value of tenant 't-acme'"):
        column_type.reseal(stored, other)
    base64_type = Typed.__table__.c.text_b64.type
    with tenant_scope("t-acme"):
        stored_text = base64_type.process_bind_param("tëxt", None)
    assert isinstance(stored_text, str)
    resealed_text = base64.b64encode(base64_type.reseal(stored_text, new_key)).decode()
    assert base64_type.decrypt(resealed_text) == "tëxt"


def test_reencrypt_quoted_names_in_schema(pg_engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    """Mixed-case names with spaces, a schema, a text primary key and base64
    storage, through PostgreSQL's array update."""
    from sqlalchemy_encrypted import Encrypted

    with pg_engine.connect() as conn:
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
    table = sa.Table(
        "Member Notes",
        sa.MetaData(),
        sa.Column("Key", sa.String(20), primary_key=True),
        sa.Column("Tenant", sa.String(40)),
        sa.Column("Body Text", Encrypted(sa.String(60), storage="base64")),
        schema=schema,
        info={"tenant_column": "Tenant"},
    )
    table.create(pg_engine)
    with pg_engine.begin() as conn:
        conn.execute(
            sa.insert(table),
            [{"Key": f"k{i:03d}", "Tenant": "t-acme", "Body Text": f"note {i}"} for i in range(9)],
        )
    keyring.rotate("t-acme")

    result = reencrypt(pg_engine, table, batch_size=4)

    assert result.ok
    assert result.values_reencrypted == 9
    with pg_engine.connect() as conn:
        rows = conn.execute(sa.select(table.c["Key"], table.c["Body Text"])).all()
    assert sorted(rows) == [(f"k{i:03d}", f"note {i}") for i in range(9)]
    entries = list(census(pg_engine, table))
    assert [(e.table, e.key_version, e.count) for e in entries] == [
        (f"{schema}.Member Notes", 2, 9)
    ]
