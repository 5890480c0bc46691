"""alembic_ext.op: the typed module matches the registered operations and runs them."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.operations import Operations

import alembic_ext.op
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .alembic_env import AlembicEnv

OPERATIONS = [
    "encrypt_column",
    "decrypt_column",
    "reencrypt_column",
    "create_keyring_table",
    "drop_keyring_table",
]


@pytest.mark.parametrize("name", OPERATIONS)
def test_typed_function_matches_operation(name: str) -> None:
    typed = inspect.signature(getattr(alembic_ext.op, name))
    registered = inspect.signature(getattr(Operations, name))

    assert list(typed.parameters.values()) == list(registered.parameters.values())[1:]
    assert typed.return_annotation == registered.return_annotation


def test_forwards_alembic_operations() -> None:
    assert alembic_ext.op.add_column.__name__ == "add_column"
    with pytest.raises(AttributeError):
        alembic_ext.op.no_such_operation  # noqa: B018


def test_typed_op_in_migration(tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision(
        "r1",
        None,
        """
        from alembic_ext import op as typed_op
        typed_op.create_keyring_table()
        typed_op.create_table(
            "notes",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("body", sa.String(50)),
        )
        typed_op.execute("INSERT INTO notes (id, body) VALUES (1, 'hello')")
        report = typed_op.encrypt_column(
            "notes", "body", type_=sqlalchemy_encrypted.Encrypted(sa.String(50)), tenant_id="t1"
        )
        op.get_context().config.attributes["reports"].append(report)
        """,
    )

    env.upgrade("head")

    (report,) = env.reports
    assert report.converted == 1
    assert "encryption_keys" in sa.inspect(engine).get_table_names()
