"""The pytest plugin for applications, and the example test suite that uses it."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted, tenant_scope
from sqlalchemy_encrypted.envelope import Algorithm, EnvelopeHeader
from sqlalchemy_encrypted.pytest_plugin import assert_encrypted_at_rest, stored_values
from sqlalchemy_encrypted.testing import InMemoryKeyring

ROOT = Path(__file__).resolve().parent.parent


def make_table(engine: sa.Engine) -> sa.Table:
    metadata = sa.MetaData()
    table = sa.Table(
        "secrets",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("secret", Encrypted(sa.String(100))),
        sa.Column("token", DeterministicEncrypted(sa.String(100), storage="base64")),
    )
    metadata.create_all(engine)
    return table


def test_example_suite_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/testing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


def test_assert_accepts_envelopes(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    table = make_table(engine)
    with tenant_scope("acme"), engine.begin() as connection:
        connection.execute(
            sa.insert(table),
            [{"id": 1, "secret": "kept", "token": "tok"}, {"id": 2, "secret": None, "token": None}],
        )

    with engine.connect() as connection:
        secrets = assert_encrypted_at_rest(connection, table.c.secret, ["kept"])
        tokens = assert_encrypted_at_rest(connection, table.c.token, ["tok"])
        raw_tokens = stored_values(connection, table.c.token)

    assert [header.algorithm for header in secrets] == [Algorithm.AES_256_GCM]
    assert [header.algorithm for header in tokens] == [Algorithm.AES_256_SIV]
    assert isinstance(raw_tokens[0], str)
    assert raw_tokens[1] is None


def test_assert_rejects_plaintext_value(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    table = make_table(engine)
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO secrets (id, secret) VALUES (1, :value)"),
            {"value": b"hunter2 in clear"},
        )

    with engine.connect() as connection, pytest.raises(AssertionError) as raised:
        assert_encrypted_at_rest(connection, table.c.secret)

    assert "row 0" in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_assert_finds_plaintext_inside(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    table = make_table(engine)
    header = EnvelopeHeader(
        algorithm=Algorithm.AES_256_GCM, value_tag=1, key_id=uuid.uuid4(), key_version=1
    ).pack()
    forged = header + bytes(12) + b"hunter2 in clear" + bytes(16)
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO secrets (id, secret) VALUES (1, :value)"), {"value": forged}
        )

    with engine.connect() as connection, pytest.raises(AssertionError) as raised:
        assert_encrypted_at_rest(connection, table.c.secret, ["hunter2"])

    assert "plaintext number 0" in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_assert_rejects_wrong_algorithm(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    table = make_table(engine)
    header = EnvelopeHeader(
        algorithm=Algorithm.AES_256_SIV, value_tag=1, key_id=uuid.uuid4(), key_version=1
    ).pack()
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO secrets (id, secret) VALUES (1, :value)"),
            {"value": header + bytes(32)},
        )

    with engine.connect() as connection, pytest.raises(AssertionError, match="AES_256_SIV"):
        assert_encrypted_at_rest(connection, table.c.secret)


def test_helpers_reject_plain_columns(engine: sa.Engine) -> None:
    table = make_table(engine)

    with engine.connect() as connection, pytest.raises(TypeError, match="'id'"):
        stored_values(connection, table.c.id)


PLUGIN_ISOLATION = """
import sqlalchemy_encrypted as se
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.testing import InMemoryKeyring
import sqlalchemy as sa

pytest_plugins = ["sqlalchemy_encrypted.pytest_plugin"]


def test_memory_keyring_is_default(encryption_keyring):
    assert se.get_default_key_provider() is encryption_keyring
    se.set_default_tenant("acme")


def test_local_kms_keyring_is_default(encryption_local_kms, tmp_path):
    keyring = Keyring(sa.create_engine(f"sqlite:///{tmp_path}/k.db"), encryption_local_kms)
    assert se.get_default_key_provider() is keyring
    assert encryption_local_kms.kek_id.startswith("local:test:")


def test_nothing_leaked():
    from sqlalchemy_encrypted import keys, tenancy
    assert keys._default_provider is None
    assert tenancy.get_default_tenant() is None
"""


def test_plugin_fixtures_restore_defaults(tmp_path: Path) -> None:
    (tmp_path / "test_isolation.py").write_text(PLUGIN_ISOLATION)

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
