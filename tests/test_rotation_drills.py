"""Failure drills on PostgreSQL with the persistent keyring and a local KMS:
kill -9 at many points, and a KMS that fails in the middle of a run."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import KeyPurpose, KmsUnavailableError
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import KekInfo, KmsProvider, LocalKms, WrapContext
from sqlalchemy_encrypted.kms.base import GeneratedDataKey
from sqlalchemy_encrypted.rotation import CheckpointStore, ReencryptionJob, census

from .rotation_support import Base, Person, fill_persons

ROOT = Path(__file__).resolve().parent.parent

KILL_ROWS = 20_000
KILLS = 20
KILL_BATCH = 250


def _url_of(engine: sa.Engine) -> str:
    """Return a URL that reaches the engine's test schema from another process."""
    with engine.connect() as conn:
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
    url = engine.url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def _check_nothing_lost(engine: sa.Engine, rows: int) -> None:
    result = census(engine, Base, tables=["persons"])
    for column in result.columns:
        assert column.encrypted == rows, column.label
        assert column.not_encrypted == 0, column.label
        assert column.nulls == 0, column.label
        assert not result.unknown_keys


@pytest.mark.slow
def test_kill_nine_at_twenty_points(pg_engine: sa.Engine, tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    keyring = Keyring(pg_engine, LocalKms.create(key_file))
    keyring.create_table()
    Base.metadata.create_all(pg_engine)
    fill_persons(pg_engine, KILL_ROWS)
    for tenant in ("t-acme", "t-globex"):
        keyring.rotate(tenant, activate_now=True)
    url = _url_of(pg_engine)
    command = [sys.executable, "-m", "tests.rotation_drill_worker", url, str(key_file)]
    rng = random.Random(4)

    killed_after = []
    for _ in range(KILLS):
        process = subprocess.Popen(
            [*command, str(KILL_BATCH)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert process.stdout is not None
        batches = rng.randint(1, 3)
        seen = 0
        for line in process.stdout:
            if line.startswith("progress"):
                seen += 1
            if seen >= batches or line.startswith("done"):
                break
        # Land somewhere inside the next batch: select, re-seal, update or commit.
        time.sleep(rng.uniform(0.0, 0.04))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
        assert process.returncode == -signal.SIGKILL, "the job finished before the kill"
        killed_after.append(seen)
        _check_nothing_lost(pg_engine, KILL_ROWS)

    partial = census(pg_engine, Base, tables=["persons"])
    assert 0 < partial.stale_total < 2 * KILL_ROWS

    finished = subprocess.run(
        [*command, str(KILL_BATCH)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip().endswith("done succeeded")

    _check_nothing_lost(pg_engine, KILL_ROWS)
    assert census(pg_engine, Base).stale() == {}
    with Session(pg_engine) as session:
        people = session.execute(sa.select(Person.id, Person.name, Person.email)).all()
    assert len(people) == KILL_ROWS
    for person_id, name, email in people:
        assert name == f"Person {person_id}"
        assert email == f"person{person_id}@example.test"
    with pg_engine.connect() as conn:
        checkpoints = CheckpointStore().list(conn)
    assert {c.status for c in checkpoints} == {"succeeded"}


class FailingKms(KmsProvider):
    """A local KMS whose unwraps time out after ``budget`` successful calls."""

    provider_name = "local"

    def __init__(self, inner: LocalKms, budget: int) -> None:
        self.inner = inner
        self.budget = budget
        self.calls = 0

    @property
    def kek_id(self) -> str:
        return self.inner.kek_id

    def can_unwrap(self, provider_name: str, kek_id: str) -> bool:
        return self.inner.can_unwrap(provider_name, kek_id)

    def generate_data_key(self, size: int, context: WrapContext) -> GeneratedDataKey:
        return self.inner.generate_data_key(size, context)

    def wrap(self, dek: bytes, context: WrapContext) -> bytes:
        return self.inner.wrap(dek, context)

    def unwrap(self, wrapped: bytes, context: WrapContext, kek_id: str) -> bytes:
        self.calls += 1
        if self.calls > self.budget:
            raise KmsUnavailableError(
                f"KMS request timed out unwrapping the DEK of {context.describe()} (simulated)"
            )
        return self.inner.unwrap(wrapped, context, kek_id)

    def describe_kek(self, kek_id: str | None = None) -> KekInfo:
        return self.inner.describe_kek(kek_id)


KMS_ROWS = 2000
KMS_TENANTS = 10


def _tenant_of(person_id: int) -> str:
    # Tenants occupy consecutive primary key ranges, so a job meets each
    # tenant's keys (and needs an unwrap) only when it reaches its range.
    return f"t-{(person_id - 1) * KMS_TENANTS // KMS_ROWS:02d}"


def _people(engine: sa.Engine) -> dict[int, tuple[Any, Any]]:
    with Session(engine) as session:
        rows = session.execute(sa.select(Person.id, Person.name, Person.email)).all()
    return {row[0]: (row[1], row[2]) for row in rows}


def test_kms_failure_mid_run(pg_engine: sa.Engine, tmp_path: Path) -> None:
    local = LocalKms.create(tmp_path / "master.key")
    setup = Keyring(pg_engine, local)
    setup.create_table()
    Base.metadata.create_all(pg_engine)
    rows = [
        {"id": i, "tenant_id": _tenant_of(i), "name": f"Person {i}", "email": f"p{i}@example.test"}
        for i in range(1, KMS_ROWS + 1)
    ]
    with pg_engine.begin() as conn:
        conn.execute(sa.insert(Person.__table__), rows)
    for tenant in sorted({row["tenant_id"] for row in rows}):
        setup.rotate(tenant, activate_now=True)
    before = _people(pg_engine)

    # A new process: cold DEK cache, and a KMS that fails after 16 unwraps
    # (old and new key of both purposes for four tenants).
    failing = FailingKms(local, budget=16)
    Keyring(pg_engine, failing)
    job = ReencryptionJob(pg_engine, Base, tables=["persons"], batch_size=100)
    with pytest.raises(KmsUnavailableError, match="timed out") as caught:
        job.run()
    assert "'t-04'" in str(caught.value)
    assert failing.calls == 17

    restarted = Keyring(pg_engine, local)
    assert _people(pg_engine) == before
    partial = census(pg_engine, Base, tables=["persons"])
    done = 2 * KMS_ROWS - partial.stale_total
    assert done == 2 * 4 * KMS_ROWS // KMS_TENANTS
    with pg_engine.connect() as conn:
        (checkpoint,) = CheckpointStore().list(conn)
    assert checkpoint.status == "failed"
    assert checkpoint.error is not None
    assert checkpoint.error.startswith("KmsUnavailableError: KMS request timed out")
    assert checkpoint.cursor == (800,)

    result = ReencryptionJob(pg_engine, Base, tables=["persons"], batch_size=100).run()

    assert result.ok
    assert result.values_reencrypted == 2 * KMS_ROWS - done
    assert _people(pg_engine) == before
    assert census(pg_engine, Base).stale() == {}
    assert restarted.active_key("t-09", KeyPurpose.RANDOMIZED).version == 2
    se.set_default_key_provider(None)
