"""Storage types per dialect, base64 storage, length limits and static typing."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.schema import CreateTable

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    ConfigurationError,
    DeterministicEncrypted,
    Encrypted,
    PlaintextTooLongError,
)
from sqlalchemy_encrypted.envelope import parse_header
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import count_statements

ROOT = Path(__file__).resolve().parent.parent

# Envelope overhead: 24-byte header, then nonce and tag (GCM) or SIV and the
# value type tag byte (SIV).
GCM_OVERHEAD = 24 + 12 + 16
SIV_OVERHEAD = 24 + 16 + 1

DIALECTS = {
    "postgresql": postgresql.dialect(),
    "sqlite": sqlite.dialect(),
    "mysql": mysql.dialect(),
    "mariadb": mysql.dialect(is_mariadb=True),
}


def _storage_table() -> sa.Table:
    return sa.Table(
        "records",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", Encrypted(sa.String(100))),
        sa.Column("email", DeterministicEncrypted(sa.String(254))),
        sa.Column("notes", Encrypted(sa.Text())),
        sa.Column("age", DeterministicEncrypted(sa.Integer())),
        sa.Column("code", Encrypted(sa.String(50), storage="base64")),
        sa.Column("memo", Encrypted(sa.Text(), storage="base64")),
    )


def _column_ddl(dialect_name: str) -> dict[str, str]:
    ddl = str(CreateTable(_storage_table()).compile(dialect=DIALECTS[dialect_name]))
    lines = [line.strip().rstrip(",") for line in ddl.splitlines()]
    return {
        line.split()[0]: " ".join(line.split()[1:])
        for line in lines
        if line and line.split()[0] in ("name", "email", "notes", "age", "code", "memo")
    }


def test_binary_storage_ddl_postgresql() -> None:
    columns = _column_ddl("postgresql")
    assert columns["name"] == "BYTEA"
    assert columns["email"] == "BYTEA"
    assert columns["notes"] == "BYTEA"
    assert columns["age"] == "BYTEA"


def test_binary_storage_ddl_sqlite() -> None:
    columns = _column_ddl("sqlite")
    assert columns["name"] == "BLOB"
    assert columns["email"] == "BLOB"
    assert columns["notes"] == "BLOB"


@pytest.mark.parametrize("dialect_name", ["mysql", "mariadb"])
def test_mysql_varbinary_sized_from_inner_length(dialect_name: str) -> None:
    columns = _column_ddl(dialect_name)
    assert columns["name"] == f"VARBINARY({GCM_OVERHEAD + 4 * 100})"
    assert columns["email"] == f"VARBINARY({SIV_OVERHEAD + 4 * 254})"
    assert columns["age"] == f"VARBINARY({SIV_OVERHEAD + 8})"
    assert columns["notes"] == "LONGBLOB"


@pytest.mark.parametrize("dialect_name", ["postgresql", "sqlite", "mysql", "mariadb"])
def test_base64_storage_ddl_is_sized_text(dialect_name: str) -> None:
    columns = _column_ddl(dialect_name)
    envelope = GCM_OVERHEAD + 4 * 50
    if dialect_name in ("mysql", "mariadb"):
        exact = " CHARACTER SET ascii COLLATE ascii_bin"
        assert columns["code"] == f"VARCHAR({4 * ((envelope + 2) // 3)}){exact}"
        assert columns["memo"] == f"LONGTEXT{exact}"
    else:
        assert columns["code"] == f"VARCHAR({4 * ((envelope + 2) // 3)})"
        assert columns["memo"] == "TEXT"


def test_max_stored_length_matches_ddl() -> None:
    table = _storage_table()
    name_type = table.c.name.type
    code_type = table.c.code.type
    assert isinstance(name_type, Encrypted)
    assert isinstance(code_type, Encrypted)
    assert name_type.max_stored_length() == GCM_OVERHEAD + 400
    assert code_type.max_stored_length() == 336
    assert isinstance(table.c.notes.type, Encrypted)
    assert table.c.notes.type.max_stored_length() is None


@pytest.mark.parametrize("dialect_name", ["mysql", "mariadb"])
def test_mysql_ddl_compiles_for_unsized_strings(dialect_name: str) -> None:
    """Encrypted types over String and Text without a length compile on MySQL
    (no "VARCHAR requires a length" error) and map to LONGBLOB."""
    table = sa.Table(
        "secrets",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("a", Encrypted(sa.String())),
        sa.Column("b", Encrypted(sa.Text())),
        sa.Column("c", Encrypted(sa.String(255))),
        sa.Column("d", DeterministicEncrypted(sa.String(255))),
    )
    ddl = str(CreateTable(table).compile(dialect=DIALECTS[dialect_name]))
    assert "a LONGBLOB" in ddl
    assert "b LONGBLOB" in ddl
    assert f"c VARBINARY({GCM_OVERHEAD + 4 * 255})" in ddl
    assert f"d VARBINARY({SIV_OVERHEAD + 4 * 255})" in ddl


def test_deterministic_unbounded_string_raises_naming_column() -> None:
    with pytest.raises(ConfigurationError, match=r"secrets\.e") as caught:
        sa.Table(
            "secrets",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("e", DeterministicEncrypted(sa.String())),
        )
    assert "String(255)" in str(caught.value)


@pytest.mark.parametrize("inner", [sa.Text(), sa.LargeBinary(), sa.JSON(), sa.Numeric()])
def test_deterministic_unbounded_types_raise(inner: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"items\.value") as caught:
        sa.Table("items", sa.MetaData(), sa.Column("value", DeterministicEncrypted(inner)))

    message = str(caught.value)
    name = type(inner).__name__
    assert f"{name} has none" in message
    assert "indexed or not" in message
    assert "an indexed deterministic column" not in message
    assert f"use Encrypted({name})" in message


@pytest.mark.parametrize("storage", ["binary", "base64"])
def test_storage_round_trip_and_raw_form(
    engine: sa.Engine, keyring: InMemoryKeyring, storage: Any
) -> None:
    table = sa.Table(
        "codes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("code", Encrypted(sa.String(50), storage=storage)),
        sa.Column("lookup", DeterministicEncrypted(sa.String(50), storage=storage)),
    )
    table.metadata.create_all(engine)
    with se.tenant_scope("t-acme"), engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "code": "AB-123", "lookup": "AB-123"}])
        assert conn.execute(sa.select(table.c.code)).scalar_one() == "AB-123"
        found = conn.execute(sa.select(table.c.id).where(table.c.lookup == "AB-123")).all()
        assert found == [(1,)]
        raw_code, raw_lookup = conn.exec_driver_sql("SELECT code, lookup FROM codes").one()
    for raw in (raw_code, raw_lookup):
        if storage == "base64":
            assert isinstance(raw, str)
            envelope = base64.b64decode(raw, validate=True)
        else:
            assert isinstance(raw, (bytes, memoryview))
            envelope = bytes(raw)
        assert b"AB-123" not in envelope
        assert parse_header(envelope).key_version == 1


@pytest.mark.parametrize("storage", ["binary", "base64"])
def test_string_limit_counts_characters(
    engine: sa.Engine, keyring: InMemoryKeyring, storage: Any
) -> None:
    """A String(50) column takes 50 characters of any UTF-8 width, and its
    sized storage column fits the longest of them."""
    table = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(50), storage=storage)),
    )
    table.metadata.create_all(engine)
    values = {1: "a" * 50, 2: "\u00e9" * 50, 3: "\U0001f600" * 50}
    with se.tenant_scope("t-acme"), engine.begin() as conn:
        conn.execute(table.insert(), [{"id": k, "body": v} for k, v in values.items()])
        stored = {row.id: row.body for row in conn.execute(sa.select(table.c.id, table.c.body))}
    assert stored == values
    if storage == "base64":
        reflected = {c["name"]: c for c in sa.inspect(engine).get_columns("notes")}
        body_type = table.c.body.type
        assert isinstance(body_type, Encrypted)
        max_length = body_type.max_stored_length()
        assert max_length is not None
        assert reflected["body"]["type"].length >= max_length


def test_too_long_value_raises_before_any_sql(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    table = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(50))),
    )
    table.metadata.create_all(engine)
    too_long = "q" * 51
    with count_statements(engine) as counter, se.tenant_scope("t-acme"):
        with pytest.raises(PlaintextTooLongError) as caught, engine.begin() as conn:
            conn.execute(table.insert(), [{"id": 1, "body": "fine"}, {"id": 2, "body": too_long}])
    message = str(caught.value)
    assert "notes.body" in message
    assert "50" in message
    assert too_long not in message
    assert not [s for s in counter.statements if "INSERT" in s.upper()]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 0


def test_mapped_str_column_type_checks(tmp_path: Path) -> None:
    """``Mapped[str] = mapped_column(Encrypted(String(100)))`` passes
    ``mypy --strict``, and the attribute is typed as ``str``."""
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.skip("mypy is not installed")
    snippet = tmp_path / "models_snippet.py"
    snippet.write_text(
        textwrap.dedent(
            """
            import sqlalchemy as sa
            from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

            from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted


            class Base(DeclarativeBase):
                pass


            class Patient(Base):
                __tablename__ = "patients"

                id: Mapped[int] = mapped_column(primary_key=True)
                name: Mapped[str] = mapped_column(Encrypted(sa.String(100)))
                email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)))
                age: Mapped[int | None] = mapped_column(Encrypted(sa.Integer()))


            def name_of(patient: Patient) -> str:
                return patient.name


            reveal_type(Encrypted(sa.String(100)))
            not_an_int: int = Patient().name  # the one expected error
            """
        )
    )
    result = subprocess.run(
        [mypy, "--strict", "--cache-dir", str(tmp_path / "cache"), str(snippet)],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout
    assert 'Revealed type is "sqlalchemy_encrypted.types.Encrypted[str]"' in output
    errors = [line for line in output.splitlines() if ": error:" in line]
    assert len(errors) == 1, output
    assert 'expression has type "str", variable has type "int"' in errors[0]


def test_undersized_legacy_column_is_reported(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    """A column created with the plaintext's length is reported with the
    required and actual lengths. PostgreSQL rejects a write that does not
    fit; SQLite ignores declared lengths and stores it whole."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, body VARCHAR(60), title VARCHAR(400))"
        )
    table = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(50), storage="base64")),
        sa.Column("title", Encrypted(sa.String(50), storage="base64")),
    )
    problems = se.find_undersized_columns(engine, table.metadata)
    assert [(p.column, p.required, p.actual, p.unit) for p in problems] == [
        ("notes.body", 336, 60, "characters")
    ]
    assert str(problems[0]) == (
        "encrypted column notes.body needs 336 characters, but the database column "
        "stores at most 60 characters"
    )
    with se.tenant_scope("t-acme"):
        if engine.dialect.name == "postgresql":
            with pytest.raises(sa.exc.DataError), engine.begin() as conn:
                conn.execute(table.insert(), [{"id": 1, "body": "a" * 50}])
        else:
            with engine.begin() as conn:
                conn.execute(table.insert(), [{"id": 1, "body": "a" * 50}])
                assert conn.execute(sa.select(table.c.body)).scalar_one() == "a" * 50


def test_correctly_sized_columns_are_not_reported(
    engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    metadata = _storage_table().metadata
    metadata.create_all(engine)
    assert se.find_undersized_columns(engine, metadata) == []
