"""Commands given a tenant id: unknown tenants, the census of some tenants,
shredded tenants and pending versions.

A command given a mistyped tenant id must fail and name it, instead of
doing nothing and exiting 0. ``status --tenant`` shows only the selected
tenants.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sqlalchemy_encrypted import KeyPurpose
from sqlalchemy_encrypted import _cli_keys as cli_keys
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.rotation import CheckpointStore

from .ops_cli_support import CliApp, make_cli_app
from .rotation_support import raw_values

UNKNOWN = "error: unknown tenant 't-acmee': no keys in keyring table encryption_keys"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[CliApp]:
    app = make_cli_app(tmp_path)
    yield app
    app.engine.dispose()


def _json(result: Any) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _checkpoint_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return len(CheckpointStore().list(conn))


# -- unknown tenants --------------------------------------------------------------


def test_reencrypt_unknown_tenant_changes_nothing(app: CliApp) -> None:
    assert app.run("keys", "rotate", "t-acme", "--activate-now").exit_code == 0
    stored = raw_values(app.engine, "persons", "name")

    result = app.run("reencrypt", "--tenant", "t-acme", "--tenant", "t-acmee")

    assert result.exit_code == 1
    assert result.output.startswith(UNKNOWN)
    assert result.output.rstrip().endswith("nothing was re-encrypted")
    assert "'t-acme'," not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert raw_values(app.engine, "persons", "name") == stored
    assert _checkpoint_count(app.engine) == 0


def test_reencrypt_dry_run_unknown_tenant(app: CliApp) -> None:
    result = app.run("reencrypt", "--dry-run", "--tenant", "t-acmee", "--tenant", "t-x")

    assert result.exit_code == 1
    assert result.output.startswith("error: unknown tenants 't-acmee', 't-x'")


def test_reencrypt_tenant_with_rows_only(app: CliApp) -> None:
    """A tenant without keys whose rows hold only NULLs is known to the census."""
    with app.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO persons (id, tenant_id, name, email) VALUES (90, 't-new', NULL, NULL)"
        )

    reencrypted = app.run("reencrypt", "--tenant", "t-new")
    status = app.run("status", "--tenant", "t-new")

    assert reencrypted.exit_code == 0, reencrypted.output
    assert status.exit_code == 0, status.output
    assert "persons.name: 1 NULL" in status.output
    assert "persons.email: 1 NULL" in status.output


def test_status_unknown_tenant(app: CliApp) -> None:
    text = app.run("status", "--tenant", "t-acme", "--tenant", "t-acmee")
    as_json = app.run("status", "--tenant", "t-acmee", "--json")

    assert text.exit_code == 1
    assert text.output.startswith(UNKNOWN)
    assert "'t-acme'," not in text.output
    assert as_json.exit_code == 1
    assert as_json.stdout == ""


def test_status_unknown_tenant_without_kms(app: CliApp) -> None:
    env = {**app.env, "SQLALCHEMY_ENCRYPTED_KMS": ""}

    result = app.run("status", "--tenant", "t-acmee", **env)

    assert result.exit_code == 1
    assert result.output.startswith(UNKNOWN)


@pytest.mark.parametrize(
    "command",
    [
        ("keys", "list", "--tenant", "t-acmee"),
        ("keys", "promote", "--tenant", "t-acmee"),
        ("keys", "rewrap", "--tenant", "t-acmee"),
        ("keys", "retire", "t-acmee", "1"),
        ("keys", "rotate", "t-acmee"),
        ("keys", "shred", "t-acmee", "--yes"),
    ],
)
def test_keys_command_unknown_tenant(app: CliApp, command: tuple[str, ...]) -> None:
    before = app.keyring().list_keys()

    result = app.run("--active-key-ttl", "0", *command)

    assert result.exit_code == 1
    assert result.output.startswith(
        "error: tenant 't-acmee' has no keys in keyring table encryption_keys"
    )
    assert "keys list" in result.output
    assert app.keyring().list_keys() == before


def test_keys_promote_known_tenant(app: CliApp) -> None:
    assert app.run("keys", "rotate", "t-acme").exit_code == 0

    result = app.run("--active-key-ttl", "0", "keys", "promote", "--tenant", "t-acme")

    assert result.exit_code == 0, result.output
    assert "tenant 't-acme': randomized key version 2 is active" in result.output


# -- status of some tenants and columns ---------------------------------------------


@pytest.fixture
def mixed(app: CliApp) -> CliApp:
    """t-globex with a NULL row and a plaintext row, t-acme with one NULL
    row, and a NULL in notes, a table without tenant column."""
    with app.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO persons (id, tenant_id, name, email) VALUES "
            "(90, 't-globex', NULL, NULL), (92, 't-acme', NULL, NULL)"
        )
        conn.execute(
            sa.text("INSERT INTO persons (id, tenant_id, name) VALUES (91, 't-globex', :v)"),
            {"v": b"legacy plaintext"},
        )
        conn.exec_driver_sql("INSERT INTO notes (id, blob) VALUES (1, NULL)")
    return app


def test_status_tenant_shows_only_its_rows(mixed: CliApp) -> None:
    result = mixed.run("status", "--tenant", "t-acme")

    assert result.exit_code == 0, result.output
    assert "t-globex" not in result.output
    assert "persons.name: 1 NULL\n" in result.output
    assert "persons.email: 1 NULL\n" in result.output
    assert "not encrypted" not in result.output
    assert "notes.blob" not in result.output
    assert "total: 10 encrypted value(s) in 2 column(s), 2 NULL\n" in result.output


def test_status_tenant_json_totals(mixed: CliApp) -> None:
    data = _json(mixed.run("status", "--tenant", "t-acme", "--json"))

    assert [f"{c['table']}.{c['column']}" for c in data["columns"]] == [
        "persons.name",
        "persons.email",
    ]
    name = data["columns"][0]
    assert name["total"] == 6
    assert name["nulls"] == 1
    assert name["not_encrypted"] == 0
    assert {k["tenant_id"] for k in name["keys"]} == {"t-acme"}
    assert data["tenants"] == ["t-acme"]
    assert data["totals"] == {
        "columns": 2,
        "encrypted": 10,
        "nulls": 2,
        "not_encrypted": 0,
        "tenant_mismatches": 0,
        "stale": 0,
        "unknown_keys": 0,
    }


def test_status_without_tenant_lists_every_column(mixed: CliApp) -> None:
    data = _json(mixed.run("status", "--json"))

    labels = {f"{c['table']}.{c['column']}" for c in data["columns"]}
    assert {"persons.name", "notes.blob", "invoices.iban"} <= labels
    assert data["tenants"] is None
    assert data["totals"]["nulls"] == 6
    assert data["totals"]["not_encrypted"] == 1


def test_status_column_filter(mixed: CliApp) -> None:
    data = _json(mixed.run("status", "--column", "persons.name", "--tenant", "t-globex", "--json"))
    unknown = mixed.run("status", "--column", "persons.nope")

    assert [f"{c['table']}.{c['column']}" for c in data["columns"]] == ["persons.name"]
    assert data["columns"][0]["not_encrypted"] == 1
    assert data["columns"][0]["nulls"] == 1
    assert unknown.exit_code == 3
    assert "no encrypted column named persons.nope" in unknown.output


# -- shredded tenants ----------------------------------------------------------------


def test_retire_shredded_tenant_with_values(app: CliApp) -> None:
    assert app.run("keys", "shred", "t-globex", "--yes").exit_code == 0

    result = app.run("keys", "retire", "t-globex", "1")

    assert result.exit_code == 1
    assert result.output.startswith(
        "error: the keys of tenant 't-globex' were destroyed (crypto-shredded)"
    )
    assert "no key version is left to retire" in result.output
    assert "re-encrypt" not in result.output
    assert set(app.states("t-globex").values()) == {"destroyed"}


# -- a version that became pending meanwhile -------------------------------------------


def test_rotate_race_with_pending_names_options(
    app: CliApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process rotates the tenant after the command checked it: the
    keyring's error reaches the operator worded with the command's options."""
    plan = cli_keys._plan_rotation

    def plan_then_rotate_elsewhere(keyring: Keyring, *args: Any, **kwargs: Any) -> Any:
        planned = plan(keyring, *args, **kwargs)
        other = Keyring(app.engine, LocalKms(app.key_path), set_default=False)
        other.rotate("t-acme", KeyPurpose.RANDOMIZED)
        return planned

    monkeypatch.setattr(cli_keys, "_plan_rotation", plan_then_rotate_elsewhere)

    result = app.run("keys", "rotate", "t-acme", "--purpose", "randomized")

    assert result.exit_code == 1
    assert result.output.startswith(
        "error: tenant 't-acme' already has pending randomized key version 2"
    )
    assert "'sqlalchemy-encrypted keys promote'" in result.output
    assert "--activate-now" in result.output
    assert "promote_pending" not in result.output
    assert "activate_now=True" not in result.output
