"""Ciphertext format v1: header checks, associated data and nonces."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    DecryptionError,
    DeterministicEncrypted,
    Encrypted,
    KeyPurpose,
    StorageFormatError,
    TenantMismatchError,
)
from sqlalchemy_encrypted._aead import AeadCipher
from sqlalchemy_encrypted.envelope import (
    HEADER_SIZE,
    KEY_VERSION_OFFSET,
    Algorithm,
    build_aad,
    parse_header,
)
from sqlalchemy_encrypted.keys import DataKey
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import assert_no_secret, exception_texts
from .models import Base, Person


def _column(deterministic: bool = False, context: str = "persons.name") -> se.EncryptedType[str]:
    if deterministic:
        return DeterministicEncrypted(sa.String(100), context=context)
    return Encrypted(sa.String(100), context=context)


@pytest.mark.parametrize("deterministic", [False, True], ids=["gcm", "siv"])
def test_header_fields_at_fixed_offsets(keyring: InMemoryKeyring, deterministic: bool) -> None:
    column_type = _column(deterministic)
    envelope = column_type.seal("Test Person", tenant_id="t-acme")
    purpose = KeyPurpose.DETERMINISTIC if deterministic else KeyPurpose.RANDOMIZED
    key = keyring.active_key("t-acme", purpose)
    assert envelope[0] == 0x01
    assert envelope[1] == (0x02 if deterministic else 0x01)
    assert envelope[2] == 0x00
    assert envelope[3] == 0x01  # value type tag of str
    assert uuid.UUID(bytes=envelope[4:20]) == key.key_id
    assert int.from_bytes(envelope[KEY_VERSION_OFFSET:HEADER_SIZE], "big") == key.version
    expected_length = HEADER_SIZE + (16 + 1 if deterministic else 12 + 16) + len("Test Person")
    assert len(envelope) == expected_length


@pytest.mark.parametrize(
    "offset, value, message",
    [
        (0, 0x00, "format version 0"),
        (0, 0x02, "format version 2"),
        (0, 0xFF, "format version 255"),
        (1, 0x00, "algorithm id 0"),
        (1, 0x03, "algorithm id 3"),
        (1, 0xFF, "algorithm id 255"),
        (2, 0x01, "flags 0x01"),
        (2, 0x80, "flags 0x80"),
    ],
)
@pytest.mark.parametrize("deterministic", [False, True], ids=["gcm", "siv"])
def test_unknown_header_values_fail_closed(
    keyring: InMemoryKeyring, deterministic: bool, offset: int, value: int, message: str
) -> None:
    column_type = _column(deterministic)
    envelope = bytearray(column_type.seal("Test Person", tenant_id="t-acme"))
    envelope[offset] = value
    with pytest.raises(StorageFormatError, match=message) as caught:
        column_type.decrypt(bytes(envelope))
    assert isinstance(caught.value, DecryptionError)
    assert "persons.name" in str(caught.value)


def test_algorithm_swap_is_rejected(keyring: InMemoryKeyring) -> None:
    randomized = _column(deterministic=False)
    deterministic = _column(deterministic=True)
    envelope = bytearray(randomized.seal("Test Person", tenant_id="t-acme"))
    with pytest.raises(DecryptionError, match="AES_256_GCM"):
        deterministic.decrypt(bytes(envelope))
    envelope[1] = Algorithm.AES_256_SIV
    with pytest.raises(DecryptionError):
        randomized.decrypt(bytes(envelope))


def test_header_is_authenticated(keyring: InMemoryKeyring) -> None:
    """A header rewritten to name another valid key, version or value type
    does not decrypt."""
    column_type = _column()
    old = column_type.seal("Test Person", tenant_id="t-acme")
    keyring.rotate("t-acme")
    new = column_type.seal("Test Person", tenant_id="t-acme")
    assert column_type.decrypt(old) == "Test Person"
    assert column_type.decrypt(new) == "Test Person"
    header_swapped = new[:HEADER_SIZE] + old[HEADER_SIZE:]
    version_only = (
        old[:KEY_VERSION_OFFSET] + new[KEY_VERSION_OFFSET:HEADER_SIZE] + old[HEADER_SIZE:]
    )
    for forged in (header_swapped, version_only):
        with pytest.raises(DecryptionError) as caught:
            column_type.decrypt(forged)
        assert "Test Person" not in str(caught.value)
    retagged = bytearray(old)
    retagged[3] = 0x02
    with pytest.raises(DecryptionError, match="value type tag"):
        column_type.decrypt(bytes(retagged))


def test_aad_is_length_prefixed() -> None:
    header = bytes(24)
    assert build_aad(header, "a.b", "c") != build_aad(header, "a.bc", "")
    assert build_aad(header, "a.b", "c") == (header + b"\x00\x00\x00\x03a.b" + b"\x00\x00\x00\x01c")


@pytest.mark.parametrize("deterministic", [False, True], ids=["gcm", "siv"])
def test_value_bound_to_column_identity(keyring: InMemoryKeyring, deterministic: bool) -> None:
    source = _column(deterministic, context="persons.name")
    envelope = source.seal("Test Person", tenant_id="t-acme")
    for other in ("persons.nickname", "people.name", "persons.nam", "persons.name "):
        target = _column(deterministic, context=other)
        with pytest.raises(DecryptionError) as caught:
            target.decrypt(envelope)
        assert other in str(caught.value)
        assert_no_secret(exception_texts(caught.value), "Test Person")
    assert _column(deterministic, context="persons.name").decrypt(envelope) == "Test Person"


def test_context_keeps_identity_across_rename(keyring: InMemoryKeyring) -> None:
    """A column renamed in the schema keeps reading its values when context=
    names the old identity."""
    old_table = sa.Table("people", sa.MetaData(), sa.Column("full_name", Encrypted(sa.String(50))))
    envelope = old_table.c.full_name.type.seal("Test Person", tenant_id="t-acme")
    renamed = sa.Table(
        "persons",
        sa.MetaData(),
        sa.Column("name", Encrypted(sa.String(50), context="people.full_name")),
    )
    plain_rename = sa.Table("persons", sa.MetaData(), sa.Column("name", Encrypted(sa.String(50))))
    assert renamed.c.name.type.decrypt(envelope) == "Test Person"
    with pytest.raises(DecryptionError, match=r"persons\.name"):
        plain_rename.c.name.type.decrypt(envelope)


@pytest.fixture
def people(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    sa.Table(
        "archive",
        Base.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", Encrypted(sa.String(100))),
        extend_existing=True,
    ).create(engine)
    with Session(engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Test Person", email="a@example.test"))
        session.add(Person(id=2, tenant_id="t-globex", name="Other Person", email="b@example.test"))
        session.commit()
    yield engine
    Base.metadata.remove(Base.metadata.tables["archive"])


def _copy_raw(engine: sa.Engine, sql: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(sql)


def test_value_copied_to_other_column_fails(people: sa.Engine) -> None:
    _copy_raw(people, "UPDATE persons SET email = name WHERE id = 1")
    with Session(people) as session:
        with pytest.raises(DecryptionError, match=r"persons\.email"):
            session.scalars(sa.select(Person.email).where(Person.id == 1)).all()
        assert session.scalars(sa.select(Person.name).where(Person.id == 1)).one() == "Test Person"


def test_value_copied_to_other_table_fails(people: sa.Engine) -> None:
    _copy_raw(people, "INSERT INTO archive (id, name) SELECT id, name FROM persons WHERE id = 1")
    archive = Base.metadata.tables["archive"]
    with people.connect() as conn:
        with pytest.raises(DecryptionError, match=r"archive\.name") as caught:
            conn.execute(sa.select(archive.c.name)).all()
    assert_no_secret(exception_texts(caught.value), "Test Person")


def test_value_copied_to_other_tenant(people: sa.Engine) -> None:
    """A t-acme value copied into a t-globex row does not decrypt for
    t-globex. Outside any tenant scope the key's own tenant is trusted, as
    the docs state."""
    _copy_raw(
        people, "UPDATE persons SET name = (SELECT name FROM persons WHERE id = 1) WHERE id = 2"
    )
    with se.tenant_scope("t-globex"), Session(people) as session:
        with pytest.raises(TenantMismatchError) as caught:
            session.scalars(sa.select(Person.name).where(Person.id == 2)).all()
    assert isinstance(caught.value, DecryptionError)
    assert "persons.name" in str(caught.value)
    assert "t-globex" in str(caught.value)
    assert_no_secret(exception_texts(caught.value), "Test Person")
    with Session(people) as session:
        unscoped = session.scalars(sa.select(Person.name).where(Person.id == 2)).one()
    assert unscoped == "Test Person"


def test_tenant_scope_cannot_read_other_tenant(people: sa.Engine) -> None:
    with se.tenant_scope("t-globex"), Session(people) as session:
        with pytest.raises(TenantMismatchError):
            session.get(Person, 1)
        assert (
            session.scalars(sa.select(Person.id).where(Person.email == "a@example.test")).all()
            == []
        )


def test_nonces_unique_over_100k_values() -> None:
    key = DataKey(
        uuid.uuid4(),
        "t-acme",
        KeyPurpose.RANDOMIZED,
        1,
        AeadCipher(Algorithm.AES_256_GCM, bytes(32)),
    )
    column_type = _column()
    nonces = {
        column_type.seal("same value", key=key)[HEADER_SIZE : HEADER_SIZE + 12]
        for _ in range(100_000)
    }
    assert len(nonces) == 100_000


def test_equal_plaintexts_give_unrelated_ciphertexts(
    engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    """1,000 copies of one value under one DEK: distinct nonces, none taken
    from the key, and no shared bytes after the header for similar values."""
    material = hashlib.sha256(b"test dek").digest()
    key = DataKey(
        uuid.uuid4(),
        "t-acme",
        KeyPurpose.RANDOMIZED,
        1,
        AeadCipher(Algorithm.AES_256_GCM, material),
    )
    column_type = _column()
    envelopes = [column_type.seal("same value", key=key) for _ in range(1000)]
    nonces = [envelope[HEADER_SIZE : HEADER_SIZE + 12] for envelope in envelopes]
    assert len(set(envelopes)) == 1000
    assert len(set(nonces)) == 1000
    forbidden = material + hashlib.sha256(material).digest()
    assert not any(nonce in forbidden for nonce in nonces)
    first = column_type.seal("prefix-prefix-AAAA1", key=key)[HEADER_SIZE:]
    second = column_type.seal("prefix-prefix-AAAA2", key=key)[HEADER_SIZE:]
    shared_prefix = next(i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b)
    assert shared_prefix < 4

    table = sa.Table(
        "repeats",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", Encrypted(sa.String(20))),
    )
    table.metadata.create_all(engine)
    with se.tenant_scope("t-acme"), engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "value": "same value"} for i in range(1000)])
        stored = [bytes(v) for v in conn.exec_driver_sql("SELECT value FROM repeats").scalars()]
    assert len(set(stored)) == 1000
    assert len({value[HEADER_SIZE : HEADER_SIZE + 12] for value in stored}) == 1000


def test_deterministic_values_differ_by_column_and_tenant(keyring: InMemoryKeyring) -> None:
    email = _column(deterministic=True, context="persons.email")
    backup = _column(deterministic=True, context="persons.backup_email")
    acme = email.seal("shared@example.test", tenant_id="t-acme")
    assert acme == email.seal("shared@example.test", tenant_id="t-acme")
    assert acme != backup.seal("shared@example.test", tenant_id="t-acme")
    assert acme != email.seal("shared@example.test", tenant_id="t-globex")


def test_parse_header_reads_known_envelope(keyring: InMemoryKeyring) -> None:
    envelope = _column(deterministic=True).seal("x", tenant_id="t-acme")
    header = parse_header(envelope)
    assert header.algorithm is Algorithm.AES_256_SIV
    assert header.key_version == 1
    assert header.pack() == envelope[:HEADER_SIZE]
