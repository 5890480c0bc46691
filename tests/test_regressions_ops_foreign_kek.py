"""Rotating and re-encrypting when the configured KMS lacks the tenant's KEK.

A keyring configured with a key file from another environment used to
rotate a tenant anyway: the new version was wrapped by that foreign KEK,
so once it became active the application could no longer write for the
tenant. The command line also had no way to name a second KMS, so after
``keys rewrap --tenant T --to-kms URI`` it could not re-encrypt tenant T
together with the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from sqlalchemy_encrypted import ConfigurationError, KeyPurpose
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

from .ops_cli_support import CliApp, make_cli_app


def test_keyring_refuses_rotation_under_foreign_kek(
    engine: sa.Engine, local_kms: LocalKms, tmp_path: Path
) -> None:
    Keyring(engine, local_kms).create_table()
    Keyring(engine, local_kms).provision("t-acme")
    foreign = LocalKms.create(tmp_path / "staging.key", kek="kek-a")
    keyring = Keyring(engine, foreign, active_key_ttl=0)

    with pytest.raises(ConfigurationError) as refused:
        keyring.rotate("t-acme")

    message = str(refused.value)
    assert "tenant 't-acme'" in message
    assert local_kms.kek_id in message
    assert "another environment" in message
    assert [info.version for info in keyring.list_keys("t-acme")] == [1, 1]
    with_previous = Keyring(engine, foreign, previous_kms=[local_kms], active_key_ttl=0)
    created = with_previous.rotate("t-acme", KeyPurpose.RANDOMIZED, activate_now=True)
    assert created[0].kek_id == foreign.kek_id
    assert with_previous.active_key("t-acme", KeyPurpose.RANDOMIZED).version == 2


def test_keyring_refuses_first_key_under_foreign_kek(
    engine: sa.Engine, local_kms: LocalKms, tmp_path: Path
) -> None:
    Keyring(engine, local_kms).create_table()
    Keyring(engine, local_kms).provision("t-acme")
    foreign = LocalKms.create(tmp_path / "staging.key", kek="kek-a")
    keyring = Keyring(engine, foreign, set_default=False)

    with pytest.raises(ConfigurationError) as refused:
        keyring.active_key("t-new", KeyPurpose.RANDOMIZED)

    message = str(refused.value)
    assert "first randomized key of tenant 't-new'" in message
    assert local_kms.kek_id in message
    assert "another environment" in message
    assert keyring.list_keys("t-new") == []
    with pytest.raises(ConfigurationError, match="another environment"):
        keyring.rotate("t-new")
    with_previous = Keyring(engine, foreign, previous_kms=[local_kms], set_default=False)
    assert with_previous.active_key("t-new", KeyPurpose.RANDOMIZED).version == 1


def test_first_key_of_empty_keyring(engine: sa.Engine, local_kms: LocalKms, tmp_path: Path) -> None:
    keyring = Keyring(engine, LocalKms.create(tmp_path / "other.key"), set_default=False)
    keyring.create_table()

    assert keyring.active_key("t-acme", KeyPurpose.RANDOMIZED).version == 1
    assert keyring.active_key("t-globex", KeyPurpose.DETERMINISTIC).version == 1


@pytest.fixture
def app(tmp_path: Path) -> Iterator[CliApp]:
    app = make_cli_app(tmp_path)
    yield app
    app.engine.dispose()


def test_cli_rotate_with_foreign_key_file(app: CliApp, tmp_path: Path) -> None:
    staging = tmp_path / "staging.key"
    LocalKms.create(staging)

    result = app.run("keys", "rotate", "t-acme", SQLALCHEMY_ENCRYPTED_KMS=f"local://{staging}")

    assert result.exit_code == 3
    assert result.output.startswith("error: cannot rotate the randomized keys of tenant 't-acme'")
    assert len(result.output.strip().splitlines()) == 1
    assert app.states("t-acme") == {("randomized", 1): "active", ("deterministic", 1): "active"}


def test_cli_previous_kms_after_tenant_rewrap(app: CliApp, tmp_path: Path) -> None:
    """Move one tenant's DEKs to a new key file, then rotate and re-encrypt
    both tenants in one run with the new file as --kms and the old one as
    --previous-kms."""
    new_key = tmp_path / "new.key"
    LocalKms.create(new_key, kek="next")
    moved = app.run("keys", "rewrap", "--tenant", "t-globex", "--to-kms", f"local://{new_key}")
    assert moved.exit_code == 0, moved.output
    with_new_only = {"SQLALCHEMY_ENCRYPTED_KMS": f"local://{new_key}"}
    nothing_stale = app.run("reencrypt", **with_new_only)
    assert nothing_stale.exit_code == 0, nothing_stale.output  # no DEK is unwrapped

    rotated = app.run(
        "--previous-kms",
        f"local://{app.key_path}",
        "keys",
        "rotate",
        "t-acme",
        "t-globex",
        "--activate-now",
        **with_new_only,
    )
    assert rotated.exit_code == 0, rotated.output
    without_previous = app.run("reencrypt", **with_new_only)
    assert without_previous.exit_code == 4
    assert "--previous-kms" in without_previous.output

    result = app.run(
        "reencrypt",
        **with_new_only,
        SQLALCHEMY_ENCRYPTED_PREVIOUS_KMS=f"local://{app.key_path}",
    )

    assert result.exit_code == 0, result.output
    assert "no value is left under an old key version" in result.output
