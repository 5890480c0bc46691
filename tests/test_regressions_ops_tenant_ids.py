"""Key commands given a mistyped tenant id, or run a second time.

A mistyped id must change nothing and say so: ``keys rotate`` used to give
the unknown tenant brand-new keys, and ``keys shred`` reported success
while the real tenant stayed readable. A repeated retire or shred is a
no-op that succeeds, a failing tenant in a list rotates none of them, and
``keys rotate --all-tenants`` run again after an interruption finishes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sqlalchemy_encrypted import KeyPurpose

from .ops_cli_support import CliApp, make_cli_app


@pytest.fixture
def app(tmp_path: Path) -> Iterator[CliApp]:
    app = make_cli_app(tmp_path)
    yield app
    app.engine.dispose()


def test_rotate_unknown_tenant_creates_nothing(app: CliApp) -> None:
    result = app.run("keys", "rotate", "t-acme", "t-acmee")

    assert result.exit_code == 1
    assert result.output.startswith("error: tenant 't-acmee' has no keys")
    assert "keys list" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert app.keyring().list_keys("t-acmee") == []
    assert app.states("t-acme") == {("randomized", 1): "active", ("deterministic", 1): "active"}


def test_rotate_with_pending_tenant_creates_nothing(app: CliApp) -> None:
    assert app.run("keys", "rotate", "t-globex").exit_code == 0

    result = app.run("keys", "rotate", "t-acme", "t-globex")

    assert result.exit_code == 1
    assert "tenant 't-globex' already has pending" in result.output
    assert "keys promote" in result.output
    assert "activate_now" not in result.output
    assert app.states("t-acme") == {("randomized", 1): "active", ("deterministic", 1): "active"}


def test_rotate_same_tenant_twice_in_one_command(app: CliApp) -> None:
    result = app.run("keys", "rotate", "t-acme", "t-acme")

    assert result.exit_code == 0, result.output
    assert sorted(app.states("t-acme")) == [
        ("deterministic", 1),
        ("deterministic", 2),
        ("randomized", 1),
        ("randomized", 2),
    ]


def test_rotate_shredded_tenant_is_refused(app: CliApp) -> None:
    assert app.run("keys", "shred", "t-globex", "--yes").exit_code == 0

    result = app.run("keys", "rotate", "t-acme", "t-globex")

    assert result.exit_code == 1
    assert "tenant 't-globex' were destroyed" in result.output
    assert ("randomized", 2) not in app.states("t-acme")


def test_shred_unknown_tenant_is_an_error(app: CliApp) -> None:
    confirmed = app.run("keys", "shred", "t-acmee", "--yes")

    assert confirmed.exit_code == 1
    assert confirmed.output.startswith("error: tenant 't-acmee' has no keys")
    asked = app.run("keys", "shred", "t-acmee", input="t-acmee\n")
    assert asked.exit_code == 1
    assert "Type the tenant id" not in asked.output
    assert set(app.states("t-acme").values()) == {"active"}


def test_shred_again_reports_already_destroyed(app: CliApp) -> None:
    assert app.run("keys", "shred", "t-acme", "--yes").exit_code == 0

    again = app.run("keys", "shred", "t-acme")

    assert again.exit_code == 0, again.output
    assert again.output == "tenant 't-acme': every key was already destroyed\n"


def test_retire_again_succeeds(app: CliApp) -> None:
    assert app.run("keys", "rotate", "t-acme", "--activate-now").exit_code == 0
    assert app.run("reencrypt").exit_code == 0
    assert app.run("keys", "retire", "t-acme", "1", "--min-inactive", "0").exit_code == 0

    again = app.run("keys", "retire", "t-acme", "1", "--min-inactive", "0")

    assert again.exit_code == 0, again.output
    assert again.output == "tenant 't-acme': key version 1 is already retired\n"


def test_retire_destroyed_version_is_a_key_error(app: CliApp) -> None:
    app.keyring().provision("t-initech")
    assert app.run("keys", "shred", "t-initech", "--yes").exit_code == 0

    result = app.run("keys", "retire", "t-initech", "1")

    # Status 3 means a missing or invalid --url, --kms or --models.
    assert result.exit_code == 1
    assert "tenant 't-initech' were destroyed (crypto-shredded)" in result.output
    assert "no key version is left to retire" in result.output


def test_rotate_all_tenants_after_interruption(app: CliApp) -> None:
    """A run of ``--all-tenants`` stopped after one tenant's randomized key
    finishes when run again, skipping the version already pending."""
    app.keyring().rotate("t-acme", KeyPurpose.RANDOMIZED)

    result = app.run("keys", "rotate", "--all-tenants")

    assert result.exit_code == 0, result.output
    assert "tenant 't-acme': randomized key version 2 is already pending; skipped" in result.stderr
    assert app.states("t-acme") == {
        ("randomized", 1): "active",
        ("randomized", 2): "pending",
        ("deterministic", 1): "active",
        ("deterministic", 2): "pending",
    }
    assert app.states("t-globex")[("randomized", 2)] == "pending"
    assert app.states("t-globex")[("deterministic", 2)] == "pending"
