"""Failures in the middle of a migration that converts two columns, then running it again.

A swap that fails must leave every column of the migration unconverted
under the old revision, and a database error while batches are written
must raise ``ConversionBatchError`` naming the batch, without plaintext.
"""

from __future__ import annotations

import sqlite3
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import ConversionBatchError, MigrationError
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .alembic_env import AlembicEnv
from .models import Person
from .test_alembic_encrypt_column import (
    CREATE_PERSONS,
    DECRYPT_PERSONS,
    ENCRYPT_PERSONS,
    column_names,
    plain_rows,
    raw_rows,
    seed,
)

# The email CHECK passes for plaintext and fails once email contains envelopes,
# so the swap of email, the second column of ENCRYPT_PERSONS, fails.
# PostgreSQL casts the swapped bytea to its hex text, which has no "@".
# SQLite calls email_guard(), which the test can switch off.
CREATE_CHECKED_PERSONS = """
if op.get_bind().dialect.name == "sqlite":
    check = "email_guard(email)"
else:
    check = "email LIKE '%@%'"
op.create_table(
    "persons",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.String(40)),
    sa.Column("name", sa.String(100)),
    sa.Column("email", sa.String(254)),
    sa.CheckConstraint(check, name="ck_persons_email"),
)
op.create_index("ix_persons_email", "persons", ["email"])
"""

PLAINTEXT_MARKERS = ("example.test", "Person ")


class EmailGuard:
    """The SQLite function behind the email CHECK: rejects bytes while armed."""

    def __init__(self) -> None:
        self.armed = True

    def __call__(self, value: Any) -> int:
        return 0 if self.armed and isinstance(value, bytes) else 1


@pytest.fixture
def email_guard(engine: sa.Engine) -> Iterator[EmailGuard]:
    guard = EmailGuard()
    if engine.dialect.name == "sqlite":

        def register(dbapi_connection: Any, _: Any) -> None:
            dbapi_connection.create_function("email_guard", 1, guard, deterministic=True)

        sa.event.listen(engine, "connect", register)
        engine.dispose()
    yield guard


def _disarm(engine: sa.Engine, guard: EmailGuard) -> None:
    guard.armed = False
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE persons DROP CONSTRAINT ck_persons_email")


def _add_failing_row_trigger(engine: sa.Engine, row_id: int) -> None:
    """Make every UPDATE of row ``row_id`` fail, as a full disk would."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TRIGGER fail_row BEFORE UPDATE ON persons WHEN NEW.id = {row_id} "
                "BEGIN SELECT RAISE(ABORT, 'could not extend file (injected)'); END"
            )
            return
        conn.exec_driver_sql(
            "CREATE FUNCTION fail_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.id = {row_id} THEN RAISE EXCEPTION 'could not extend file (injected)' "
            # A DETAIL line that quotes the row, plaintext included, as
            # PostgreSQL's own "Failing row contains (...)" does.
            "USING ERRCODE = '53100', DETAIL = row_to_json(NEW)::text; END IF; "
            "RETURN NEW; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER fail_row BEFORE UPDATE ON persons "
            "FOR EACH ROW EXECUTE FUNCTION fail_row()"
        )


def _drop_failing_row_trigger(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER fail_row")
        else:
            conn.exec_driver_sql("DROP TRIGGER fail_row ON persons")


def _people(engine: sa.Engine) -> list[tuple[str | None, str | None]]:
    with Session(engine) as session:
        people = session.scalars(sa.select(Person).order_by(Person.id)).all()
        return [(p.name, p.email) for p in people]


def test_second_swap_failure_keeps_both_columns(
    tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring, email_guard: EmailGuard
) -> None:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("r1", None, CREATE_CHECKED_PERSONS, 'op.drop_table("persons")')
    env.write_revision("r2", "r1", ENCRYPT_PERSONS, DECRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(40)
    seed(engine, rows)

    with pytest.raises(MigrationError, match=r"persons\.email") as caught:
        env.upgrade("head")

    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "persons.name, persons.email" in notes
    assert "none of these columns is swapped" in notes
    assert env.current() == "r1"
    # name, swapped before email failed, is plaintext again in its place.
    assert column_names(engine) == [
        "id",
        "tenant_id",
        "name",
        "email",
        "name__encrypting",
        "email__encrypting",
    ]
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE persons SET name = CAST(:name AS VARCHAR(100)) WHERE id = 1"),
            {"name": "Written by the old code"},
        )
    rows[0]["name"] = "Written by the old code"

    _disarm(engine, email_guard)
    env.upgrade("head")

    assert env.current() == "r2"
    # SQLite writes email back in place and moves name to the end.
    assert sorted(column_names(engine)) == ["email", "id", "name", "tenant_id"]
    name_report, email_report = env.reports[-2:]
    assert name_report.column_swapped
    assert email_report.column_swapped
    assert (name_report.converted, name_report.null) == (36, 4)
    # Row 1's converted value went stale when the old code wrote it.
    assert name_report.resumed == 35
    assert email_report.resumed == 38
    assert _people(engine) == [(r["name"], r["email"]) for r in rows]


def test_deferred_report_gets_final_counts(
    tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    upgrade = ENCRYPT_PERSONS + (
        "\nop.get_context().config.attributes['swapped_in_upgrade'] = "
        "[report.column_swapped for report in reports]\n"
    )
    env.write_revision("r2", "r1", upgrade, DECRYPT_PERSONS)
    env.upgrade("r1")
    seed(engine, plain_rows(40))

    config = env.config()
    command.upgrade(config, "head")

    # Inside upgrade() the swaps are still queued; afterwards both are done.
    assert config.attributes["swapped_in_upgrade"] == [False, False]
    assert [report.column_swapped for report in env.reports] == [True, True]
    assert str(env.reports[0]) == "persons.name: encrypted 36, already encrypted 0, NULL 4"


def test_fill_failure_names_batch(
    tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    env.write_revision("r2", "r1", ENCRYPT_PERSONS, DECRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(40)
    seed(engine, rows)
    _add_failing_row_trigger(engine, 19)

    with pytest.raises(ConversionBatchError) as caught:
        env.upgrade("head")

    # Batches of 7: rows 1-14 are committed, the batch of rows 15-21 fails.
    error = caught.value
    assert isinstance(error, MigrationError)
    assert (error.table, error.column) == ("persons", "name")
    assert (error.first_key, error.last_key) == ((15,), (21,))
    assert error.rows_done == 14
    message = str(error)
    assert message.startswith("persons.name: the database failed while writing the batch")
    assert "primary keys 15 to 21" in message
    assert "could not extend file (injected)" in message
    assert "The 14 row(s) of the earlier batches are converted and committed" in message
    assert "'name__encrypting'" in message
    assert message.endswith("Fix the cause and run the migration again")
    if engine.dialect.name == "postgresql":
        assert "(SQLSTATE 53100)" in message
    assert error.__cause__ is None
    assert env.current() == "r1"
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]

    _drop_failing_row_trigger(engine)
    env.upgrade("head")

    assert env.current() == "r2"
    name_report = env.reports[-2]
    assert name_report.resumed == sum(1 for r in rows[:14] if r["name"] is not None)
    assert _people(engine) == [(r["name"], r["email"]) for r in rows]


def test_decrypt_fill_failure_hides_plaintext(
    tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    env.write_revision("r2", "r1", ENCRYPT_PERSONS, DECRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(40)
    seed(engine, rows)
    env.upgrade("head")
    _add_failing_row_trigger(engine, 19)

    # The batches of a decryption bind plaintext values.
    with pytest.raises(ConversionBatchError) as caught:
        env.downgrade("r1")

    error = caught.value
    assert (error.column, error.first_key, error.last_key) == ("email", (15,), (21,))
    # The database error is not chained: its text can quote the row.
    assert error.__cause__ is None
    assert error.__suppress_context__
    full_text = "".join(traceback.format_exception(error))
    assert "could not extend file (injected)" in full_text
    for marker in PLAINTEXT_MARKERS:
        assert marker not in str(error)
        assert marker not in full_text
    assert env.current() == "r2"

    _drop_failing_row_trigger(engine)
    env.downgrade("r1")

    assert env.current() == "r1"
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]


def _autocommit_engine(engine: sa.Engine, where: str) -> sa.Engine:
    """Return an engine on ``engine``'s database in AUTOCOMMIT mode, set
    ``where``: as an execution option, or on the driver's connections."""
    if where == "execution option":
        return engine.execution_options(isolation_level="AUTOCOMMIT")  # type: ignore[return-value]
    connect_args = {}
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            schema = conn.exec_driver_sql("SHOW search_path").scalar_one()
        connect_args["options"] = f"-c search_path={schema}"
    return sa.create_engine(engine.url, isolation_level="AUTOCOMMIT", connect_args=connect_args)


@pytest.mark.parametrize("where", ["execution option", "create_engine"])
@pytest.mark.parametrize("commit_batches", [True, False])
def test_autocommit_connection_rejected(
    tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring, where: str, commit_batches: bool
) -> None:
    autocommit = _autocommit_engine(engine, where)
    env = AlembicEnv(tmp_path / "migrations", autocommit)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    encrypt = ENCRYPT_PERSONS.replace(
        "batch_size=7,", f"batch_size=7, commit_batches={commit_batches},"
    )
    env.write_revision("r2", "r1", encrypt, DECRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(10)
    seed(engine, rows)

    with pytest.raises(MigrationError) as caught:
        env.upgrade("head")

    message = str(caught.value)
    assert "persons.name" in message
    assert "AUTOCOMMIT" in message
    assert message.endswith("Nothing was written")
    assert env.current() == "r1"
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]
    assert "name__encrypting" not in column_names(engine, "persons")


def test_rename_in_same_revision_named(
    tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    renamed = ENCRYPT_PERSONS + (
        '\nwith op.batch_alter_table("persons") as batch:\n'
        '    batch.alter_column("email", new_column_name="email_address")\n'
    )
    env.write_revision("r2", "r1", renamed, DECRYPT_PERSONS)
    env.upgrade("r1")
    seed(engine, plain_rows(10))

    with pytest.raises(MigrationError) as caught:
        env.upgrade("head")

    message = str(caught.value)
    assert "persons.email: the column is gone at the end of the migration" in message
    assert "Move that operation to a later revision" in message


def test_scan_failure_names_column(
    tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite's authorizer stands in for a failing read")
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    strict = ENCRYPT_PERSONS.replace("batch_size=7,", "batch_size=7, strict=True,", 1)
    env.write_revision("r2", "r1", strict, DECRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(10)
    seed(engine, rows)

    def deny_name(action: int, table: str | None, column: str | None, *_: object) -> int:
        denied = action == sqlite3.SQLITE_READ and (table, column) == ("persons", "name")
        return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK

    def install(dbapi_connection: Any, _: object) -> None:
        dbapi_connection.set_authorizer(deny_name)

    sa.event.listen(engine, "connect", install)
    engine.dispose()
    try:
        with pytest.raises(ConversionBatchError) as caught:
            env.upgrade("head")
    finally:
        sa.event.remove(engine, "connect", install)
        engine.dispose()

    message = str(caught.value)
    assert message.startswith("persons.name: the database failed while reading the first batch")
    assert "Nothing was written, so the original column is unchanged" in message
    assert env.current() == "r1"
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]
