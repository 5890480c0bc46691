"""Pytest fixtures and assertions for applications that use encrypted columns.

The plugin is not loaded automatically. Enable it in the ``conftest.py`` at
the root of your test suite::

    pytest_plugins = ["sqlalchemy_encrypted.pytest_plugin"]

Fixtures:

* ``encryption_keyring``: an
  :class:`~sqlalchemy_encrypted.testing.InMemoryKeyring` installed as the
  default key provider for one test. The previous default provider and
  default tenant are restored afterwards.
* ``encryption_local_kms``: a :class:`~sqlalchemy_encrypted.kms.LocalKms`
  with a fresh key file in the test's ``tmp_path``, for tests that run a
  real :class:`~sqlalchemy_encrypted.keyring.Keyring`. The default key
  provider is restored after the test, so a keyring created in it does
  not leak into the next test.

:func:`stored_values` reads a column's stored values past the column type,
and :func:`assert_encrypted_at_rest` checks that every one is an envelope
that contains none of the given plaintexts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from . import keys, tenancy
from ._storage import coerce_stored
from .envelope import EnvelopeHeader, parse_header
from .errors import StorageFormatError
from .kms import LocalKms
from .testing import InMemoryKeyring
from .types import EncryptedType

__all__ = [
    "assert_encrypted_at_rest",
    "encryption_keyring",
    "encryption_local_kms",
    "stored_values",
]


@contextlib.contextmanager
def _restored_defaults() -> Iterator[None]:
    """Restore the default key provider and default tenant on exit."""
    previous_provider = keys._default_provider
    previous_tenant = tenancy.get_default_tenant()
    try:
        yield
    finally:
        keys.set_default_key_provider(previous_provider)
        tenancy.set_default_tenant(previous_tenant)


@pytest.fixture
def encryption_keyring() -> Iterator[InMemoryKeyring]:
    """Install an in-memory keyring as the default key provider for one test."""
    with _restored_defaults():
        provider = InMemoryKeyring()
        keys.set_default_key_provider(provider)
        yield provider


@pytest.fixture
def encryption_local_kms(tmp_path: Path) -> Iterator[LocalKms]:
    """Create a local KMS key file (mode 0600) in the test's temporary folder.

    A :class:`~sqlalchemy_encrypted.keyring.Keyring` created in the test
    makes itself the default key provider; the previous default is restored
    after the test.
    """
    with _restored_defaults():
        yield LocalKms.create(tmp_path / "sqlalchemy-encrypted-master.key", kek="test")


def _encrypted_type(column: Any) -> EncryptedType[Any]:
    column_type = getattr(column, "type", None)
    if not isinstance(column_type, EncryptedType):
        name = getattr(column, "key", column)
        raise TypeError(f"column {name!r} is not an Encrypted or DeterministicEncrypted column")
    return column_type


def stored_values(connection: sa.Connection, column: Any) -> list[bytes | str | None]:
    """Return the stored values of an encrypted column as the database holds them.

    ``column`` is a table column or an ORM attribute such as ``Patient.email``.
    Nothing is decrypted: values come back as bytes (or str for base64
    storage), and SQL NULL as None. Rows come in the order of the table's
    primary key when it has one.
    """
    column_type = _encrypted_type(column)
    expression = column.__clause_element__() if hasattr(column, "__clause_element__") else column
    statement = sa.select(sa.type_coerce(expression, column_type.impl))
    primary_key = list(getattr(getattr(expression, "table", None), "primary_key", []))
    if primary_key:
        statement = statement.order_by(*primary_key)
    return [
        bytes(value) if isinstance(value, (bytearray, memoryview)) else value
        for value in connection.execute(statement).scalars()
    ]


def assert_encrypted_at_rest(
    connection: sa.Connection, column: Any, plaintexts: Iterable[str | bytes] = ()
) -> list[EnvelopeHeader]:
    """Assert that every stored value of ``column`` is an envelope free of ``plaintexts``.

    Each non-NULL value must parse as an envelope of the column's algorithm,
    and none may contain any of ``plaintexts`` (str is checked as UTF-8).
    Returns the parsed headers, for example to check the key versions in use.
    Raises :class:`AssertionError` naming the column and the row position,
    never the plaintext.
    """
    column_type = _encrypted_type(column)
    identity = column_type.column_identity
    needles = [p.encode("utf-8") if isinstance(p, str) else bytes(p) for p in plaintexts]
    headers = []
    for position, stored in enumerate(stored_values(connection, column)):
        if stored is None:
            continue
        failure: StorageFormatError | None = None
        try:
            envelope = coerce_stored(stored, column_type.storage, identity)
            header = parse_header(envelope, f"encrypted column {identity}")
        except StorageFormatError as exc:
            failure = exc
        if failure is not None:
            raise AssertionError(f"row {position}: {failure}")
        if header.algorithm is not column_type.algorithm:
            raise AssertionError(
                f"{identity}, row {position}: sealed with {header.algorithm.name}, "
                f"expected {column_type.algorithm.name}"
            )
        for index, needle in enumerate(needles):
            if needle and needle in envelope:
                raise AssertionError(
                    f"{identity}, row {position}: stored bytes contain plaintext number {index}"
                )
        headers.append(header)
    return headers
