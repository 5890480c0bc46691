"""The command line during incidents: a keyring table restored from an older
backup, a re-encryption process killed with SIGKILL, a crypto-shredded
tenant, a lost key file, and a reader that closes stdout early.

Each case runs on SQLite and PostgreSQL where the database matters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from sqlalchemy_encrypted import KeyPurpose, parse_header
from sqlalchemy_encrypted.cli import cli
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.rotation import ReencryptionJob, ReencryptionProgress
from sqlalchemy_encrypted.rotation.checkpoint import SlotLease
from sqlalchemy_encrypted.rotation.columns import raw_table
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .rotation_support import Base, Note, Person, fill_persons

ROOT = Path(__file__).resolve().parent.parent
MODELS = "tests.rotation_support:Base"
UNKNOWN_KEYS = 8
BROKEN_PIPE = 141


def _url_of(engine: sa.Engine) -> str:
    """Return a URL that reaches the engine's tables, PostgreSQL test schema included."""
    url = engine.url
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@dataclass
class Operator:
    """An application database with 10 persons of tenants t-acme and t-globex,
    driven through the command line."""

    engine: sa.Engine
    url: str
    key_path: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "SQLALCHEMY_ENCRYPTED_URL": self.url,
            "SQLALCHEMY_ENCRYPTED_KMS": f"local://{self.key_path}",
            "SQLALCHEMY_ENCRYPTED_MODELS": MODELS,
        }

    def run(self, *args: str, input: str | None = None, **env: str) -> Result:
        return CliRunner().invoke(cli, list(args), env={**self.env, **env}, input=input)

    def json(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def keyring(self) -> Keyring:
        return Keyring(self.engine, LocalKms(self.key_path), active_key_ttl=0)

    def keyring_rows(self) -> list[dict[str, Any]]:
        table = self.keyring().table
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(sa.select(table)).mappings()]

    def restore_keyring(self, rows: list[dict[str, Any]]) -> None:
        """Replace the keyring table's rows, as restoring a backup of it does."""
        table = self.keyring().table
        with self.engine.begin() as conn:
            conn.execute(sa.delete(table))
            conn.execute(sa.insert(table), rows)


@pytest.fixture
def operator(engine: sa.Engine, tmp_path: Path) -> Iterator[Operator]:
    key_path = tmp_path / "master.key"
    keyring = Keyring(engine, LocalKms.create(key_path), active_key_ttl=0)
    keyring.create_table()
    Base.metadata.create_all(engine)
    keyring.provision("t-acme")
    keyring.provision("t-globex")
    fill_persons(engine, 10)
    yield Operator(engine, _url_of(engine), key_path)


# -- a keyring table restored from a backup taken before a rotation -------------


@pytest.fixture
def restored(operator: Operator) -> Operator:
    """Every value re-encrypted under version 2, then the keyring table put
    back to its state before the rotation: no value's key id is in it."""
    backup = operator.keyring_rows()
    rotated = operator.run("keys", "rotate", "--all-tenants", "--activate-now")
    assert rotated.exit_code == 0, rotated.output
    moved = operator.run("reencrypt")
    assert moved.exit_code == 0, moved.output
    operator.restore_keyring(backup)
    return operator


def test_status_footer_names_unknown_keys(restored: Operator) -> None:
    result = restored.run("status")

    assert result.exit_code == 0, result.output
    assert "no value is under an old key version" not in result.output
    assert "20 value(s) name key ids that are not in keyring table" in result.output
    assert "persons.email: 10, persons.name: 10" in result.output
    assert "restore the keyring table that matches the data" in result.output


def test_status_fail_on_stale_unknown_keys(restored: Operator) -> None:
    result = restored.run("status", "--fail-on-stale")

    assert result.exit_code == UNKNOWN_KEYS, result.output


def test_status_json_unknown_keys(restored: Operator) -> None:
    data = restored.json("status")

    assert data["unknown_keys"] == {"persons.name": 10, "persons.email": 10}
    assert data["totals"]["unknown_keys"] == 20


def test_status_tenant_counts_unknown_keys(restored: Operator) -> None:
    """A value whose key id is missing belongs to its row's tenant."""
    data = restored.json("status", "--tenant", "t-acme")

    assert data["unknown_keys"] == {"persons.name": 5, "persons.email": 5}


def test_reencrypt_exits_on_unknown_keys(restored: Operator) -> None:
    result = restored.run("reencrypt")

    assert result.exit_code == UNKNOWN_KEYS, result.output
    assert "persons.email: 10, persons.name: 10" in result.output
    assert "no value is left under an old key version" not in result.output


def test_reencrypt_dry_run_unknown_keys(restored: Operator) -> None:
    result = restored.run("reencrypt", "--dry-run")

    assert result.exit_code == UNKNOWN_KEYS, result.output
    assert "nothing to re-encrypt" not in result.output


def test_reencrypt_json_unknown_keys(restored: Operator) -> None:
    result = restored.run("reencrypt", "--json")

    assert result.exit_code == UNKNOWN_KEYS, result.output
    assert json.loads(result.stdout)["unknown_keys"] == {"persons.name": 10, "persons.email": 10}


def _stored_key_ids(engine: sa.Engine, tenant: str, column: str) -> set[str]:
    """Return the key ids in the stored headers of one tenant's values of a persons column."""
    return {
        str(parse_header(bytes(row[column])).key_id)
        for row in _persons(engine)
        if row["tenant_id"] == tenant and row[column] is not None
    }


def _key_count(operator: Operator) -> int:
    return len(operator.keyring_rows())


def test_rotate_stops_on_unknown_keys(restored: Operator) -> None:
    keys_before = _key_count(restored)

    result = restored.run("keys", "rotate", "t-acme")

    assert result.exit_code == UNKNOWN_KEYS, result.output
    assert "not in keyring table encryption_keys (tenant 't-acme': " in result.stderr
    for column in ("name", "email"):
        (key_id,) = _stored_key_ids(restored.engine, "t-acme", column)
        assert f"persons.{column}: 5 value(s) under key id {key_id}" in result.stderr
    # The other tenant's values are listed too: they stop the rotation as well.
    assert "tenant 't-globex': persons.email: 5 value(s)" in result.stderr
    assert "Restore the keyring table that matches the data" in result.stderr
    assert "--ignore-unknown-keys" in result.stderr
    assert "no key was created" in result.stderr
    assert _key_count(restored) == keys_before


def test_rotate_all_tenants_stops_on_unknown_keys(restored: Operator) -> None:
    keys_before = _key_count(restored)

    result = restored.run("keys", "rotate", "--all-tenants", "--json")

    assert result.exit_code == UNKNOWN_KEYS, result.output
    assert "tenant 't-acme': persons.email: 5 value(s)" in result.stderr
    assert "tenant 't-globex': persons.email: 5 value(s)" in result.stderr
    assert result.stdout == ""
    assert _key_count(restored) == keys_before


def test_rotate_ignore_unknown_keys(restored: Operator) -> None:
    keys_before = _key_count(restored)

    result = restored.run("keys", "rotate", "t-acme", "--ignore-unknown-keys")

    assert result.exit_code == 0, result.output
    assert "randomized key version 2 is pending" in result.output
    assert _key_count(restored) == keys_before + 2


def test_rotate_stops_other_tenants_too(operator: Operator) -> None:
    """A key created for any tenant in a keyring table that does not match
    the data would be lost at the next restore, so every tenant is stopped."""
    backup = operator.keyring_rows()
    assert operator.run("keys", "rotate", "t-acme", "--activate-now").exit_code == 0
    assert operator.run("reencrypt").exit_code == 0
    operator.restore_keyring(backup)
    versions_before = len(operator.keyring_rows())

    other = operator.run("keys", "rotate", "t-globex")

    assert other.exit_code == UNKNOWN_KEYS, other.output
    assert "(tenant 't-acme': persons.email: 5 value(s)" in other.stderr
    assert "no key was created" in other.stderr
    assert len(operator.keyring_rows()) == versions_before


def test_rotate_stops_on_rows_without_tenant(operator: Operator) -> None:
    """A value in a table without a tenant column may be any tenant's."""
    foreign_key = InMemoryKeyring().active_key("t-acme", KeyPurpose.RANDOMIZED)
    note_type = Note.__table__.c.blob.info["encrypted_type"]
    with operator.engine.begin() as conn:
        conn.execute(
            sa.insert(Note.__table__), [{"id": 1, "blob": note_type.seal("x", key=foreign_key)}]
        )

    result = operator.run("keys", "rotate", "t-globex")

    assert result.exit_code == UNKNOWN_KEYS, result.output
    assert (
        "(rows that name no tenant, so of any tenant: notes.blob: 1 value(s) under key id "
        f"{foreign_key.key_id})" in result.stderr
    )


def test_rotate_without_models_notes_unchecked(restored: Operator) -> None:
    result = restored.run("keys", "rotate", "t-acme", SQLALCHEMY_ENCRYPTED_MODELS="")

    assert result.exit_code == 0, result.output
    assert "were not checked for key ids missing from the keyring table" in result.stderr
    assert "no --models was given" in result.stderr


def test_matching_keyring_clears_unknown_keys(operator: Operator) -> None:
    """Restoring the keyring table that matches the data is the recovery."""
    before = operator.keyring_rows()
    assert operator.run("keys", "rotate", "--all-tenants", "--activate-now").exit_code == 0
    assert operator.run("reencrypt").exit_code == 0
    matching = operator.keyring_rows()
    operator.restore_keyring(before)
    assert operator.run("status", "--fail-on-stale").exit_code == UNKNOWN_KEYS

    operator.restore_keyring(matching)

    result = operator.run("status", "--fail-on-stale")
    assert result.exit_code == 0, result.output
    assert "no value is under an old key version" in result.output


def test_data_restored_under_retired_version(operator: Operator) -> None:
    """Data older than a retirement: reinstate the version, re-encrypt, retire."""
    backup = _persons(operator.engine)
    assert operator.run("keys", "rotate", "t-acme", "--activate-now").exit_code == 0
    assert operator.run("reencrypt").exit_code == 0
    assert operator.run("keys", "retire", "t-acme", "1", "--min-inactive", "0").exit_code == 0
    _restore_persons(operator.engine, backup)
    status = operator.run("status")
    assert "values are under retired key versions ('t-acme' version 1)" in status.output
    assert "keys reinstate TENANT VERSION" in status.output
    assert operator.run("reencrypt", "--tenant", "t-acme").exit_code == 6

    reinstated = operator.run("keys", "reinstate", "t-acme", "1")
    moved = operator.run("reencrypt", "--tenant", "t-acme")
    retired = operator.run("keys", "retire", "t-acme", "1", "--min-inactive", "0")

    assert reinstated.exit_code == 0, reinstated.output
    assert "randomized key version 1 is decrypt_only again" in reinstated.output
    assert moved.exit_code == 0, moved.output
    assert retired.exit_code == 0, retired.output
    assert "retired key versions" not in operator.run("status").output


def test_reinstate_version_not_retired(operator: Operator) -> None:
    result = operator.run("keys", "reinstate", "t-acme", "1")

    assert result.exit_code == 1
    assert "is not retired" in result.output


# The persons table with its stored envelopes as bytes, past the column types.
STORED_PERSONS = raw_table(Person.__table__, ["name", "email"])


def _persons(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(sa.select(STORED_PERSONS)).mappings()]


def _restore_persons(engine: sa.Engine, rows: list[dict[str, Any]]) -> None:
    """Replace the persons rows, as restoring a backup of the table does."""
    with engine.begin() as conn:
        conn.execute(sa.delete(STORED_PERSONS))
        conn.execute(sa.insert(STORED_PERSONS), rows)


# -- a re-encryption process killed with SIGKILL ---------------------------------


def _start_paused_job(operator: Operator, job_name: str) -> subprocess.Popen[str]:
    """Start a job in another process and return once its first batch is committed."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.reencrypt_pause_worker",
            operator.url,
            str(operator.key_path),
            job_name,
            "2",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "paused"
    return process


def _wait_for_lock_release(engine: sa.Engine, job_name: str) -> None:
    """Wait until PostgreSQL ends the killed session and drops its slot lock."""
    if engine.dialect.name != "postgresql":
        return
    lease = SlotLease(job_name, "persons")
    for _ in range(200):
        if not lease.is_held(engine, 0):
            return
        time.sleep(0.05)
    raise AssertionError("the killed worker's slot lock was never released")


def _job(data: dict[str, Any], job_name: str) -> dict[str, Any]:
    (slot,) = [job for job in data["jobs"] if job["job_name"] == job_name]
    return slot


def test_status_shows_killed_job_interrupted(operator: Operator) -> None:
    assert operator.run("keys", "rotate", "--all-tenants", "--activate-now").exit_code == 0
    process = _start_paused_job(operator, "drill")
    try:
        live = _job(operator.json("status"), "drill")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    _wait_for_lock_release(operator.engine, "drill")

    killed = _job(operator.json("status"), "drill")
    text = operator.run("status")

    assert live["status"] == "running"
    assert live["live"] is True
    assert killed["status"] == "interrupted"
    assert killed["live"] is False
    assert killed["owner"].endswith(f":{process.pid}")
    (row,) = [line.split() for line in text.output.splitlines() if line.startswith("drill ")]
    assert row[:4] == ["drill", "persons", "0", "interrupted"]
    assert "run 'sqlalchemy-encrypted reencrypt --job-name drill'" in text.output


def test_interrupted_job_resumes(operator: Operator) -> None:
    assert operator.run("keys", "rotate", "--all-tenants", "--activate-now").exit_code == 0
    process = _start_paused_job(operator, "drill")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    _wait_for_lock_release(operator.engine, "drill")

    resumed = operator.run("reencrypt", "--job-name", "drill")

    assert resumed.exit_code == 0, resumed.output
    assert _job(operator.json("status"), "drill")["status"] == "succeeded"


def _corrupt_name(engine: sa.Engine, row_id: int) -> dict[str, Any]:
    """Flip the last byte of one row's stored name, and return the row as it was."""
    (row,) = [row for row in _persons(engine) if row["id"] == row_id]
    corrupt = bytearray(row["name"])
    corrupt[-1] ^= 0x01
    with engine.begin() as conn:
        conn.execute(
            sa.update(STORED_PERSONS)
            .where(STORED_PERSONS.c.id == row_id)
            .values(name=bytes(corrupt))
        )
    return row


def _restore_name(engine: sa.Engine, row: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.update(STORED_PERSONS)
            .where(STORED_PERSONS.c.id == row["id"])
            .values(name=row["name"])
        )


def test_status_shows_earlier_failed_run(operator: Operator) -> None:
    assert operator.run("keys", "rotate", "--all-tenants", "--activate-now").exit_code == 0
    row = _corrupt_name(operator.engine, 3)
    failed = operator.run("reencrypt")
    failed_slot = _job(operator.json("status"), "default")
    _restore_name(operator.engine, row)

    resumed = operator.run("reencrypt")

    slot = _job(operator.json("status"), "default")
    text = operator.run("status").output
    assert failed.exit_code == 6, failed.output
    assert failed_slot["rows_failed"] == 1
    assert resumed.exit_code == 0, resumed.output
    assert slot["status"] == "succeeded"
    assert slot["rows_failed"] == 0
    assert slot["error"].startswith("an earlier run failed: ")
    assert slot["error"].endswith("(1 row(s) failed)")
    (line,) = [line for line in text.splitlines() if line.startswith("default ")]
    assert line.split()[3:6] == ["succeeded", "20", "0"]
    assert "job 'default', table persons, slot 0: an earlier run failed: " in text


def test_killed_job_with_failed_row_resumes(operator: Operator) -> None:
    """A killed run whose first batch failed a row: the resumed run retries it
    and counts only its own failures."""
    assert operator.run("keys", "rotate", "--all-tenants", "--activate-now").exit_code == 0
    row = _corrupt_name(operator.engine, 1)
    process = _start_paused_job(operator, "drill")
    try:
        live = _job(operator.json("status"), "drill")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    _wait_for_lock_release(operator.engine, "drill")
    _restore_name(operator.engine, row)

    resumed = operator.run("reencrypt", "--job-name", "drill")

    slot = _job(operator.json("status"), "drill")
    assert live["rows_failed"] == 1
    assert resumed.exit_code == 0, resumed.output
    assert slot["status"] == "succeeded"
    assert slot["rows_failed"] == 0
    assert slot["error"] == "an earlier run was interrupted after 1 row(s) failed"


# -- a crypto-shredded tenant ------------------------------------------------------


def test_rewrap_shredded_tenant(operator: Operator) -> None:
    assert operator.run("keys", "shred", "t-globex", "--yes").exit_code == 0

    result = operator.run("keys", "rewrap", "--tenant", "t-globex")

    assert result.exit_code == 0, result.output
    assert "tenant 't-globex' was crypto-shredded" in result.output
    assert "nothing to rewrap" in result.output
    assert "rewrapped" not in result.output


def test_reencrypt_shredded_tenant(operator: Operator) -> None:
    assert operator.run("keys", "shred", "t-globex", "--yes").exit_code == 0

    result = operator.run("reencrypt", "--tenant", "t-globex")

    assert result.exit_code == 0, result.output
    assert "tenant 't-globex' was crypto-shredded" in result.output
    assert "nothing to re-encrypt" in result.output
    assert "no value is left under an old key version" not in result.output


def test_reencrypt_shredded_and_live_tenant(operator: Operator) -> None:
    assert operator.run("keys", "rotate", "t-acme", "--activate-now").exit_code == 0
    assert operator.run("keys", "shred", "t-globex", "--yes").exit_code == 0

    result = operator.run("reencrypt", "--tenant", "t-acme", "--tenant", "t-globex")

    assert result.exit_code == 0, result.output
    assert "re-encrypted 10 value(s)" in result.output
    assert "tenant 't-globex' was crypto-shredded" in result.output


def test_tenant_shredded_during_run(operator: Operator) -> None:
    """A shred in the middle of a run fails the tenant's remaining rows with
    KeyDestroyedError; the next run finds nothing left to do."""
    assert operator.run("keys", "rotate", "--all-tenants", "--activate-now").exit_code == 0
    keyring = operator.keyring()
    shredded: list[str] = []

    def shred_after_first_batch(progress: ReencryptionProgress) -> None:
        if not shredded:
            shredded.append("t-globex")
            keyring.shred("t-globex")

    result = ReencryptionJob(
        operator.engine, Base, tables=["persons"], batch_size=2, progress=shred_after_first_batch
    ).run()
    again = operator.run("reencrypt")

    assert result.status == "failed"
    assert result.failures
    assert {failure.error_class for failure in result.failures} == {"KeyDestroyedError"}
    assert not result.remaining
    assert again.exit_code == 0, again.output


# -- commands that need no KMS ------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ("keys", "list"),
        ("keys", "list", "--tenant", "t-acme"),
        ("keys", "promote"),
        ("keys", "retire", "t-acme", "1", "--min-inactive", "0"),
        ("keys", "shred", "t-globex", "--yes"),
        ("status",),
    ],
)
def test_metadata_command_without_key_file(
    operator: Operator, tmp_path: Path, command: tuple[str, ...]
) -> None:
    if command[:2] == ("keys", "retire"):
        rotated = operator.run("keys", "rotate", "t-acme", "--activate-now")
        assert rotated.exit_code == 0, rotated.output
        assert operator.run("reencrypt").exit_code == 0
    missing = f"local://{tmp_path}/absent.key"

    result = operator.run(*command, SQLALCHEMY_ENCRYPTED_KMS=missing)

    assert result.exit_code == 0, result.output
    assert "error" not in result.output


def test_keys_list_without_kms_option(operator: Operator) -> None:
    env = {name: value for name, value in operator.env.items() if "KMS" not in name}
    env["SQLALCHEMY_ENCRYPTED_KMS"] = ""

    result = CliRunner().invoke(cli, ["keys", "list", "--json"], env=env)

    assert result.exit_code == 0, result.output
    assert {key["tenant_id"] for key in json.loads(result.stdout)} == {"t-acme", "t-globex"}


def test_unwrapping_command_needs_key_file(operator: Operator, tmp_path: Path) -> None:
    missing = f"local://{tmp_path}/absent.key"

    result = operator.run("keys", "rewrap", SQLALCHEMY_ENCRYPTED_KMS=missing)

    assert result.exit_code == 3
    assert "absent.key" in result.output


# -- a reader that closes stdout early ------------------------------------------------


def test_closed_stdout_exits_quietly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/app.db"
    engine = sa.create_engine(url)
    keyring = Keyring(engine, LocalKms.create(tmp_path / "master.key"))
    keyring.create_table()
    Base.metadata.create_all(engine)
    fill_persons(engine, 4)
    engine.dispose()
    env = {
        **os.environ,
        "SQLALCHEMY_ENCRYPTED_URL": url,
        "SQLALCHEMY_ENCRYPTED_MODELS": MODELS,
    }
    # The pipe's read end is closed before the process starts, as "| head -1"
    # closes it after the first line: the first write fails with EPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = subprocess.run(
            [sys.executable, "-m", "sqlalchemy_encrypted", "status"],
            cwd=ROOT,
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)

    assert process.returncode == BROKEN_PIPE
    assert process.stderr == ""
