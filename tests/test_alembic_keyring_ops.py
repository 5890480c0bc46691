"""op.create_keyring_table, op.drop_keyring_table and op.reencrypt_column with the real keyring."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import KeyPurpose, MigrationError, tenant_scope
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.rotation import census

from .alembic_env import AlembicEnv
from .models import Person
from .test_alembic_encrypt_column import CREATE_PERSONS, ENCRYPT_PERSONS, plain_rows, seed

REENCRYPT_PERSONS = """
result = op.reencrypt_column(
    "persons", "name",
    type_=sqlalchemy_encrypted.Encrypted(sa.String(100)),
    tenant_column="tenant_id",
    batch_size=4,
)
op.get_context().config.attributes["reports"].append(result)
op.reencrypt_column(
    "persons", "email",
    type_=sqlalchemy_encrypted.DeterministicEncrypted(sa.String(254)),
    tenant_column="tenant_id",
    batch_size=4,
)
"""


@pytest.fixture
def env(tmp_path: Path, engine: sa.Engine) -> AlembicEnv:
    alembic_env = AlembicEnv(tmp_path / "migrations", engine)
    alembic_env.write_revision("k1", None, "op.create_keyring_table()", "op.drop_keyring_table()")
    return alembic_env


def test_create_keyring_table(env: AlembicEnv, engine: sa.Engine, local_kms: LocalKms) -> None:
    env.upgrade("k1")

    inspector = sa.inspect(engine)
    assert "encryption_keys" in inspector.get_table_names()
    index_names = {index["name"] for index in inspector.get_indexes("encryption_keys")}
    assert {"uq_encryption_keys_one_active", "ix_encryption_keys_tenant_state"} <= index_names
    keyring = Keyring(engine, local_kms, set_default=False)
    key = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    assert keyring.key_by_id(key.key_id).version == 1


def test_drop_keyring_table(env: AlembicEnv, engine: sa.Engine) -> None:
    env.upgrade("k1")

    env.downgrade("base")

    assert "encryption_keys" not in sa.inspect(engine).get_table_names()


def test_keyring_table_custom_name(tmp_path: Path, engine: sa.Engine, local_kms: LocalKms) -> None:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("k1", None, 'op.create_keyring_table("tenant_keys")')
    env.upgrade("k1")

    keyring = Keyring(engine, local_kms, table_name="tenant_keys", set_default=False)
    keyring.active_key("t-acme", KeyPurpose.DETERMINISTIC)
    assert len(keyring.list_keys()) == 1


def test_keyring_table_offline_sql(env: AlembicEnv) -> None:
    env.upgrade("k1", sql=True)

    sql = env.sql_output.getvalue()
    assert "CREATE TABLE encryption_keys" in sql
    assert "CREATE UNIQUE INDEX uq_encryption_keys_one_active" in sql
    assert "WHERE state = 'active'" in sql


def test_reencrypt_column_moves_to_active_version(
    env: AlembicEnv, engine: sa.Engine, local_kms: LocalKms
) -> None:
    env.write_revision("r1", "k1", CREATE_PERSONS)
    env.write_revision("r2", "r1", ENCRYPT_PERSONS)
    env.write_revision("r3", "r2", REENCRYPT_PERSONS)
    env.upgrade("r1")
    rows = plain_rows(20)
    seed(engine, rows)
    keyring = Keyring(engine, local_kms)
    env.upgrade("r2")
    keyring.rotate("t-acme", activate_now=True)
    before = census(engine, Person.__table__)
    assert before.stale() == {"persons.name": 10, "persons.email": 9}

    env.upgrade("r3")

    result = env.reports[-1]
    assert result.status == "succeeded"
    assert result.values_reencrypted == 10
    assert census(engine, Person.__table__).stale() == {}
    with Session(engine) as session:
        people = session.scalars(sa.select(Person).order_by(Person.id)).all()
        assert [(p.name, p.email) for p in people] == [(r["name"], r["email"]) for r in rows]
        with tenant_scope("t-acme"):
            query = sa.select(Person.id).where(Person.email == "user5@example.test")
            assert session.scalars(query).one() == 5


def test_reencrypt_column_offline_fails(env: AlembicEnv) -> None:
    env.write_revision("r1", "k1", CREATE_PERSONS)
    env.write_revision("r2", "r1", REENCRYPT_PERSONS)

    with pytest.raises(MigrationError, match=r"op.reencrypt_column\(\) cannot run in offline"):
        env.upgrade("k1:r2", sql=True)
