"""alembic revision --autogenerate with encrypted columns: rendering, imports, secrets, no-diff."""

from __future__ import annotations

import ast
import base64
import py_compile
from pathlib import Path
from typing import Any

import boto3
import pytest
import sqlalchemy as sa
from alembic.autogenerate import render_python_code
from alembic.migration import MigrationContext
from alembic.operations import ops as alembic_ops
from sqlalchemy.orm import Session

import alembic_ext
from sqlalchemy_encrypted import (
    DeterministicEncrypted,
    Encrypted,
    KeyPurpose,
    set_default_key_provider,
    tenant_scope,
)
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import AwsKms, LocalKms
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .alembic_env import AlembicEnv


def persons_metadata(*, encrypted: bool = True, extra: bool = False) -> sa.MetaData:
    """The application's models: persons with an encrypted name and email."""
    metadata = sa.MetaData()
    name_type: Any = Encrypted(sa.String(100)) if encrypted else sa.String(100)
    email_type: Any = DeterministicEncrypted(sa.String(254)) if encrypted else sa.String(254)
    columns = [
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.String(40)),
        sa.Column("name", name_type),
        sa.Column("email", email_type, index=True),
    ]
    if extra:
        columns.append(sa.Column("ssn", Encrypted(sa.String(11), context="persons.ssn")))
        columns.append(sa.Column("notes", Encrypted(sa.Text, storage="base64")))
    sa.Table("persons", metadata, *columns, info={"tenant_column": "tenant_id"})
    return metadata


def function_bodies(path: Path) -> dict[str, list[str]]:
    """Return the statements of upgrade() and downgrade(), without docstrings, as source."""
    tree = ast.parse(path.read_text())
    bodies = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in ("upgrade", "downgrade"):
            statements = [
                s
                for s in node.body
                if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
            ]
            bodies[node.name] = [ast.unparse(s) for s in statements]
    return bodies


@pytest.fixture
def env(tmp_path: Path, engine: sa.Engine) -> AlembicEnv:
    alembic_env = AlembicEnv(tmp_path / "migrations", engine)
    alembic_env.write_revision("k1", None, "op.create_keyring_table()", "op.drop_keyring_table()")
    return alembic_env


def test_new_table_renders_importable_file(env: AlembicEnv, engine: sa.Engine) -> None:
    env.upgrade("k1")
    env.target_metadata = persons_metadata()

    path = env.autogenerate("a1")

    source = path.read_text()
    py_compile.compile(str(path), doraise=True)
    assert "import sqlalchemy_encrypted" in source
    assert "sqlalchemy_encrypted.Encrypted(sa.String(length=100))" in source
    assert "sqlalchemy_encrypted.DeterministicEncrypted(sa.String(length=254))" in source
    assert "sqlalchemy_encrypted.types" not in source
    assert "drop_table('encryption_keys')" not in source
    # The upgrade needs no key provider at all: creating columns uses no key.
    set_default_key_provider(None)
    env.upgrade("head")
    columns = {c["name"]: c["type"] for c in sa.inspect(engine).get_columns("persons")}
    assert isinstance(columns["name"], sa.LargeBinary)
    assert isinstance(columns["email"], sa.LargeBinary)


def test_old_keyring_table_is_kept(env: AlembicEnv, engine: sa.Engine) -> None:
    # A keyring table made before the usage counter column existed.
    env.upgrade("k1")
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE encryption_keys DROP COLUMN sealed_count")
    env.target_metadata = persons_metadata()

    source = env.autogenerate("a1").read_text()

    assert "drop_table('encryption_keys')" not in source
    assert "encryption_keys" not in source


def test_matching_models_give_empty_revision(env: AlembicEnv, engine: sa.Engine) -> None:
    env.upgrade("k1")
    env.target_metadata = persons_metadata()
    env.autogenerate("a1")
    env.upgrade("head")

    path = env.autogenerate("a2")

    assert function_bodies(path) == {"upgrade": ["pass"], "downgrade": ["pass"]}


def test_added_encrypted_column_renders_add_column(env: AlembicEnv, engine: sa.Engine) -> None:
    env.upgrade("k1")
    env.target_metadata = persons_metadata()
    env.autogenerate("a1")
    env.upgrade("head")
    env.target_metadata = persons_metadata(extra=True)

    path = env.autogenerate("a2")

    py_compile.compile(str(path), doraise=True)
    bodies = function_bodies(path)
    assert bodies["upgrade"] == [
        "op.add_column('persons', sa.Column('ssn', sqlalchemy_encrypted.Encrypted("
        "sa.String(length=11), context='persons.ssn'), nullable=True))",
        "op.add_column('persons', sa.Column('notes', sqlalchemy_encrypted.Encrypted("
        "sa.Text(), storage='base64'), nullable=True))",
    ]
    assert "import sqlalchemy_encrypted" in path.read_text()
    set_default_key_provider(None)
    env.upgrade("head")
    assert "ssn" in [c["name"] for c in sa.inspect(engine).get_columns("persons")]
    assert function_bodies(env.autogenerate("a3")) == {"upgrade": ["pass"], "downgrade": ["pass"]}


def test_no_secrets_in_generated_files(
    env: AlembicEnv, engine: sa.Engine, tmp_path: Path, moto_server: str
) -> None:
    client = boto3.client(
        "kms",
        region_name="us-east-1",
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    arn = client.create_key(Description="migration test KEK")["KeyMetadata"]["Arn"]
    passphrase = "correct horse battery staple"
    local = LocalKms.from_passphrase(passphrase, salt=b"s" * 16, kek="kek-local-secret")
    env.upgrade("k1")
    keyring = Keyring(engine, AwsKms(arn, client=client), previous_kms=[local])
    tenant = "tenant-secret-7f3a"
    dek = keyring.active_key(tenant, KeyPurpose.RANDOMIZED)
    env.target_metadata = persons_metadata()
    first = env.autogenerate("a1")
    env.upgrade("head")
    keyring.rotate(tenant, activate_now=True)
    second = env.autogenerate("a2")

    with engine.connect() as conn:
        wrapped = conn.exec_driver_sql("SELECT wrapped_dek FROM encryption_keys").scalars().all()
    secrets = [arn, arn.rsplit("/", 1)[-1], passphrase, "kek-local-secret", tenant, str(dek.key_id)]
    for blob in wrapped:
        data = bytes(blob)
        secrets += [data.hex(), base64.b64encode(data).decode()]
    for path in (first, second):
        text = path.read_text()
        for secret in secrets:
            assert secret not in text, f"{path.name} contains a configured secret"
    assert function_bodies(second) == {"upgrade": ["pass"], "downgrade": ["pass"]}


def test_key_changes_give_empty_revision(
    env: AlembicEnv, engine: sa.Engine, local_kms: LocalKms, tmp_path: Path
) -> None:
    env.upgrade("k1")
    env.target_metadata = persons_metadata()
    env.autogenerate("a1")
    env.upgrade("head")
    keyring = Keyring(engine, local_kms)
    keyring.active_key("t1", KeyPurpose.RANDOMIZED)

    keyring.rotate("t1", activate_now=True)
    LocalKms.add_kek(tmp_path / "master.key", "kek-b")
    keyring.rewrap(LocalKms(tmp_path / "master.key", kek="kek-b"))

    path = env.autogenerate("a2")
    assert function_bodies(path) == {"upgrade": ["pass"], "downgrade": ["pass"]}


PLAINTEXT_PERSONS = """
op.create_table(
    "persons",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.String(40)),
    sa.Column("name", sa.String(100)),
    sa.Column("email", sa.String(254)),
)
op.create_index("ix_persons_email", "persons", ["email"])
"""


@pytest.mark.parametrize("batch", [False, True], ids=["plain", "render_as_batch"])
def test_plaintext_to_encrypted_renders_encrypt_column(
    env: AlembicEnv, engine: sa.Engine, keyring: InMemoryKeyring, batch: bool
) -> None:
    env.write_revision("p1", "k1", PLAINTEXT_PERSONS)
    env.upgrade("p1")
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO persons VALUES (:id, :t, :name, :email)"),
            [
                {"id": i, "t": f"t{i % 2}", "name": f"N{i}", "email": f"e{i}@example.test"}
                for i in range(1, 11)
            ],
        )
    env.configure_options = {"render_as_batch": batch}
    env.target_metadata = persons_metadata()

    path = env.autogenerate("a1")

    py_compile.compile(str(path), doraise=True)
    text = path.read_text()
    assert "import alembic_ext" in text
    assert "alter_column" not in text
    varchar = "sa.VARCHAR(length=100)"
    assert function_bodies(path) == {
        "upgrade": [
            "op.encrypt_column('persons', 'name', type_=sqlalchemy_encrypted.Encrypted("
            f"sa.String(length=100)), existing_type={varchar}, tenant_column='tenant_id')",
            "op.encrypt_column('persons', 'email', type_=sqlalchemy_encrypted."
            "DeterministicEncrypted(sa.String(length=254)), existing_type=sa.VARCHAR("
            "length=254), tenant_column='tenant_id')",
        ],
        "downgrade": [
            "op.decrypt_column('persons', 'email', type_=sa.VARCHAR(length=254), from_type="
            "sqlalchemy_encrypted.DeterministicEncrypted(sa.String(length=254)), "
            "tenant_column='tenant_id')",
            f"op.decrypt_column('persons', 'name', type_={varchar}, from_type="
            "sqlalchemy_encrypted.Encrypted(sa.String(length=100)), tenant_column='tenant_id')",
        ],
    }

    env.upgrade("head")
    table = env.target_metadata.tables["persons"]
    with Session(engine) as session, tenant_scope("t1"):
        row = session.execute(
            sa.select(table.c.name).where(table.c.email == "e3@example.test")
        ).one()
    assert row.name == "N3"
    assert function_bodies(env.autogenerate("a2")) == {"upgrade": ["pass"], "downgrade": ["pass"]}

    env.downgrade("p1")
    with engine.connect() as conn:
        names = conn.exec_driver_sql("SELECT name FROM persons ORDER BY id").scalars().all()
    assert names == [f"N{i}" for i in range(1, 11)]


def test_user_render_item_is_chained(env: AlembicEnv, engine: sa.Engine) -> None:
    calls: list[str] = []

    def own_hook(type_: str, obj: Any, autogen_context: Any) -> Any:
        calls.append(type_)
        if type_ == "type" and isinstance(obj, sa.Integer):
            return "sa.BigInteger()"
        return False

    env.upgrade("k1")
    env.configure_options = {"render_item": own_hook}
    env.target_metadata = persons_metadata()

    text = env.autogenerate("a1").read_text()

    assert "sa.Column('id', sa.BigInteger()" in text
    assert "sqlalchemy_encrypted.Encrypted(sa.String(length=100))" in text
    assert "type" in calls


def test_render_python_code_with_render_item() -> None:
    table = persons_metadata(extra=True).tables["persons"]
    upgrade_ops = alembic_ops.UpgradeOps(ops=[alembic_ops.CreateTableOp.from_table(table)])

    code = render_python_code(upgrade_ops, render_item=alembic_ext.render_item)

    assert "sqlalchemy_encrypted.Encrypted(sa.String(length=11), context='persons.ssn')" in code
    assert "sqlalchemy_encrypted.Encrypted(sa.Text(), storage='base64')" in code


def test_compare_type_hook() -> None:
    context = MigrationContext.configure(dialect_name="postgresql")
    encrypted = Encrypted(sa.String(100))
    base64_type = Encrypted(sa.String(100), storage="base64")
    column = sa.Column("name", sa.String(100))
    hook = alembic_ext.compare_type

    assert hook(context, column, column, sa.LargeBinary(), encrypted) is False
    assert hook(context, column, column, sa.VARCHAR(100), encrypted) is True
    assert hook(context, column, column, sa.INTEGER(), encrypted) is True
    assert hook(context, column, column, sa.TEXT(), base64_type) is False
    assert hook(context, column, column, sa.LargeBinary(), base64_type) is None
    assert hook(context, column, column, sa.VARCHAR(100), sa.String(200)) is None


def test_render_keeps_options_drops_keyring() -> None:
    keyring = InMemoryKeyring()
    table = sa.Table(
        "accounts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("legacy", Encrypted(sa.String(30), allow_plaintext_reads=True)),
        sa.Column("own_keys", DeterministicEncrypted(sa.String(30), keyring=keyring)),
    )
    upgrade_ops = alembic_ops.UpgradeOps(ops=[alembic_ops.CreateTableOp.from_table(table)])

    code = render_python_code(upgrade_ops, render_item=alembic_ext.render_item)

    assert "Encrypted(sa.String(length=30), allow_plaintext_reads=True)" in code
    assert "DeterministicEncrypted(sa.String(length=30)), nullable=True)" in code
    assert "keyring" not in code
    assert "InMemoryKeyring" not in code
