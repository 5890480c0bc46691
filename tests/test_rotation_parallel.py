"""Workers sharing a table on PostgreSQL, and application writes during a run."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.rotation import (
    CheckpointStore,
    ReencryptionJob,
    ReencryptionResult,
    census,
)

from .rotation_support import Base, Person, fill_persons

ROWS = 3000

_COUNT_UPDATES = """
CREATE TABLE update_counts (id integer PRIMARY KEY, n integer NOT NULL);
CREATE FUNCTION count_update() RETURNS trigger AS $$
BEGIN
    INSERT INTO update_counts VALUES (NEW.id, 1)
    ON CONFLICT (id) DO UPDATE SET n = update_counts.n + 1;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER persons_count_update AFTER UPDATE ON persons
    FOR EACH ROW EXECUTE FUNCTION count_update();
"""


@pytest.fixture
def rotated(pg_engine: sa.Engine, tmp_path: Path) -> Iterator[sa.Engine]:
    """ROWS persons under version 1 in a keyring with a local KMS, a trigger
    counting updates per row, then a rotation of both tenants."""
    keyring = Keyring(pg_engine, LocalKms.create(tmp_path / "master.key"))
    keyring.create_table()
    Base.metadata.create_all(pg_engine)
    fill_persons(pg_engine, ROWS)
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(_COUNT_UPDATES)
    keyring.rotate("t-acme", activate_now=True)
    keyring.rotate("t-globex", activate_now=True)
    yield pg_engine


def _update_counts(engine: sa.Engine) -> dict[int, int]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, n FROM update_counts").all()
    return {row[0]: row[1] for row in rows}


def test_two_workers_share_the_table(rotated: sa.Engine) -> None:
    result = ReencryptionJob(rotated, Base, tables=["persons"], workers=2, batch_size=25).run()

    assert result.status == "succeeded"
    assert result.values_reencrypted == 2 * ROWS
    # No row was read by both workers: each was scanned once, none lost a
    # compare-and-swap to the other worker.
    assert result.rows_scanned == ROWS
    assert result.rows_skipped == 0
    counts = _update_counts(rotated)
    assert len(counts) == ROWS
    assert set(counts.values()) == {1}
    with rotated.connect() as conn:
        checkpoints = CheckpointStore().list(conn)
    assert [c.slot for c in checkpoints] == [0, 1]
    assert all(c.values_reencrypted > 0 for c in checkpoints)
    assert sum(c.values_reencrypted for c in checkpoints) == 2 * ROWS
    assert census(rotated, Base).stale() == {}


def test_two_processes_share_the_table(rotated: sa.Engine) -> None:
    """Two jobs with the same name, as on two machines, split the rows."""
    results: list[ReencryptionResult] = []
    errors: list[BaseException] = []

    def run_job() -> None:
        try:
            job = ReencryptionJob(
                rotated,
                Base,
                tables=["persons"],
                workers=2,
                batch_size=25,
                peer_poll_interval=0.05,
            )
            results.append(job.run())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run_job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert [r.status for r in results] == ["succeeded", "succeeded"]
    assert sum(r.values_reencrypted for r in results) == 2 * ROWS
    assert sum(r.rows_scanned for r in results) == ROWS
    assert sum(r.rows_skipped for r in results) == 0
    counts = _update_counts(rotated)
    assert len(counts) == ROWS
    assert set(counts.values()) == {1}


def test_application_writes_survive(rotated: sa.Engine) -> None:
    last_written: dict[int, str] = {}
    lock = threading.Lock()
    done = threading.Event()
    writes = [0, 0]

    def application(writer: int) -> None:
        rng = random.Random(writer)
        ids = list(range(1 + writer, ROWS + 1, 2))  # each row has a single writer
        with Session(rotated) as session:
            while not done.is_set() or writes[writer] < 50:
                person = session.get(Person, rng.choice(ids))
                assert person is not None
                value = f"app {writer} write {writes[writer]}"
                person.name = value
                session.commit()
                with lock:
                    last_written[person.id] = value
                writes[writer] += 1

    writers = [threading.Thread(target=application, args=(i,)) for i in range(2)]
    for writer in writers:
        writer.start()
    try:
        result = ReencryptionJob(rotated, Base, tables=["persons"], workers=2, batch_size=10).run()
    finally:
        done.set()
        for writer in writers:
            writer.join(timeout=60)

    assert result.status == "succeeded"
    assert min(writes) >= 50
    with Session(rotated) as session:
        rows = session.execute(sa.select(Person.id, Person.name)).all()
    names = {row[0]: row[1] for row in rows}
    for person_id, value in last_written.items():
        assert names[person_id] == value, person_id
    untouched = set(range(1, ROWS + 1)) - set(last_written)
    assert all(names[i] == f"Person {i}" for i in untouched)
    assert census(rotated, Base).stale() == {}
