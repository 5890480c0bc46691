"""Upgrade, downgrade, upgrade: values survive each step, and a stale model fails clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import DecryptionError, tenant_scope
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .alembic_env import AlembicEnv
from .models import Person
from .test_alembic_encrypt_column import CREATE_PERSONS, DECRYPT_PERSONS, ENCRYPT_PERSONS

EMAILS = [f"person{i:03d}@example.test" for i in range(1, 101)]


def _tenant(row_id: int) -> str:
    return "t-acme" if row_id % 2 else "t-globex"


def _model_emails(engine: sa.Engine) -> list[str | None]:
    with Session(engine) as session:
        return list(session.scalars(sa.select(Person.email).order_by(Person.id)))


def _raw_emails(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT email FROM persons ORDER BY id").scalars())


def _lookups_work(engine: sa.Engine) -> None:
    with Session(engine) as session:
        for row_id in (1, 2, 57, 100):
            with tenant_scope(_tenant(row_id)):
                query = sa.select(Person.id).where(Person.email == EMAILS[row_id - 1])
                assert session.scalars(query).one() == row_id


def test_upgrade_downgrade_cycle(
    tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("r1", None, CREATE_PERSONS, 'op.drop_table("persons")')
    env.write_revision("r2", "r1", ENCRYPT_PERSONS, DECRYPT_PERSONS)
    env.upgrade("head")
    with Session(engine) as session:
        for row_id, email in enumerate(EMAILS, start=1):
            session.add(
                Person(id=row_id, tenant_id=_tenant(row_id), name=f"Name {row_id}", email=email)
            )
        session.commit()

    env.downgrade("r1")

    assert _raw_emails(engine) == EMAILS
    (email_column,) = [c for c in sa.inspect(engine).get_columns("persons") if c["name"] == "email"]
    assert isinstance(email_column["type"], sa.String)
    with Session(engine) as session, pytest.raises(DecryptionError) as raised:
        session.scalars(sa.select(Person).order_by(Person.id)).all()
    message = str(raised.value)
    assert "looks like plaintext" in message
    assert "migration state" in message

    env.upgrade("head")
    assert _model_emails(engine) == EMAILS
    _lookups_work(engine)

    env.downgrade("r1")
    assert _raw_emails(engine) == EMAILS

    env.upgrade("head")
    assert _model_emails(engine) == EMAILS
    _lookups_work(engine)
