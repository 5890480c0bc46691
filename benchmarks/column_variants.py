"""The ways of storing the three sensitive columns that ``bench_columns.py`` compares.

Every variant maps the same five columns (id, tenant_id, email, ssn, notes)
onto two tables, ``bench_<variant>_orm`` for the ORM steps and
``bench_<variant>_core`` for the Core ``executemany`` step. Only the types of
email, ssn and notes differ:

``plain``
    String(255), String(16) and Text, no encryption.
``bare``
    The floor: a minimal hand-written TypeDecorator over LargeBinary that
    reuses one module-level ``AESGCM`` or ``AESSIV`` object and stores raw
    ``nonce|ciphertext|tag`` (GCM) or ``siv|ciphertext`` (SIV). It has no
    header, no AAD and one global key. Email uses AES-SIV so that it stays
    searchable.
``su_gcm``
    sqlalchemy-utils ``StringEncryptedType`` with ``AesGcmEngine`` on all
    three columns.
``lib``
    This library: ``DeterministicEncrypted`` email, ``Encrypted`` ssn and
    notes, keys from an ``InMemoryKeyring``, work inside ``tenant_scope``.
``lib_rowtenant``
    As ``lib``, but the table names its tenant column in ``Table.info``, so
    each written row is sealed under the tenant in its own tenant_id.
``lib_kms``
    As ``lib``, with the production ``Keyring`` (keyring table in a SQLite
    file, DEKs wrapped by ``LocalKms``) in place of the in-memory keyring.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted, KeyProvider
from sqlalchemy_encrypted.testing import InMemoryKeyring

__all__ = ["ALL_VARIANTS", "TENANT", "Variant", "build_variants"]

TENANT = "tenant-bench"

# The floor reuses one prebuilt AEAD object per algorithm, as a careful
# hand-written column type would. It is a measuring stick, not a design to
# copy: one global key, no key id, and nothing binds a value to its column.
_BARE_GCM = AESGCM(os.urandom(32))
_BARE_SIV = AESSIV(os.urandom(64))
_GCM_NONCE_SIZE = 12

# sqlalchemy-utils derives its AES key from this secret with SHA-256.
_SU_SECRET = os.urandom(32).hex()


class BareGcmText(sa.types.TypeDecorator[str]):
    """AES-256-GCM under a fresh random nonce, stored as nonce|ciphertext|tag."""

    impl = sa.LargeBinary
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> bytes | None:
        if value is None:
            return None
        nonce = os.urandom(_GCM_NONCE_SIZE)
        return nonce + _BARE_GCM.encrypt(nonce, value.encode("utf-8"), None)

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        nonce, sealed = value[:_GCM_NONCE_SIZE], value[_GCM_NONCE_SIZE:]
        return _BARE_GCM.decrypt(nonce, sealed, None).decode("utf-8")


class BareSivText(sa.types.TypeDecorator[str]):
    """AES-256-SIV, so equal strings give equal bytes and ``==`` works."""

    impl = sa.LargeBinary
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> bytes | None:
        if value is None:
            return None
        return _BARE_SIV.encrypt(value.encode("utf-8"), None)

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return _BARE_SIV.decrypt(value, None).decode("utf-8")


def _su_gcm(length: int | None) -> sa.types.TypeEngine[Any]:
    from sqlalchemy_utils import StringEncryptedType
    from sqlalchemy_utils.types.encrypted.encrypted_type import AesGcmEngine

    column_type: sa.types.TypeEngine[Any] = StringEncryptedType(
        sa.String(length), _SU_SECRET, AesGcmEngine
    )
    return column_type


@dataclass
class Variant:
    """One way of storing email, ssn and notes, with its two tables."""

    name: str
    description: str
    model: type[Any]
    orm_table: sa.Table
    core_table: sa.Table
    # The production keyring of lib_kms, for its cache statistics.
    keyring: Any = None
    close: Callable[[], None] = field(default=lambda: None)


@dataclass
class _Spec:
    description: str
    email: Callable[[], Any]
    ssn: Callable[[], Any]
    notes: Callable[[], Any]
    tenant_column: bool = False
    keyring: Any = None
    close: Callable[[], None] = field(default=lambda: None)


def _library_spec(description: str, keyring: KeyProvider, **options: Any) -> _Spec:
    # Each factory call builds a fresh instance: an encrypted type belongs to one column.
    return _Spec(
        description,
        email=lambda: DeterministicEncrypted(sa.String(255), keyring=keyring),
        ssn=lambda: Encrypted(sa.String(11), keyring=keyring),
        notes=lambda: Encrypted(sa.Text(), keyring=keyring),
        keyring=keyring,
        **options,
    )


def _production_keyring(workdir: Path) -> tuple[Any, Callable[[], None]]:
    """Build a Keyring over a LocalKms with its keyring table in a SQLite file."""
    from sqlalchemy_encrypted.keyring import Keyring
    from sqlalchemy_encrypted.kms import LocalKms

    engine = sa.create_engine(f"sqlite:///{workdir / 'keyring.db'}")
    keyring = Keyring(engine, LocalKms.from_key_material(os.urandom(32)), set_default=False)
    keyring.create_table()
    return keyring, engine.dispose


def _spec(name: str, workdir: Path) -> _Spec:
    if name == "plain":
        return _Spec(
            "String(255), String(16), Text",
            email=lambda: sa.String(255),
            ssn=lambda: sa.String(16),
            notes=sa.Text,
        )
    if name == "bare":
        return _Spec(
            "hand-written TypeDecorator, module-level AESSIV/AESGCM, no header",
            email=BareSivText,
            ssn=BareGcmText,
            notes=BareGcmText,
        )
    if name == "su_gcm":
        return _Spec(
            "sqlalchemy-utils StringEncryptedType + AesGcmEngine",
            email=lambda: _su_gcm(255),
            ssn=lambda: _su_gcm(None),
            notes=lambda: _su_gcm(None),
        )
    if name == "lib":
        return _library_spec("this library, InMemoryKeyring, tenant_scope", InMemoryKeyring())
    if name == "lib_rowtenant":
        return _library_spec(
            "this library, InMemoryKeyring, tenant column in Table.info",
            InMemoryKeyring(),
            tenant_column=True,
        )
    if name == "lib_kms":
        keyring, close = _production_keyring(workdir)
        return _library_spec("this library, Keyring + LocalKms, tenant_scope", keyring, close=close)
    raise ValueError(f"unknown variant {name!r}: choose from {', '.join(ALL_VARIANTS)}")


ALL_VARIANTS = ("plain", "bare", "su_gcm", "lib", "lib_rowtenant", "lib_kms")


def _table(metadata: sa.MetaData, name: str, spec: _Spec) -> sa.Table:
    info = {"tenant_column": "tenant_id"} if spec.tenant_column else {}
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("email", spec.email(), nullable=False, index=True),
        sa.Column("ssn", spec.ssn(), nullable=False),
        sa.Column("notes", spec.notes(), nullable=False),
        info=info,
    )


def build_variants(names: list[str], workdir: Path) -> list[Variant]:
    """Declare the tables of the requested variants on one new MetaData."""

    class Base(DeclarativeBase):
        pass

    variants = []
    for name in names:
        spec = _spec(name, workdir)
        orm_table = _table(Base.metadata, f"bench_{name}_orm", spec)
        core_table = _table(Base.metadata, f"bench_{name}_core", spec)
        model = type(f"Row_{name}", (Base,), {"__table__": orm_table})
        variants.append(
            Variant(
                name=name,
                description=spec.description,
                model=model,
                orm_table=orm_table,
                core_table=core_table,
                keyring=spec.keyring,
                close=spec.close,
            )
        )
    return variants
