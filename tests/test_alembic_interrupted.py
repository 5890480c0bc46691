"""Interrupted conversions: a KMS failure half-way, then running the migration again."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import (
    Encrypted,
    KeyPurpose,
    KmsUnavailableError,
    set_default_key_provider,
)
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.keys import DataKey, KeyLease, LeaseGeneration
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .alembic_env import AlembicEnv
from .models import Person
from .test_alembic_encrypt_column import (
    CREATE_PERSONS,
    DECRYPT_PERSONS,
    ENCRYPT_PERSONS,
    plain_rows,
    raw_rows,
    seed,
)


class FlakyKeyring(InMemoryKeyring):
    """An in-memory keyring whose KMS stops responding after ``fail_after`` key lookups."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_after: int | None = None
        self.calls = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KmsUnavailableError("the KMS timed out (injected by the test)")

    def active_key(self, tenant_id: str, purpose: KeyPurpose) -> DataKey:
        self._maybe_fail()
        return super().active_key(tenant_id, purpose)

    def key_by_id(self, key_id: Any, expected_tenant: str | None = None) -> DataKey:
        self._maybe_fail()
        return super().key_by_id(key_id, expected_tenant)

    # Expired leases make the columns ask for every value, so that the
    # failure lands in the middle of a conversion.
    def active_key_lease(self, tenant_id: str, purpose: KeyPurpose) -> KeyLease:
        return KeyLease(self.active_key(tenant_id, purpose), _EXPIRED, LeaseGeneration(), 0)

    def key_lease(self, key_id: Any, expected_tenant: str | None = None) -> KeyLease:
        return KeyLease(self.key_by_id(key_id, expected_tenant), _EXPIRED, LeaseGeneration(), 0)


_EXPIRED = float("-inf")


@pytest.fixture
def flaky() -> Any:
    provider = FlakyKeyring()
    set_default_key_provider(provider)
    yield provider
    set_default_key_provider(None)


def _env(tmp_path: Path, engine: sa.Engine, upgrade: str, downgrade: str) -> AlembicEnv:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    env.write_revision("r2", "r1", upgrade, downgrade)
    return env


def _names(engine: sa.Engine) -> list[str]:
    return [c["name"] for c in sa.inspect(engine).get_columns("persons")]


def test_kms_failure_then_rerun_finishes(
    tmp_path: Path, engine: sa.Engine, flaky: FlakyKeyring
) -> None:
    env = _env(tmp_path, engine, ENCRYPT_PERSONS, DECRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(40)
    seed(engine, rows)
    flaky.fail_after = 20  # the name column is sealed in batches of 7

    with pytest.raises(KmsUnavailableError):
        env.upgrade("head")

    # The plaintext column is untouched and the converted batches sit in a
    # separate column, each value either NULL (not yet done) or an envelope.
    assert env.current() == "r1"
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]
    assert _names(engine) == ["id", "tenant_id", "name", "email", "name__encrypting"]
    partial = raw_rows(engine, "name__encrypting")
    done = [v for (v,) in partial if v is not None]
    assert 0 < len(done) < 36
    assert all(v[0] == 0x01 for v in done)

    flaky.fail_after = None
    env.upgrade("head")

    assert env.current() == "r2"
    assert _names(engine) == ["id", "tenant_id", "name", "email"]
    name_report = env.reports[0]
    assert name_report.resumed == len(done)
    assert (name_report.converted, name_report.null) == (36, 4)
    with Session(engine) as session:
        people = session.scalars(sa.select(Person).order_by(Person.id)).all()
        assert [(p.name, p.email) for p in people] == [(r["name"], r["email"]) for r in rows]


def test_kms_failure_in_downgrade_then_rerun(
    tmp_path: Path, engine: sa.Engine, flaky: FlakyKeyring
) -> None:
    env = _env(tmp_path, engine, ENCRYPT_PERSONS, DECRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(30)
    seed(engine, rows)
    env.upgrade("head")
    encrypted = raw_rows(engine)
    flaky.calls = 0
    flaky.fail_after = 10

    with pytest.raises(KmsUnavailableError):
        env.downgrade("r1")

    assert env.current() == "r2"
    assert raw_rows(engine) == encrypted
    flaky.fail_after = None
    env.downgrade("r1")
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]


SINGLE_TRANSACTION = """
op.encrypt_column(
    "persons", "name",
    type_=sqlalchemy_encrypted.Encrypted(sa.String(100)),
    tenant_column="tenant_id",
    batch_size=5,
    commit_batches=False,
)
"""


def test_single_transaction_failure_leaves_table_as_it_was(
    tmp_path: Path, engine: sa.Engine, flaky: FlakyKeyring
) -> None:
    env = _env(tmp_path, engine, SINGLE_TRANSACTION, "pass")
    env.upgrade("r1")
    rows = plain_rows(30)
    seed(engine, rows)
    flaky.fail_after = 12

    with pytest.raises(KmsUnavailableError):
        env.upgrade("head")

    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]
    assert _names(engine) == ["id", "tenant_id", "name", "email"]
    flaky.fail_after = None
    env.upgrade("head")
    with Session(engine) as session:
        name = session.scalars(sa.select(Person.name).where(Person.id == 3)).one()
    assert name == "Person 3 \u00e9"


def test_application_writes_during_conversion_are_kept(
    tmp_path: Path, engine: sa.Engine, flaky: FlakyKeyring
) -> None:
    env = _env(tmp_path, engine, ENCRYPT_PERSONS, DECRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(20)
    seed(engine, rows)
    flaky.fail_after = 10
    with pytest.raises(KmsUnavailableError):
        env.upgrade("head")
    # The application, still on the plaintext model, changes rows the
    # interrupted run had already converted, and adds one.
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE persons SET name = 'Renamed' WHERE id = 1")
        conn.exec_driver_sql("UPDATE persons SET name = NULL WHERE id = 3")
        conn.exec_driver_sql(
            "INSERT INTO persons (id, tenant_id, name) VALUES (99, 't-acme', 'Late')"
        )
    flaky.fail_after = None

    env.upgrade("head")

    with Session(engine) as session:
        assert session.get(Person, 1).name == "Renamed"
        assert session.get(Person, 3).name is None
        assert session.get(Person, 99).name == "Late"
        assert session.get(Person, 2).name == "Person 2 \u00e9"


KILLED_WORKER = """
import os
import signal
import sys

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

url, ini, key_file, kill_after = sys.argv[1:5]
engine = sa.create_engine(url)
Keyring(engine, LocalKms(key_file))
updates = 0


@sa.event.listens_for(engine, "after_cursor_execute")
def kill_mid_batch(conn, cursor, statement, parameters, context, executemany):
    # SIGKILL right after the UPDATE of a batch, before its COMMIT.
    global updates
    if statement.startswith("UPDATE") and "name__encrypting" in statement:
        updates += 1
        if updates == int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)


config = Config(ini)
config.attributes["engine"] = engine
config.attributes["reports"] = []
command.upgrade(config, "head")
"""


def _subprocess_url(engine: sa.Engine) -> str:
    url = engine.url
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def test_killed_migration_resumes(tmp_path: Path, engine: sa.Engine, local_kms: Any) -> None:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("k1", None, "op.create_keyring_table()")
    env.write_revision("r1", "k1", CREATE_PERSONS)
    env.write_revision("r2", "r1", ENCRYPT_PERSONS, DECRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(40)
    seed(engine, rows)
    worker = tmp_path / "worker.py"
    worker.write_text(KILLED_WORKER)
    key_file = tmp_path / "master.key"

    process = subprocess.run(
        [sys.executable, str(worker), _subprocess_url(engine), str(env.ini), str(key_file), "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert process.returncode == -signal.SIGKILL, process.stderr
    assert env.current() == "r1"
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]
    shadow = [v for (v,) in raw_rows(engine, "name__encrypting") if v is not None]
    # Batches of 7 rows and one NULL name (id 10) among the first 14 rows: the
    # two committed batches hold 13 envelopes, the killed third batch none.
    assert len(shadow) == 13
    assert all(v[0] == 0x01 for v in shadow)

    Keyring(engine, local_kms)
    env.upgrade("head")

    assert env.current() == "r2"
    name_report = env.reports[0]
    assert name_report.resumed == 13
    assert (name_report.converted, name_report.null) == (36, 4)
    with Session(engine) as session:
        people = session.scalars(sa.select(Person).order_by(Person.id)).all()
        assert [(p.name, p.email) for p in people] == [(r["name"], r["email"]) for r in rows]


def test_single_transaction_rerun_counts_resumed(
    tmp_path: Path, engine: sa.Engine, flaky: FlakyKeyring
) -> None:
    env = _env(tmp_path, engine, "pass", "pass")
    env.upgrade("r1")
    seed(engine, plain_rows(30))
    name_type = Encrypted(sa.String(100))
    flaky.fail_after = 12
    with engine.connect() as conn, pytest.raises(KmsUnavailableError):
        Operations(MigrationContext.configure(connection=conn)).encrypt_column(
            "persons", "name", type_=name_type, tenant_column="tenant_id", batch_size=5
        )
    done = [v for (v,) in raw_rows(engine, "name__encrypting") if v is not None]
    flaky.fail_after = None

    with engine.connect() as conn:
        report = Operations(MigrationContext.configure(connection=conn)).encrypt_column(
            "persons", "name", type_=name_type, tenant_column="tenant_id", commit_batches=False
        )
        conn.commit()

    assert len(done) > 0
    assert report.resumed == len(done)
    assert (report.converted, report.null, report.rewritten) == (27, 3, 0)


def test_concurrent_write_during_fill_is_caught(
    tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    env = _env(tmp_path, engine, ENCRYPT_PERSONS, DECRYPT_PERSONS)
    env.upgrade("r1")
    seed(engine, plain_rows(30))
    updates = 0

    def application_write(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # Before the second batch of name values is written, the application
        # (still on the plaintext model) renames a row the first batch sealed.
        nonlocal updates
        if statement.startswith("UPDATE") and "name__encrypting" in statement:
            updates += 1
            if updates == 2:
                with engine.begin() as other:
                    other.exec_driver_sql("UPDATE persons SET name = 'Changed' WHERE id = 2")

    sa.event.listen(engine, "before_cursor_execute", application_write)
    try:
        env.upgrade("head")
    finally:
        sa.event.remove(engine, "before_cursor_execute", application_write)

    name_report = env.reports[0]
    assert name_report.rewritten == 1
    with Session(engine) as session:
        assert session.get(Person, 2).name == "Changed"
