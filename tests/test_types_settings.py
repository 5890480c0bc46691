"""Column type settings changed after use, odd key providers, base64 values
returned as bytes, and pickling: the per-value paths must follow each."""

from __future__ import annotations

import base64
import pickle
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from sqlalchemy_encrypted import (
    DecryptionError,
    Encrypted,
    KeyLease,
    KeyPurpose,
    StorageFormatError,
    parse_header,
    tenant_scope,
)
from sqlalchemy_encrypted.testing import InMemoryKeyring

TENANT = "t-acme"


class EmptyIsFalseKeyring(InMemoryKeyring):
    """A provider that is falsy while it contains no keys, as a container would be."""

    def __len__(self) -> int:
        return len(self._by_id)


def _table(metadata: sa.MetaData, **options: Any) -> sa.Table:
    return sa.Table(
        "secrets",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("secret", Encrypted(sa.String(50), **options)),
    )


def _insert(engine: sa.Engine, table: sa.Table, row_id: int, value: str) -> bytes:
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": row_id, "secret": value})
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT secret FROM secrets WHERE id = :id"), {"id": row_id}
        ).scalar_one()
    return bytes(stored)


def _read(engine: sa.Engine, table: sa.Table, row_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(table.c.secret).where(table.c.id == row_id)).scalar_one()


def test_falsy_column_keyring_still_used(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    own = EmptyIsFalseKeyring()
    assert not own
    table = _table(sa.MetaData(), keyring=own)
    table.create(engine)

    with tenant_scope(TENANT):
        stored = _insert(engine, table, 1, "hello")
        assert _read(engine, table, 1) == "hello"

    own_key = own.active_key(TENANT, KeyPurpose.RANDOMIZED)
    assert parse_header(stored).key_id == own_key.key_id
    assert not keyring.decryptable_keys(TENANT, KeyPurpose.RANDOMIZED)


def test_keyring_set_after_use_applies(engine: sa.Engine) -> None:
    first, second = InMemoryKeyring(), InMemoryKeyring()
    table = _table(sa.MetaData(), keyring=first)
    table.create(engine)
    column_type = table.c.secret.type
    assert isinstance(column_type, Encrypted)

    with tenant_scope(TENANT):
        before = _insert(engine, table, 1, "first")
        column_type.keyring = second
        after = _insert(engine, table, 2, "second")
        assert _read(engine, table, 2) == "second"
        with pytest.raises(DecryptionError):
            _read(engine, table, 1)

    assert parse_header(before).key_id == first.active_key(TENANT, KeyPurpose.RANDOMIZED).key_id
    assert parse_header(after).key_id == second.active_key(TENANT, KeyPurpose.RANDOMIZED).key_id


def test_context_set_after_use_applies(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    table = _table(sa.MetaData())
    table.create(engine)
    column_type = table.c.secret.type
    assert isinstance(column_type, Encrypted)

    with tenant_scope(TENANT):
        _insert(engine, table, 1, "old name")
        assert _read(engine, table, 1) == "old name"
        column_type.context = "renamed.secret"
        renamed = _insert(engine, table, 2, "new name")

        assert _read(engine, table, 2) == "new name"
        assert column_type.decrypt(renamed) == "new name"
        # The first value stays bound to the old identity.
        with pytest.raises(DecryptionError):
            _read(engine, table, 1)


def test_base64_value_returned_as_bytes(keyring: InMemoryKeyring) -> None:
    for allow_plaintext_reads in (False, True):
        table = _table(sa.MetaData(), storage="base64", allow_plaintext_reads=allow_plaintext_reads)
        column_type = table.c.secret.type
        assert isinstance(column_type, Encrypted)
        with tenant_scope(TENANT):
            text = column_type.process_bind_param("hello", sa.create_engine("sqlite://").dialect)
            assert isinstance(text, str)
            base64.b64decode(text, validate=True)

            assert column_type.decrypt(text) == "hello"
            assert column_type.decrypt(text.encode()) == "hello"
            assert column_type.decrypt(bytearray(text.encode())) == "hello"
            assert column_type.decrypt(text.encode()) == "hello"


class RenamingKeyring(InMemoryKeyring):
    """Renames a column while the column looks up a key, as another thread could."""

    def __init__(self) -> None:
        super().__init__()
        self.rename: tuple[Encrypted[Any], str] | None = None

    def key_lease(self, key_id: uuid.UUID, expected_tenant: str | None = None) -> KeyLease:
        if self.rename is not None:
            column_type, new_context = self.rename
            self.rename = None
            column_type.context = new_context
        return super().key_lease(key_id, expected_tenant)


def test_identity_change_during_read_keeps_no_plan() -> None:
    provider = RenamingKeyring()
    table = _table(sa.MetaData(), keyring=provider)
    column_type = table.c.secret.type
    assert isinstance(column_type, Encrypted)
    with tenant_scope(TENANT):
        stored = column_type.seal("hello")
        provider.rename = (column_type, "new.col")
        # This read started under the old identity and opens the value.
        assert column_type.decrypt(stored) == "hello"
        # Later reads run under the new identity, so the old AAD must not stay.
        with pytest.raises(DecryptionError):
            column_type.decrypt(stored)


def test_metadata_pickles_without_keyring(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    table = _table(sa.MetaData())
    restored_metadata = pickle.loads(pickle.dumps(table.metadata))
    restored = restored_metadata.tables["secrets"]
    restored_type = restored.c.secret.type
    assert isinstance(restored_type, Encrypted)
    assert restored_type.column_identity == "secrets.secret"
    restored.create(engine)

    with tenant_scope(TENANT):
        stored = _insert(engine, restored, 1, "hello")
        assert _read(engine, restored, 1) == "hello"
        assert table.c.secret.type.decrypt(stored) == "hello"


def test_type_with_own_keyring_refuses_pickling() -> None:
    table = _table(sa.MetaData(), keyring=InMemoryKeyring())
    with pytest.raises(TypeError, match="key material"):
        pickle.dumps(table.metadata)


def test_plaintext_reads_set_after_use_applies(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    table = _table(sa.MetaData())
    table.create(engine)
    column_type = table.c.secret.type
    assert isinstance(column_type, Encrypted)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO secrets (id, secret) VALUES (1, :v)"), {"v": b"legacy"})

    with tenant_scope(TENANT):
        with pytest.raises(StorageFormatError):
            _read(engine, table, 1)
        column_type.allow_plaintext_reads = True
        assert _read(engine, table, 1) == "legacy"
        column_type.allow_plaintext_reads = False
        with pytest.raises(StorageFormatError):
            _read(engine, table, 1)


def test_storage_is_read_only(keyring: InMemoryKeyring) -> None:
    column_type = _table(sa.MetaData()).c.secret.type
    with pytest.raises(AttributeError):
        column_type.storage = "base64"  # type: ignore[misc]
    assert column_type.storage == "binary"
