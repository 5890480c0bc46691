"""Configuration mistakes on the command line: exit status 3 and one line.

An unparsable ``--url``, a missing database driver, a key file that is a
directory or binary, or a key file path in a missing folder used to exit
with status 1 and a Python exception name. A KMS failure in ``reencrypt``
printed the error twice, once as a log record.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from sqlalchemy_encrypted.cli import cli
from sqlalchemy_encrypted.kms import LocalKms

from .ops_cli_support import MODELS, CliApp, make_cli_app


@pytest.fixture
def app(tmp_path: Path) -> Iterator[CliApp]:
    app = make_cli_app(tmp_path)
    yield app
    app.engine.dispose()


def _assert_one_line_error(output: str) -> None:
    assert output.startswith("error: ")
    assert len(output.strip().splitlines()) == 1
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "url", ["not a url", "nosuchdialect://db.internal/app", "sqlite+nosuchdriver:///app.db"]
)
def test_invalid_url_is_configuration_error(url: str) -> None:
    result = CliRunner().invoke(cli, ["--url", url, "keys", "list"], env={})

    assert result.exit_code == 3
    _assert_one_line_error(result.output)
    assert result.output.startswith("error: invalid --url: ")


def test_missing_driver_is_configuration_error() -> None:
    if importlib.util.find_spec("pymssql") is not None:
        pytest.skip("pymssql is installed")
    url = "mssql+pymssql://app:hunter2-password@127.0.0.1/app"

    result = CliRunner().invoke(cli, ["--url", url, "keys", "list"], env={})

    assert result.exit_code == 3
    _assert_one_line_error(result.output)
    assert "not installed" in result.output
    assert "pymssql" in result.output
    assert "hunter2" not in result.output


def test_key_file_that_is_a_directory(app: CliApp, tmp_path: Path) -> None:
    folder = tmp_path / "keys.d"
    folder.mkdir(mode=0o700)

    result = app.run("keys", "rewrap", SQLALCHEMY_ENCRYPTED_KMS=f"local://{folder}")

    assert result.exit_code == 3
    _assert_one_line_error(result.output)
    assert "is a directory" in result.output


def test_binary_key_file(app: CliApp, tmp_path: Path) -> None:
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xe8\x00\xff" * 20)
    binary.chmod(0o600)

    result = app.run("keys", "rewrap", SQLALCHEMY_ENCRYPTED_KMS=f"local://{binary}")

    assert result.exit_code == 3
    _assert_one_line_error(result.output)
    assert "is not a local KMS key file" in result.output


def test_init_key_file_in_missing_folder(tmp_path: Path) -> None:
    key_path = tmp_path / "absent" / "master.key"
    env = {"SQLALCHEMY_ENCRYPTED_URL": f"sqlite:///{tmp_path}/app.db"}

    result = CliRunner().invoke(cli, ["--kms", f"local://{key_path}", "init"], env=env)

    assert result.exit_code == 3
    _assert_one_line_error(result.output)
    assert f"could not create key file {key_path}" in result.output


def test_status_without_keyring_table_or_kms(tmp_path: Path) -> None:
    """``status`` without --kms reads the keyring table directly; a missing
    table is named, as it is with --kms."""
    env = {
        "SQLALCHEMY_ENCRYPTED_URL": f"sqlite:///{tmp_path}/empty.db",
        "SQLALCHEMY_ENCRYPTED_MODELS": MODELS,
    }

    result = CliRunner().invoke(cli, ["status"], env=env)

    assert result.exit_code == 3
    _assert_one_line_error(result.output)
    assert "keyring table encryption_keys does not exist" in result.output
    assert "sqlalchemy-encrypted init" in result.output


def test_kms_failure_in_reencrypt_prints_one_line(app: CliApp, tmp_path: Path) -> None:
    assert app.run("keys", "rotate", "t-acme", "--activate-now").exit_code == 0
    other = tmp_path / "other-environment.key"
    LocalKms.create(other)

    result = app.run("reencrypt", SQLALCHEMY_ENCRYPTED_KMS=f"local://{other}")

    assert result.exit_code == 4
    _assert_one_line_error(result.output)
    assert "local KEK" in result.output
    verbose = app.run("--verbose", "reencrypt", SQLALCHEMY_ENCRYPTED_KMS=f"local://{other}")
    assert verbose.exit_code == 4
    assert "ERROR sqlalchemy_encrypted.rotation" in verbose.output
