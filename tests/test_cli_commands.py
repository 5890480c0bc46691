"""The ``sqlalchemy-encrypted`` command line, run in process with click's CliRunner."""

from __future__ import annotations

import datetime
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.orm import Session

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import KeyPurpose, tenant_scope
from sqlalchemy_encrypted import _cli_rotation as cli_rotation
from sqlalchemy_encrypted._cli_context import render_table
from sqlalchemy_encrypted.cli import cli
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

from .keyring_helpers import FakeClock
from .rotation_support import (
    NOTE_TYPE,
    Base,
    Invoice,
    Note,
    Person,
    Typed,
    fill_persons,
    key_versions,
    raw_values,
)

MODELS = "tests.rotation_support:Base"


@dataclass
class App:
    """A SQLite application database with a local KMS, driven through the CLI."""

    url: str
    key_path: Path
    engine: sa.Engine

    @property
    def env(self) -> dict[str, str]:
        return {
            "SQLALCHEMY_ENCRYPTED_URL": self.url,
            "SQLALCHEMY_ENCRYPTED_KMS": f"local://{self.key_path}",
            "SQLALCHEMY_ENCRYPTED_MODELS": MODELS,
        }

    def run(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> Result:
        runner = CliRunner()
        return runner.invoke(cli, list(args), env=env or self.env, input=input)

    def keyring(self) -> Keyring:
        return Keyring(self.engine, LocalKms(self.key_path), active_key_ttl=0)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/app.db")
    yield App(f"sqlite:///{tmp_path}/app.db", tmp_path / "master.key", engine)
    engine.dispose()


@pytest.fixture
def filled(app: App) -> App:
    """Initialized, with persons of two tenants, invoices and notes under version 1."""
    result = app.run("init")
    assert result.exit_code == 0, result.output
    Base.metadata.create_all(app.engine)
    keyring = app.keyring()
    keyring.provision("t-acme")
    keyring.provision("t-globex")
    fill_persons(app.engine, 10)
    with app.engine.begin() as conn:
        conn.execute(
            sa.insert(Invoice.__table__),
            [{"id": i, "tenant_id": "t-acme", "iban": f"DE{i:020d}"} for i in (1, 2, 3)],
        )
        conn.execute(
            sa.insert(Note.__table__),
            [{"id": i, "blob": NOTE_TYPE.seal(f"note {i}", tenant_id="t-acme")} for i in (1, 2)],
        )
    return app


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- init and keys ------------------------------------------------------------


def test_init_creates_key_file_and_tables(app: App) -> None:
    result = app.run("init")

    assert result.exit_code == 0, result.output
    assert "created master key file" in result.output
    assert stat.S_IMODE(os.stat(app.key_path).st_mode) == 0o600
    tables = sa.inspect(app.engine).get_table_names()
    assert "encryption_keys" in tables
    assert "encryption_reencrypt_checkpoints" in tables
    again = app.run("init")
    assert again.exit_code == 0
    assert "created master key file" not in again.output


def test_keys_rotate_promote_and_list(filled: App) -> None:
    rotated = filled.run("--active-key-ttl", "0", "keys", "rotate", "t-acme", "--json")
    created = _json(rotated)
    assert [(k["purpose"], k["version"], k["state"]) for k in created] == [
        ("randomized", 2, "pending"),
        ("deterministic", 2, "pending"),
    ]

    promoted = filled.run("--active-key-ttl", "0", "keys", "promote")
    assert promoted.exit_code == 0, promoted.output
    assert "randomized key version 2 is active" in promoted.output

    listed = _json(filled.run("keys", "list", "--tenant", "t-acme", "--json"))
    states = {(k["purpose"], k["version"]): k["state"] for k in listed}
    assert states == {
        ("deterministic", 1): "decrypt_only",
        ("deterministic", 2): "active",
        ("randomized", 1): "decrypt_only",
        ("randomized", 2): "active",
    }
    text = filled.run("keys", "list")
    assert "TENANT" in text.output
    assert "SEALS RESERVED" in text.output
    assert "t-globex" in text.output
    assert "wrapped" not in text.output


def test_keys_list_shows_sealed_counts(filled: App) -> None:
    listed = _json(filled.run("keys", "list", "--tenant", "t-acme", "--json"))

    counts = {(k["purpose"], k["version"]): k["sealed_count"] for k in listed}
    # The filled database contains t-acme values under version 1 of both purposes.
    assert counts[("deterministic", 1)] == 0
    assert counts[("randomized", 1)] >= 1


def test_keys_rotate_needs_tenant(filled: App) -> None:
    result = filled.run("keys", "rotate")

    assert result.exit_code == 2
    assert "--all-tenants" in result.output


def test_keys_rotate_all_tenants(filled: App) -> None:
    result = filled.run(
        "keys", "rotate", "--all-tenants", "--activate-now", "--purpose", "randomized"
    )

    assert result.exit_code == 0, result.output
    assert "tenant 't-acme': randomized key version 2 is active" in result.output
    assert "tenant 't-globex': randomized key version 2 is active" in result.output


def test_keys_rotate_all_tenants_names_shredded(filled: App) -> None:
    filled.keyring().shred("t-globex")

    result = filled.run("keys", "rotate", "--all-tenants", "--activate-now")

    assert result.exit_code == 0, result.output
    assert "tenant 't-globex': crypto-shredded, so it has no keys to rotate" in result.output
    assert "tenant 't-acme': randomized key version 2 is active" in result.output


def test_keys_rewrap(filled: App, tmp_path: Path) -> None:
    new_key = tmp_path / "new.key"
    LocalKms.create(new_key, kek="kek-2025")

    result = filled.run("keys", "rewrap", "--to-kms", f"local://{new_key}")

    assert result.exit_code == 0, result.output
    assert "rewrapped 4 key(s) under KEK local:kek-2025:" in result.output
    listed = _json(filled.run("keys", "list", "--json"))
    assert {k["kek_id"].split(":")[1] for k in listed} == {"kek-2025"}


# -- status, reencrypt, retire ---------------------------------------------------


def test_status_shows_census(filled: App) -> None:
    filled.run("keys", "rotate", "t-acme", "--activate-now")

    text = filled.run("status")
    data = _json(filled.run("status", "--json"))
    failing = filled.run("status", "--fail-on-stale")

    assert text.exit_code == 0, text.output
    assert "persons.name   t-acme    1        decrypt_only  5       yes" in text.output
    assert "value(s) under an old key version" in text.output
    assert data["stale"] == {
        "persons.name": 5,
        "persons.email": 5,
        "invoices.iban": 3,
        "notes.blob": 2,
    }
    assert failing.exit_code == 6


def test_status_counts_plaintext_and_nulls(filled: App) -> None:
    with filled.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO persons (id, tenant_id, name, email) VALUES (90, 't-acme', NULL, NULL)"
        )
        conn.execute(
            sa.text("INSERT INTO persons (id, tenant_id, name) VALUES (91, 't-acme', :v)"),
            {"v": b"legacy plaintext"},
        )

    text = filled.run("status", "--table", "persons")

    assert text.exit_code == 0, text.output
    assert "persons.name: 1 NULL, 1 not encrypted" in text.output
    assert "persons.email: 2 NULL" in text.output


def test_status_without_kms_reads_metadata(filled: App) -> None:
    env = dict(filled.env)
    del env["SQLALCHEMY_ENCRYPTED_KMS"]
    os.remove(filled.key_path)

    data = _json(filled.run("status", "--json", env=env))

    persons = next(c for c in data["columns"] if c["column"] == "name")
    assert {k["key_state"] for k in persons["keys"]} == {"active"}
    assert persons["encrypted"] == 10


def test_reencrypt_dry_run_then_run(filled: App) -> None:
    filled.run("keys", "rotate", "t-acme", "--activate-now")
    stored = raw_values(filled.engine, "persons", "name")

    dry = filled.run("reencrypt", "--dry-run", "--table", "persons")
    assert dry.exit_code == 0, dry.output
    assert "dry run: 10 value(s) would be re-encrypted" in dry.output
    assert raw_values(filled.engine, "persons", "name") == stored

    result = filled.run("reencrypt", "--table", "persons", "--batch-size", "3", "--json")
    data = _json(result)
    assert data["status"] == "succeeded"
    assert data["values_reencrypted"] == 10
    assert data["remaining"] == {}
    with Session(filled.engine) as session:
        names = {p.id: p.name for p in session.scalars(sa.select(Person))}
    assert names == {i: f"Person {i}" for i in range(1, 11)}


def test_reencrypt_reencode_pads_old_decimal(filled: App) -> None:
    """--reencode gives a Numeric(12, 2) value stored as 1.5 by an earlier
    release the encoding 1.50; a plain run keeps 1.5."""
    amount_type = Typed.__table__.c.amount.type
    key = filled.keyring().active_key("t-acme", KeyPurpose.RANDOMIZED)
    sealed = amount_type._seal_encoded(b"1.5", key, amount_type.column_identity)
    with filled.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO typed_values (id, tenant_id, amount) VALUES (1, 't-acme', :a)"),
            {"a": sealed},
        )

    def amount() -> str:
        with tenant_scope("t-acme"), Session(filled.engine) as session:
            return str(session.get_one(Typed, 1).amount)

    plain = filled.run("reencrypt", "--table", "typed_values")
    plain_amount = amount()
    dry = filled.run("reencrypt", "--table", "typed_values", "--reencode", "--dry-run")
    result = filled.run("reencrypt", "--table", "typed_values", "--reencode", "--json")

    assert plain.exit_code == 0, plain.output
    assert plain_amount == "1.5"
    assert dry.exit_code == 0, dry.output
    assert "dry run: 1 value(s) would be decoded and encoded again" in dry.output
    data = _json(result)
    assert data["status"] == "succeeded"
    assert data["values_reencrypted"] == 1
    assert amount() == "1.50"


def _copy_name(app: App, source: int, target: int) -> None:
    """Store row ``source``'s sealed name in row ``target``, past the column type."""
    with app.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE persons SET name = (SELECT name FROM persons WHERE id = :s) WHERE id = :t"
            ),
            {"s": source, "t": target},
        )


def test_status_fails_on_value_of_other_tenant(filled: App) -> None:
    # Row 2 (t-acme) receives the sealed name of row 1 (t-globex).
    _copy_name(filled, 1, 2)

    text = filled.run("status")
    data = json.loads(filled.run("status", "--json").stdout)

    assert text.exit_code == 9, text.output
    assert "persons.name: 1 under another tenant's key" in text.output
    assert "1 value(s) are sealed under another tenant's key" in text.output
    assert "'sqlalchemy-encrypted reencrypt --move-to-row-tenant'" in text.output
    assert data["tenant_mismatches"] == {"persons.name": 1}
    assert data["totals"]["tenant_mismatches"] == 1


def test_reencrypt_moves_value_to_row_tenant(filled: App) -> None:
    _copy_name(filled, 1, 2)
    stored = raw_values(filled.engine, "persons", "name")

    plain = filled.run("reencrypt", "--table", "persons")
    dry = filled.run("reencrypt", "--table", "persons", "--dry-run", "--move-to-row-tenant")
    assert raw_values(filled.engine, "persons", "name") == stored
    moved = filled.run("reencrypt", "--table", "persons", "--move-to-row-tenant")
    after = filled.run("status")

    assert plain.exit_code == 9, plain.output
    assert "reencrypt --move-to-row-tenant" in plain.output
    assert dry.exit_code == 0, dry.output
    assert "persons.name  t-globex    t-acme      1" in dry.output
    assert "dry run: 1 value(s) would move to the tenant in their row's tenant column" in (
        dry.output
    )
    assert moved.exit_code == 0, moved.output
    assert "moved 1 value(s) to the tenant in their row's tenant column" in moved.output
    assert after.exit_code == 0, after.output
    with tenant_scope("t-acme"), Session(filled.engine) as session:
        name = session.scalar(sa.select(Person.name).where(Person.id == 2))
    assert name == "Person 1"


def test_retire_refused_while_in_use(filled: App) -> None:
    """A column re-encrypted alone leaves the others on version 1: retire names them."""
    filled.run("keys", "rotate", "t-acme", "--activate-now")
    assert filled.run("reencrypt", "--table", "persons").exit_code == 0

    refused = filled.run("keys", "retire", "t-acme", "1", "--min-inactive", "0")

    assert refused.exit_code == 5
    assert "invoices.iban: 3" in refused.output
    assert "notes.blob: 2" in refused.output
    assert "persons" not in refused.output
    assert "Traceback" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1

    assert filled.run("reencrypt").exit_code == 0
    retired = filled.run("keys", "retire", "t-acme", "1", "--min-inactive", "0")
    assert retired.exit_code == 0, retired.output
    assert "randomized key version 1 retired" in retired.output
    assert "deterministic key version 1 retired" in retired.output


def test_retire_tenant_with_one_purpose(app: App) -> None:
    """A tenant with deterministic values only: rotate without --purpose,
    re-encrypt, then retire version 1 without --purpose."""
    assert app.run("init").exit_code == 0
    Base.metadata.create_all(app.engine)
    app.keyring()
    with app.engine.begin() as conn:
        conn.execute(
            sa.insert(Person.__table__),
            [{"id": 1, "tenant_id": "t-acme", "email": "a@example.test"}],
        )

    rotated = app.run("keys", "rotate", "t-acme", "--activate-now")
    assert rotated.exit_code == 0, rotated.output
    assert "randomized" not in rotated.output
    assert app.run("reencrypt").exit_code == 0
    retired = app.run("keys", "retire", "t-acme", "1", "--min-inactive", "0")

    assert retired.exit_code == 0, retired.output
    assert "deterministic key version 1 retired" in retired.output
    purposes = {info.purpose for info in app.keyring().list_keys("t-acme")}
    assert purposes == {KeyPurpose.DETERMINISTIC}


def test_retire_skips_active_purpose(filled: App) -> None:
    filled.run("keys", "rotate", "t-acme", "--purpose", "deterministic", "--activate-now")
    assert filled.run("reencrypt").exit_code == 0

    first = filled.run("keys", "retire", "t-acme", "1", "--min-inactive", "0")
    again = filled.run("keys", "retire", "t-acme", "1", "--min-inactive", "0")
    named = filled.run(
        "keys", "retire", "t-acme", "1", "--purpose", "randomized", "--min-inactive", "0"
    )

    assert first.exit_code == 0, first.output
    assert "deterministic key version 1 retired" in first.output
    assert "randomized key version 1 is active, so it was not retired" in first.output
    assert again.exit_code == 0, again.output
    assert "already retired" in again.output
    assert "randomized key version 1 is active" in again.output
    assert named.exit_code == 1
    assert "randomized version 1 is active, and stored values use it" in named.output
    assert "'sqlalchemy-encrypted keys rotate t-acme --purpose randomized'" in named.output
    assert "rotate the tenant's keys and re-encrypt" not in named.output
    assert len(named.output.strip().splitlines()) == 1


def test_retire_waits_for_cached_active_key(filled: App) -> None:
    """An application process caches version 1 as active: 'keys retire' right
    after 'keys rotate --activate-now' and 'reencrypt' exits with status 10,
    and after the wait its census finds what the process wrote meanwhile."""
    clock = FakeClock()
    writer = Keyring(filled.engine, LocalKms(filled.key_path), active_key_ttl=60, clock=clock)

    def write(person_id: int) -> None:
        # Each in-process command makes its own keyring the default provider.
        se.set_default_key_provider(writer)
        fill_persons(filled.engine, 1, start=person_id)

    write(12)
    assert filled.run("keys", "rotate", "t-acme", "--activate-now").exit_code == 0
    assert filled.run("reencrypt").exit_code == 0
    early = filled.run("keys", "retire", "t-acme", "1")
    write(14)
    written = key_versions([raw_values(filled.engine, "persons", "name")[14]])
    _end_retire_wait(filled, "t-acme", 2)
    in_use = filled.run("keys", "retire", "t-acme", "1")
    clock.advance(60)
    assert filled.run("reencrypt").exit_code == 0
    retired = filled.run("keys", "retire", "t-acme", "1")

    assert early.exit_code == 10, early.output
    assert "stopped being the active version" in early.output
    assert "active_key_ttl (60 s) plus 60 s" in early.output
    assert "--min-inactive" in early.output
    assert len(early.output.strip().splitlines()) == 1
    assert written == [1]
    assert in_use.exit_code == 5, in_use.output
    assert "persons.name: 1" in in_use.output
    assert retired.exit_code == 0, retired.output
    se.set_default_key_provider(filled.keyring())
    with Session(filled.engine) as session:
        assert session.get(Person, 14).name == "Person 14"  # type: ignore[union-attr]


def _end_retire_wait(app: App, tenant: str, version: int) -> None:
    """Move the activation time of ``version`` back by more than the wait
    of 'keys retire', as if that much time had passed."""
    keyring = app.keyring()
    table = keyring.table
    for info in keyring.list_keys(tenant):
        if info.version != version or info.activated_at is None:
            continue
        earlier = info.activated_at - datetime.timedelta(seconds=121)
        with app.engine.begin() as conn:
            conn.execute(
                sa.update(table).where(table.c.key_id == info.key_id).values(activated_at=earlier)
            )


def test_retire_needs_models(filled: App) -> None:
    env = dict(filled.env)
    del env["SQLALCHEMY_ENCRYPTED_MODELS"]

    result = filled.run("keys", "retire", "t-acme", "1", env=env)

    assert result.exit_code == 3
    assert "--models" in result.output


def test_reencrypt_reports_failed_rows(filled: App) -> None:
    stored = bytearray(raw_values(filled.engine, "persons", "name")[2])
    stored[-1] ^= 1
    with filled.engine.begin() as conn:
        conn.execute(sa.text("UPDATE persons SET name = :v WHERE id = 2"), {"v": bytes(stored)})
    filled.run("keys", "rotate", "t-acme", "--activate-now")

    result = filled.run("reencrypt", "--table", "persons")

    assert result.exit_code == 6
    assert "failed: persons.name primary key 2: DecryptionError" in result.output
    assert "still under an old key version: persons.name: 1" in result.output


def test_reencrypt_progress_bar_on_terminal(filled: App, monkeypatch: pytest.MonkeyPatch) -> None:
    filled.run("keys", "rotate", "t-acme", "--activate-now")
    monkeypatch.setattr(cli_rotation, "_stderr_is_terminal", lambda: True)

    result = filled.run("reencrypt", "--table", "persons")

    assert result.exit_code == 0, result.output
    assert "re-encrypting" in result.stderr


def test_reencrypt_workers_on_sqlite_is_an_error(filled: App) -> None:
    result = filled.run("reencrypt", "--workers", "2")

    assert result.exit_code == 3
    assert result.output.startswith("error: 2 workers need PostgreSQL")


# -- shred ----------------------------------------------------------------------


def test_shred_asks_for_the_tenant_id(filled: App) -> None:
    refused = filled.run("keys", "shred", "t-acme", input="t-acm\n")

    assert refused.exit_code == 7
    assert "nothing was destroyed" in refused.output
    keyring = filled.keyring()
    assert keyring.active_key("t-acme", KeyPurpose.RANDOMIZED).version == 1

    confirmed = filled.run("keys", "shred", "t-acme", input="t-acme\n")

    assert confirmed.exit_code == 0, confirmed.output
    assert "destroyed 2 key(s)" in confirmed.output
    listed = _json(filled.run("keys", "list", "--tenant", "t-acme", "--json"))
    assert {k["state"] for k in listed} == {"destroyed"}


def test_shred_with_yes(filled: App) -> None:
    result = filled.run("keys", "shred", "t-globex", "--yes")

    assert result.exit_code == 0, result.output
    status = _json(filled.run("status", "--json", "--tenant", "t-globex"))
    persons = next(c for c in status["columns"] if c["column"] == "name")
    assert {k["key_state"] for k in persons["keys"]} == {"destroyed"}
    assert persons["stale"] == 0


# -- inspect --------------------------------------------------------------------


def test_inspect_decodes_hex_and_base64(filled: App) -> None:
    stored = raw_values(filled.engine, "persons", "email")[1]
    assert stored is not None
    import base64

    for text in (
        stored.hex(),
        "\\x" + stored.hex(),
        "0x" + stored.hex(),
        base64.b64encode(stored).decode(),
    ):
        data = _json(filled.run("inspect", text, "--json"))
        assert data["algorithm"] == "AES_256_SIV"
        assert data["value_type"] == "STR"
        assert data["key_version"] == 1
        assert data["length"] == len(stored)
    with tenant_scope("t-globex"):
        key = filled.keyring().active_key("t-globex", KeyPurpose.DETERMINISTIC)
    assert data["key_id"] == str(key.key_id)

    text = filled.run("inspect", stored.hex(), env={})
    assert text.exit_code == 0
    assert "key version" in text.output


def test_inspect_rejects_garbage() -> None:
    result = CliRunner().invoke(cli, ["inspect", "not an envelope!"], env={})

    assert result.exit_code == 1
    assert result.output.startswith("error: the value is neither hex")
    short = CliRunner().invoke(cli, ["inspect", "0x0101"], env={})
    assert short.exit_code == 1
    assert "too short" in short.output


# -- errors -----------------------------------------------------------------------


def test_missing_url_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["status"], env={"SQLALCHEMY_ENCRYPTED_URL": ""})

    assert result.exit_code == 3
    assert result.output == "error: no database URL: pass --url or set SQLALCHEMY_ENCRYPTED_URL\n"


def test_bad_models_path(filled: App) -> None:
    result = filled.run("--models", "nowhere.models:Base", "status")

    assert result.exit_code == 3
    assert "cannot import module 'nowhere.models'" in result.output


def test_missing_key_file(filled: App, tmp_path: Path) -> None:
    result = filled.run("--kms", f"local://{tmp_path}/absent.key", "keys", "rewrap")

    assert result.exit_code == 3
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_verbose_prints_traceback(filled: App, tmp_path: Path) -> None:
    result = filled.run("--verbose", "--kms", f"local://{tmp_path}/absent.key", "keys", "rewrap")

    assert result.exit_code == 3
    assert "Traceback" in result.stderr


def test_database_error_hides_statement(tmp_path: Path) -> None:
    env = {
        "SQLALCHEMY_ENCRYPTED_URL": f"sqlite:///{tmp_path}/empty.db",
        "SQLALCHEMY_ENCRYPTED_MODELS": MODELS,
    }
    # The keyring table exists, the application's tables do not.
    init = CliRunner().invoke(cli, ["--kms", f"local://{tmp_path}/master.key", "init"], env=env)
    assert init.exit_code == 0, init.output
    result = CliRunner().invoke(cli, ["status"], env=env)

    assert result.exit_code == 1
    assert result.output.startswith("error: database error: OperationalError: no such table")
    assert "SELECT" not in result.output


def test_help_lists_exit_codes() -> None:
    result = CliRunner().invoke(cli, ["--help"])

    assert result.exit_code == 0
    assert "5  key version still in use" in result.output
    assert "9  values are sealed under another tenant's key" in result.output
    for command in ("init", "keys", "status", "reencrypt", "inspect"):
        assert command in result.output


def _options_with_envvar(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[Any]:
    """Yield (command path, option) for every option of ``command`` and its
    subcommands that reads an environment variable."""
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar:
            yield path, param
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _options_with_envvar(sub, (*path, name))


def test_help_names_every_envvar() -> None:
    options = list(_options_with_envvar(cli))
    assert len(options) == 9

    for path, option in options:
        output = CliRunner().invoke(cli, [*path, "--help"]).output
        flat = " ".join(output.split())
        assert f"env var: {option.envvar}" in flat, option.opts


def test_cli_docs_list_same_envvars() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    documented = dict(
        re.findall(r"^\| `(--[a-z-]+)[^`]*` \| `(SQLALCHEMY_ENCRYPTED_\w+)` \|", page, re.M)
    )
    in_code = {option.opts[0]: option.envvar for _, option in _options_with_envvar(cli)}

    assert documented == in_code


def test_kms_help_names_every_scheme() -> None:
    output = " ".join(CliRunner().invoke(cli, ["--help"]).output.split())

    for scheme in ("local:///", "local-env://", "aws-kms://"):
        assert scheme in output


@pytest.mark.parametrize("value", ["abc", "0", "-3", str(2**63)])
def test_key_usage_limit_option_rejects(filled: App, value: str) -> None:
    result = filled.run("--key-usage-limit", value, "keys", "list")

    assert result.exit_code == 2
    assert "--key-usage-limit" in result.output


def test_key_usage_limit_option_on_old_table(filled: App) -> None:
    # A keyring table from before the usage counter column.
    with filled.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE encryption_keys DROP COLUMN sealed_count")
    rotated = filled.run("keys", "rotate", "t-acme", "--purpose", "randomized", "--activate-now")
    assert rotated.exit_code == 0, rotated.output

    counting = filled.run("reencrypt", "--tenant", "t-acme", "--column", "persons.name")
    assert counting.exit_code != 0
    assert "--key-usage-limit none" in counting.output

    result = filled.run(
        "--key-usage-limit", "none", "reencrypt", "--tenant", "t-acme", "--column", "persons.name"
    )
    assert result.exit_code == 0, result.output
    listed = _json(filled.run("keys", "list", "--tenant", "t-acme", "--json"))
    assert {k["sealed_count"] for k in listed} == {None}


def test_key_usage_limit_option_counts(filled: App) -> None:
    rotated = filled.run("keys", "rotate", "t-acme", "--purpose", "randomized", "--activate-now")
    assert rotated.exit_code == 0, rotated.output

    result = filled.run(
        "--key-usage-limit", "2", "reencrypt", "--tenant", "t-acme", "--column", "persons.name"
    )

    # Version 2 fills after two values, so the job moves on to newer versions.
    # With more values than a key may seal, some stay stale (exit status 6).
    assert result.exit_code in (0, 6), result.output
    listed = _json(filled.run("keys", "list", "--tenant", "t-acme", "--json"))
    randomized = [k for k in listed if k["purpose"] == "randomized"]
    assert len(randomized) > 2
    assert all(k["sealed_count"] <= 2 for k in randomized if k["version"] > 1)


def test_table_quotes_ambiguous_tenant_ids() -> None:
    table = render_table(("TENANT", "VERSION"), [("acme", 1), ("acme ", 2), ("a\tb", 3)])

    lines = table.splitlines()
    assert lines[1].split() == ["acme", "1"]
    assert lines[2].startswith("'acme '")
    assert lines[3].startswith("'a\\tb'")
