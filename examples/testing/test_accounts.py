"""An application's tests, written with the sqlalchemy-encrypted pytest plugin."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from app_models import Account
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import StoredKeyDestroyedError, tenant_scope
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.pytest_plugin import assert_encrypted_at_rest, stored_values
from sqlalchemy_encrypted.testing import InMemoryKeyring


def add_account(engine: sa.Engine, tenant: str, holder: str, email: str) -> int:
    with Session(engine) as session:
        account = Account(tenant_id=tenant, holder=holder, email=email)
        session.add(account)
        session.commit()
        return account.id


def test_lookup_by_email(encryption_keyring: InMemoryKeyring, engine: sa.Engine) -> None:
    add_account(engine, "acme", "Rhea Solberg", "rhea@example.test")

    with tenant_scope("acme"), Session(engine) as session:
        query = sa.select(Account).where(Account.email == "rhea@example.test")
        found = session.scalars(query).one()

    assert found.holder == "Rhea Solberg"


def test_values_encrypted_at_rest(encryption_keyring: InMemoryKeyring, engine: sa.Engine) -> None:
    add_account(engine, "acme", "Rhea Solberg", "rhea@example.test")

    with engine.connect() as connection:
        assert_encrypted_at_rest(connection, Account.holder, ["Rhea Solberg"])
        assert_encrypted_at_rest(connection, Account.email, ["rhea@example.test"])
        assert len(stored_values(connection, Account.holder)) == 1


def test_shredded_tenant_unreadable(
    encryption_keyring: InMemoryKeyring, engine: sa.Engine
) -> None:
    account_id = add_account(engine, "acme", "Rhea Solberg", "rhea@example.test")

    encryption_keyring.shred("acme")

    with Session(engine) as session, pytest.raises(StoredKeyDestroyedError):
        session.get(Account, account_id)


def test_rotation_with_real_keyring(encryption_local_kms: LocalKms, engine: sa.Engine) -> None:
    keyring = Keyring(engine, encryption_local_kms, active_key_ttl=0)
    keyring.create_table()
    add_account(engine, "acme", "Rhea Solberg", "rhea@example.test")

    keyring.rotate("acme", activate_now=True)
    add_account(engine, "acme", "Jonas Feld", "jonas@example.test")

    with engine.connect() as connection:
        headers = assert_encrypted_at_rest(connection, Account.holder, ["Rhea", "Jonas"])
    assert [header.key_version for header in headers] == [1, 2]
