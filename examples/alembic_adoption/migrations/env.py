"""Alembic environment: the database and the keyring both come from the environment.

``SQLALCHEMY_ENCRYPTED_URL`` is the database URL and
``SQLALCHEMY_ENCRYPTED_KMS`` the KMS holding the KEK
(``local:///abs/path/master.key`` or ``aws-kms://<key ARN>?region=...``),
the same variables the ``sqlalchemy-encrypted`` command line reads. The
keyring built here is the default key provider while the migrations run,
so ``op.encrypt_column()`` seals each value under its row's tenant key.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

import alembic_ext  # noqa: F401  (registers op.encrypt_column and the other operations)
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import kms_from_uri

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def required_setting(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"set {name}; see migrations/env.py of this example")
    return value


def run_migrations_online() -> None:
    engine = sa.create_engine(required_setting("SQLALCHEMY_ENCRYPTED_URL"))
    Keyring(engine, kms_from_uri(required_setting("SQLALCHEMY_ENCRYPTED_KMS")))
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    # Encrypting values needs the keys, so there is no SQL script mode.
    raise SystemExit("this example runs online only: drop --sql")
run_migrations_online()
