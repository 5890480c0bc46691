"""The command line with the keyring table in another database than the data.

``--keyring-url`` (or ``SQLALCHEMY_ENCRYPTED_KEYRING_URL``) names the
database of the keyring table, as ``Keyring(engine=...)`` does in an
application whose data engine is another one.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.orm import Session

from sqlalchemy_encrypted.cli import cli
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

from .rotation_support import Base, Person, fill_persons

MODELS = "tests.rotation_support:Base"
_database_counter = itertools.count()


@dataclass
class SplitApp:
    """Application data in one database, the keyring table in another."""

    data: sa.Engine
    keys: sa.Engine
    key_path: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "SQLALCHEMY_ENCRYPTED_URL": _url_of(self.data),
            "SQLALCHEMY_ENCRYPTED_KEYRING_URL": _url_of(self.keys),
            "SQLALCHEMY_ENCRYPTED_KMS": f"local://{self.key_path}",
            "SQLALCHEMY_ENCRYPTED_MODELS": MODELS,
        }

    def run(self, *args: str, **env: str) -> Result:
        return CliRunner().invoke(cli, list(args), env={**self.env, **env})

    def keyring(self) -> Keyring:
        return Keyring(self.keys, LocalKms(self.key_path), active_key_ttl=0)


def _url_of(engine: sa.Engine) -> str:
    """Return a URL that reaches the engine's tables, PostgreSQL test schema included."""
    url = engine.url
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


@pytest.fixture
def sqlite_keys(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/keys.db")
    yield engine
    engine.dispose()


@pytest.fixture
def pg_keys(pg_server_url: str) -> Iterator[sa.Engine]:
    """A PostgreSQL database of its own on the test cluster, dropped afterwards."""
    name = f"keys_{os.getpid()}_{next(_database_counter)}"
    admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine = sa.create_engine(sa.make_url(pg_server_url).set(database=name))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}"')
        admin.dispose()


def _split_app(data: sa.Engine, keys: sa.Engine, key_path: Path) -> SplitApp:
    """Initialize both databases through the command line, then store 10
    persons of t-acme and t-globex under key version 1."""
    app = SplitApp(data, keys, key_path)
    init = app.run("init")
    assert init.exit_code == 0, init.output
    assert "keyring table encryption_keys is ready in" in init.output
    assert "the re-encryption checkpoint table is ready in" in init.output
    Base.metadata.create_all(data)
    keyring = app.keyring()
    keyring.provision("t-acme")
    keyring.provision("t-globex")
    fill_persons(data, 10)
    return app


def _rotate_reencrypt_status(app: SplitApp) -> None:
    rotated = app.run("keys", "rotate", "t-acme", "--activate-now")
    assert rotated.exit_code == 0, rotated.output

    before = _json(app.run("status", "--json"))
    assert before["stale"] == {"persons.name": 5, "persons.email": 5}

    result = _json(app.run("reencrypt", "--tenant", "t-acme", "--json"))
    assert result["status"] == "succeeded"
    assert result["values_reencrypted"] == 10

    clean = app.run("status", "--fail-on-stale")
    assert clean.exit_code == 0, clean.output
    without_kms = _json(app.run("status", "--json", SQLALCHEMY_ENCRYPTED_KMS=""))
    name = next(c for c in without_kms["columns"] if c["column"] == "name")
    assert {(k["tenant_id"], k["key_version"]) for k in name["keys"]} == {
        ("t-acme", 2),
        ("t-globex", 1),
    }

    assert "encryption_keys" not in _tables(app.data)
    assert "encryption_reencrypt_checkpoints" in _tables(app.data)
    assert "encryption_keys" in _tables(app.keys)
    assert "persons" not in _tables(app.keys)
    app.keyring()
    with Session(app.data) as session:
        names = {p.id: p.name for p in session.scalars(sa.select(Person))}
    assert names == {i: f"Person {i}" for i in range(1, 11)}


def test_keyring_in_other_sqlite_file(tmp_path: Path, sqlite_keys: sa.Engine) -> None:
    data = sa.create_engine(f"sqlite:///{tmp_path}/data.db")
    try:
        app = _split_app(data, sqlite_keys, tmp_path / "master.key")
        _rotate_reencrypt_status(app)
    finally:
        data.dispose()


def test_keyring_in_other_postgresql_database(
    tmp_path: Path, pg_engine: sa.Engine, pg_keys: sa.Engine
) -> None:
    app = _split_app(pg_engine, pg_keys, tmp_path / "master.key")
    _rotate_reencrypt_status(app)


def test_keyring_url_option_overrides_environment(tmp_path: Path, sqlite_keys: sa.Engine) -> None:
    data = sa.create_engine(f"sqlite:///{tmp_path}/data.db")
    try:
        app = _split_app(data, sqlite_keys, tmp_path / "master.key")
        env = {"SQLALCHEMY_ENCRYPTED_KEYRING_URL": f"sqlite:///{tmp_path}/elsewhere.db"}

        listed = app.run("--keyring-url", _url_of(sqlite_keys), "keys", "list", "--json", **env)

        assert {k["tenant_id"] for k in _json(listed)} == {"t-acme", "t-globex"}
    finally:
        data.dispose()


def test_keyring_url_needed_for_separate_keyring(tmp_path: Path, sqlite_keys: sa.Engine) -> None:
    """Without --keyring-url the command looks for the keyring table in the
    data database, and reports that it does not exist."""
    data = sa.create_engine(f"sqlite:///{tmp_path}/data.db")
    try:
        app = _split_app(data, sqlite_keys, tmp_path / "master.key")

        result = app.run("keys", "list", SQLALCHEMY_ENCRYPTED_KEYRING_URL="")

        assert result.exit_code == 3
        assert result.output.startswith("error: keyring table encryption_keys does not exist")
        assert "Traceback" not in result.output
    finally:
        data.dispose()


def test_keys_commands_need_only_keyring_url(tmp_path: Path, sqlite_keys: sa.Engine) -> None:
    data = sa.create_engine(f"sqlite:///{tmp_path}/data.db")
    try:
        app = _split_app(data, sqlite_keys, tmp_path / "master.key")

        listed = app.run("keys", "list", "--json", SQLALCHEMY_ENCRYPTED_URL="")

        assert len(_json(listed)) == 4
    finally:
        data.dispose()


def test_invalid_keyring_url(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["--keyring-url", "nosuchdialect://x", "keys", "list"],
        env={"SQLALCHEMY_ENCRYPTED_KMS": f"local://{tmp_path}/master.key"},
    )

    assert result.exit_code == 3
    assert result.output.startswith("error: invalid --keyring-url:")
