"""Database errors of the schema steps of a conversion, provoked for real.

Adding the temporary column, locking the table, reading its definition,
the census and the swap each raise ``MigrationError`` naming the table,
column and step, with the SQLSTATE but without the database's DETAIL text
or statement. Every failure leaves the original column readable and
unchanged, and running the conversion again finishes it.
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
from alembic.migration import MigrationContext
from alembic.operations import Operations

import alembic_ext  # noqa: F401  (registers the operations)
from sqlalchemy_encrypted import ConversionBatchError, Encrypted, MigrationError
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .alembic_env import AlembicEnv
from .test_alembic_encrypt_column import (
    CREATE_PERSONS,
    DECRYPT_PERSONS,
    ENCRYPT_PERSONS,
    column_names,
    plain_rows,
    raw_rows,
    read_people,
    seed,
)

PLAINTEXT_MARKERS = ("example.test", "Person ")
LOCK_ADVICE = "Another transaction holds a lock that this step needs"

# The migration calls back into the test after both columns are filled, so
# that a lock can be taken between the batches and the final step.
ENCRYPT_THEN_CALL_BACK = ENCRYPT_PERSONS + (
    "\nop.get_context().config.attributes.get('after_fill', lambda: None)()\n"
)


def _expected_people(rows: list[dict[str, Any]]) -> list[tuple[str | None, str | None]]:
    return [(r["name"], r["email"]) for r in rows]


def _check_step_error(error: MigrationError, step: str, outcome: str, advice: str) -> None:
    """Check the message of a failed step and that it carries no database text
    beyond the primary message."""
    assert type(error) is MigrationError
    message = str(error)
    assert message.startswith(f"persons.name: could not {step}: "), message
    assert f". {outcome}. " in message
    assert advice in message
    assert error.__cause__ is None
    assert error.__suppress_context__
    full_text = "".join(traceback.format_exception(error))
    assert "[SQL:" not in full_text
    assert "DETAIL" not in full_text
    for marker in PLAINTEXT_MARKERS:
        assert marker not in full_text


def _encrypt_name(conn: sa.Connection, commit_batches: bool) -> Any:
    """Encrypt persons.name outside Alembic's commands, checked and swapped at once."""
    operations = Operations(MigrationContext.configure(connection=conn))
    return operations.encrypt_column(
        "persons",
        "name",
        type_=Encrypted(sa.String(100)),
        tenant_column="tenant_id",
        batch_size=7,
        commit_batches=commit_batches,
    )


# -- PostgreSQL: locks held by another connection, and a name clash ------------


def _lock_timeout_engine(engine: sa.Engine) -> sa.Engine:
    """Return an engine on ``engine``'s schema whose statements wait 200 ms for a lock."""
    with engine.connect() as conn:
        schema = conn.exec_driver_sql("SHOW search_path").scalar_one()
    options = f"-c search_path={schema} -c lock_timeout=200ms"
    return sa.create_engine(engine.url, connect_args={"options": options})


class LockHolder:
    """A second connection that runs ``statement`` and keeps its transaction open."""

    def __init__(self, engine: sa.Engine, statement: str) -> None:
        self.engine = engine
        self.statement = statement
        self.conn: sa.Connection | None = None

    def take(self) -> None:
        self.conn = self.engine.connect()
        self.conn.exec_driver_sql(self.statement)

    def release(self) -> None:
        if self.conn is not None:
            self.conn.rollback()
            self.conn.close()
            self.conn = None


@pytest.fixture
def pg_env(tmp_path: Path, pg_engine: sa.Engine) -> Iterator[AlembicEnv]:
    """A migration environment whose connections give up on a lock after 200 ms."""
    locking = _lock_timeout_engine(pg_engine)
    env = AlembicEnv(tmp_path / "migrations", locking)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    env.write_revision("r2", "r1", ENCRYPT_THEN_CALL_BACK, DECRYPT_PERSONS)
    yield env
    locking.dispose()


# A reader's ACCESS SHARE lock blocks the ACCESS EXCLUSIVE lock of ALTER TABLE.
# An application's UPDATE holds ROW EXCLUSIVE, which blocks the SHARE ROW
# EXCLUSIVE lock of the final check but not the batches.
READER = "SELECT count(*) FROM persons"
WRITER = "UPDATE persons SET tenant_id = tenant_id WHERE id = 1"
SOURCE_UNCHANGED = "The original column is unchanged"
CONVERTED_KEPT = "The converted values are kept in a temporary column"


@pytest.mark.parametrize(
    ("holder", "when", "leftover", "step", "outcome"),
    [
        (READER, "start", False, "add the temporary column 'name__encrypting'", SOURCE_UNCHANGED),
        (
            READER,
            "start",
            True,
            "drop the column 'name__decrypting' that an interrupted run in the other "
            "direction left",
            SOURCE_UNCHANGED,
        ),
        (WRITER, "after fill", False, "lock table persons against writes", SOURCE_UNCHANGED),
        (READER, "after fill", False, "drop the source column", CONVERTED_KEPT),
    ],
    ids=["add column", "drop leftover", "lock table", "swap"],
)
def test_pg_lock_timeout_names_step(
    pg_env: AlembicEnv,
    pg_engine: sa.Engine,
    keyring: InMemoryKeyring,
    holder: str,
    when: str,
    leftover: bool,
    step: str,
    outcome: str,
) -> None:
    pg_env.upgrade("r1")
    rows = plain_rows(30)
    seed(pg_engine, rows)
    if leftover:
        with pg_engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE persons ADD COLUMN name__decrypting VARCHAR(100)")
    lock = LockHolder(pg_engine, holder)
    config = pg_env.config()
    if when == "start":
        lock.take()
    else:
        config.attributes["after_fill"] = lock.take

    try:
        with pytest.raises(MigrationError) as caught:
            command.upgrade(config, "head")
    finally:
        lock.release()

    _check_step_error(caught.value, step, outcome, LOCK_ADVICE)
    assert "(SQLSTATE 55P03)" in str(caught.value)
    assert pg_env.current() == "r1"
    assert raw_rows(pg_engine) == [(r["id"], r["name"], r["email"]) for r in rows]
    assert column_names(pg_engine)[:4] == ["id", "tenant_id", "name", "email"]

    pg_env.upgrade("head")

    assert pg_env.current() == "r2"
    assert "name__decrypting" not in column_names(pg_engine)
    assert read_people(pg_engine) == _expected_people(rows)


def test_pg_concurrent_add_column_names_clash(
    pg_env: AlembicEnv, pg_engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    pg_env.upgrade("r1")
    rows = plain_rows(20)
    seed(pg_engine, rows)
    added: list[str] = []

    # Another run of the same migration adds the temporary column between
    # this run's reflection of the table and its ALTER TABLE.
    def add_first(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if not added and "ADD COLUMN name__encrypting" in statement:
            with pg_engine.begin() as other:
                other.exec_driver_sql("ALTER TABLE persons ADD COLUMN name__encrypting BYTEA")
            added.append(statement)

    sa.event.listen(pg_env.engine, "before_cursor_execute", add_first)
    try:
        with pytest.raises(MigrationError) as caught:
            pg_env.upgrade("head")
    finally:
        sa.event.remove(pg_env.engine, "before_cursor_execute", add_first)

    assert added
    _check_step_error(
        caught.value,
        "add the temporary column 'name__encrypting'",
        SOURCE_UNCHANGED,
        "A column of that name exists already",
    )
    assert "(SQLSTATE 42701)" in str(caught.value)
    assert pg_env.current() == "r1"
    assert raw_rows(pg_engine) == [(r["id"], r["name"], r["email"]) for r in rows]

    # The column the other run added has the type this one writes, so the
    # next run fills it.
    pg_env.upgrade("head")

    assert pg_env.current() == "r2"
    assert read_people(pg_engine) == _expected_people(rows)


# -- SQLite: a locked file, a read-only file, a name clash, a failed census ----


def _sqlite_persons(path: Path, rows: list[dict[str, Any]]) -> None:
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE persons (id INTEGER PRIMARY KEY, tenant_id VARCHAR(40), "
            "name VARCHAR(100), email VARCHAR(254))"
        )
    seed(engine, rows)
    engine.dispose()


@pytest.mark.parametrize(
    ("begin", "commit_batches", "step"),
    [
        ("BEGIN IMMEDIATE", True, "add the temporary column 'name__encrypting'"),
        ("BEGIN IMMEDIATE", False, "lock table persons against writes"),
        # An exclusive lock blocks readers too, so the first read fails.
        ("BEGIN EXCLUSIVE", True, "read the definition of table persons"),
    ],
)
def test_sqlite_locked_file_names_step(
    tmp_path: Path, keyring: InMemoryKeyring, begin: str, commit_batches: bool, step: str
) -> None:
    path = tmp_path / "app.db"
    rows = plain_rows(20)
    _sqlite_persons(path, rows)
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.2})
    other = sqlite3.connect(path, isolation_level=None)
    other.execute(begin)

    with engine.connect() as conn:
        try:
            with pytest.raises(MigrationError) as caught:
                _encrypt_name(conn, commit_batches)
        finally:
            conn.rollback()
            other.execute("ROLLBACK")
            other.close()

        _check_step_error(caught.value, step, SOURCE_UNCHANGED, LOCK_ADVICE)
        assert "database is locked" in str(caught.value)
        assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]
        assert column_names(engine) == ["id", "tenant_id", "name", "email"]

        report = _encrypt_name(conn, commit_batches)
        conn.commit()

    assert report.column_swapped
    assert report.converted == sum(1 for r in rows if r["name"] is not None)
    names = [name for _, name, _ in raw_rows(engine)]
    assert all(name is None or isinstance(name, bytes) for name in names)
    engine.dispose()


@pytest.mark.parametrize(
    ("commit_batches", "step"),
    [
        (True, "add the temporary column 'name__encrypting'"),
        (False, "lock table persons against writes"),
    ],
)
def test_sqlite_read_only_file_names_step(
    tmp_path: Path, keyring: InMemoryKeyring, commit_batches: bool, step: str
) -> None:
    path = tmp_path / "app.db"
    rows = plain_rows(20)
    _sqlite_persons(path, rows)
    read_only = sa.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")

    with read_only.connect() as conn, pytest.raises(MigrationError) as caught:
        _encrypt_name(conn, commit_batches)

    _check_step_error(caught.value, step, SOURCE_UNCHANGED, "The database is read-only")
    assert "readonly database" in str(caught.value)
    assert raw_rows(read_only) == [(r["id"], r["name"], r["email"]) for r in rows]
    read_only.dispose()

    writable = sa.create_engine(f"sqlite:///{path}")
    with writable.connect() as conn:
        report = _encrypt_name(conn, commit_batches)
        conn.commit()
    assert report.column_swapped
    writable.dispose()


@pytest.mark.parametrize("commit_batches", [True, False])
def test_sqlite_column_name_clash_named(
    tmp_path: Path, keyring: InMemoryKeyring, commit_batches: bool
) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/app.db")
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    encrypt = ENCRYPT_PERSONS.replace(
        "batch_size=7,", f"batch_size=7, commit_batches={commit_batches},"
    )
    env.write_revision("r2", "r1", encrypt, DECRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(20)
    seed(engine, rows)
    # SQLite compares column names without regard to case.
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE persons ADD COLUMN Name__Encrypting TEXT")

    with pytest.raises(MigrationError) as caught:
        env.upgrade("head")

    _check_step_error(
        caught.value,
        "add the temporary column 'name__encrypting'",
        SOURCE_UNCHANGED,
        "a column whose name differs only in case",
    )
    assert "duplicate column name" in str(caught.value)
    assert env.current() == "r1"
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]

    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE persons DROP COLUMN Name__Encrypting")
    env.upgrade("head")

    assert env.current() == "r2"
    assert read_people(engine) == _expected_people(rows)
    engine.dispose()


def test_sqlite_census_failure_names_step(tmp_path: Path, keyring: InMemoryKeyring) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/app.db")
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    env.write_revision("r2", "r1", ENCRYPT_THEN_CALL_BACK, DECRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(20)
    seed(engine, rows)
    armed: list[bool] = []

    # After the batches, the census is the first to call substr(). SQLite's
    # own ALTER TABLE calls it too, so the denial starts after the fill.
    def deny_substr(action: int, _: str | None, function: str | None, *__: object) -> int:
        denied = armed and action == sqlite3.SQLITE_FUNCTION and function == "substr"
        return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK

    def install(dbapi_connection: Any, _: object) -> None:
        dbapi_connection.set_authorizer(deny_substr)

    sa.event.listen(engine, "connect", install)
    engine.dispose()
    config = env.config()
    config.attributes["after_fill"] = lambda: armed.append(True)
    try:
        with pytest.raises(MigrationError) as caught:
            command.upgrade(config, "head")
    finally:
        sa.event.remove(engine, "connect", install)
        engine.dispose()

    assert armed
    assert not isinstance(caught.value, ConversionBatchError)
    _check_step_error(
        caught.value,
        "count the column's values by their stored headers (the census)",
        SOURCE_UNCHANGED,
        "Fix the cause and run the migration again",
    )
    assert "not authorized" in str(caught.value)
    assert env.current() == "r1"
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]

    env.upgrade("head")

    assert env.current() == "r2"
    assert read_people(engine) == _expected_people(rows)
    engine.dispose()


def test_sqlite_swap_failure_names_step(tmp_path: Path, keyring: InMemoryKeyring) -> None:
    path = tmp_path / "app.db"
    rows = [{**row, "name": row["name"] or "Nameless"} for row in plain_rows(20)]
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        # NOT NULL makes the swap write the values back in place, and then
        # compare them with typeof(), which nothing before the swap calls.
        conn.exec_driver_sql(
            "CREATE TABLE persons (id INTEGER PRIMARY KEY, tenant_id VARCHAR(40), "
            "name VARCHAR(100) NOT NULL, email VARCHAR(254))"
        )
    seed(engine, rows)

    def deny_typeof(action: int, _: str | None, function: str | None, *__: object) -> int:
        denied = action == sqlite3.SQLITE_FUNCTION and function == "typeof"
        return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK

    def install(dbapi_connection: Any, _: object) -> None:
        dbapi_connection.set_authorizer(deny_typeof)

    sa.event.listen(engine, "connect", install)
    engine.dispose()
    try:
        with engine.connect() as conn:
            with pytest.raises(MigrationError) as caught:
                _encrypt_name(conn, commit_batches=True)
            conn.rollback()
    finally:
        sa.event.remove(engine, "connect", install)
        engine.dispose()

    _check_step_error(
        caught.value,
        "swap the converted column into place",
        CONVERTED_KEPT,
        "Fix the cause and run the migration again",
    )
    assert raw_rows(engine) == [(r["id"], r["name"], r["email"]) for r in rows]
    assert column_names(engine) == ["id", "tenant_id", "name", "email", "name__encrypting"]

    with engine.connect() as conn:
        report = _encrypt_name(conn, commit_batches=True)
        conn.commit()

    assert report.column_swapped
    assert report.resumed == len(rows)
    assert column_names(engine) == ["id", "tenant_id", "name", "email"]
    engine.dispose()


# -- PostgreSQL: a view that depends on the source column ---------------------

PERSON_NAMES_VIEW = "CREATE VIEW person_names AS SELECT id, name FROM persons"
VIEW_ADVICE = (
    "Other objects depend on the column (view person_names depends on column name of table persons)"
)
ROLLED_BACK = (
    "The original column is unchanged. The temporary column 'name__encrypting' was added "
    "in this transaction, so rolling the transaction back removes it with the converted "
    "values"
)


def _persons_with_view(engine: sa.Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE persons (id INTEGER PRIMARY KEY, tenant_id VARCHAR(40), "
            "name VARCHAR(100), email VARCHAR(254))"
        )
    seed(engine, rows)
    with engine.begin() as conn:
        conn.exec_driver_sql(PERSON_NAMES_VIEW)


@pytest.mark.parametrize(
    ("begin", "commit_batches", "shadow_kept"),
    [
        # The caller's transaction is open, so the batches cannot be committed.
        (True, True, False),
        (False, False, False),
        (False, True, True),
    ],
    ids=["caller transaction", "batches not committed", "batches committed"],
)
def test_pg_view_on_column_names_outcome(
    pg_engine: sa.Engine,
    keyring: InMemoryKeyring,
    begin: bool,
    commit_batches: bool,
    shadow_kept: bool,
) -> None:
    rows = plain_rows(20)
    _persons_with_view(pg_engine, rows)

    with pytest.raises(MigrationError) as caught:
        with pg_engine.begin() if begin else pg_engine.connect() as conn:
            _encrypt_name(conn, commit_batches)

    outcome = CONVERTED_KEPT if shadow_kept else ROLLED_BACK
    _check_step_error(caught.value, "drop the source column", outcome, VIEW_ADVICE)
    assert "(SQLSTATE 2BP01)" in str(caught.value)
    assert raw_rows(pg_engine) == [(r["id"], r["name"], r["email"]) for r in rows]
    columns = column_names(pg_engine)
    assert ("name__encrypting" in columns) is shadow_kept
    with pg_engine.connect() as conn:
        names = conn.exec_driver_sql("SELECT name FROM person_names ORDER BY id").scalars()
        assert list(names) == [r["name"] for r in rows]

    # The advice: drop the view, convert, then create the view again.
    with pg_engine.begin() as conn:
        conn.exec_driver_sql("DROP VIEW person_names")
        report = _encrypt_name(conn, commit_batches)

    assert report.column_swapped
    assert report.resumed == (report.converted if shadow_kept else 0)
    assert column_names(pg_engine) == ["id", "tenant_id", "email", "name"]
    persons = sa.Table(
        "persons",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", Encrypted(sa.String(100))),
    )
    with pg_engine.connect() as conn:
        names = conn.execute(sa.select(persons.c.name).order_by(persons.c.id)).scalars()
        assert list(names) == [r["name"] for r in rows]


@pytest.mark.parametrize("commit_batches", [True, False])
def test_pg_view_in_migration_notes_outcome(
    tmp_path: Path, pg_engine: sa.Engine, keyring: InMemoryKeyring, commit_batches: bool
) -> None:
    env = AlembicEnv(tmp_path / "migrations", pg_engine)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    encrypt = ENCRYPT_PERSONS.replace(
        "batch_size=7,", f"batch_size=7, commit_batches={commit_batches},"
    )
    env.write_revision("r2", "r1", encrypt, DECRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(20)
    seed(pg_engine, rows)
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(PERSON_NAMES_VIEW)

    with pytest.raises(MigrationError) as caught:
        env.upgrade("head")

    outcome = CONVERTED_KEPT if commit_batches else ROLLED_BACK
    _check_step_error(caught.value, "drop the source column", outcome, VIEW_ADVICE)
    (note,) = caught.value.__notes__
    if commit_batches:
        assert "The converted values of persons.name, persons.email stay in" in note
        assert "rolling it back" not in note
    else:
        assert "The temporary columns of persons.name, persons.email were added" in note
        assert "stay in" not in note
    assert env.current() == "r1"
    assert raw_rows(pg_engine) == [(r["id"], r["name"], r["email"]) for r in rows]
    shadows = {"name__encrypting", "email__encrypting"} & set(column_names(pg_engine))
    assert len(shadows) == (2 if commit_batches else 0)

    with pg_engine.begin() as conn:
        conn.exec_driver_sql("DROP VIEW person_names")
    env.upgrade("head")

    assert env.current() == "r2"
    assert read_people(pg_engine) == _expected_people(rows)
