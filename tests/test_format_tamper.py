"""Every single-bit flip and every truncation of a stored value raises
DecryptionError: never another exception type, never altered plaintext."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
from typing import Any

import pytest
import sqlalchemy as sa

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import DecryptionError, DeterministicEncrypted, Encrypted
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import assert_no_secret, exception_texts

CASES: dict[str, tuple[Any, Any]] = {
    "str": (sa.String(40), "Test Person \U0001f600"),
    "empty str": (sa.String(40), ""),
    "int": (sa.BigInteger(), -123456789),
    "decimal": (sa.Numeric(12, 2), decimal.Decimal("1234.50")),
    "datetime": (sa.DateTime(timezone=True), dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.UTC)),
    "bytes": (sa.LargeBinary(16), b"\x00secret\xff"),
}


def _flips(data: bytes) -> list[bytes]:
    return [
        data[:index] + bytes((data[index] ^ (1 << bit),)) + data[index + 1 :]
        for index in range(len(data))
        for bit in range(8)
    ]


def _assert_all_rejected(column_type: Any, variants: list[Any], plaintext: Any) -> None:
    secrets = [plaintext] if isinstance(plaintext, (str, bytes)) and len(plaintext) >= 4 else []
    for variant in variants:
        with pytest.raises(DecryptionError) as caught:
            column_type.decrypt(variant)
        assert column_type.column_identity in str(caught.value)
        assert_no_secret(exception_texts(caught.value), *secrets)


@pytest.mark.parametrize("inner, plaintext", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("kind", [Encrypted, DeterministicEncrypted])
@pytest.mark.parametrize("scoped", [False, True], ids=["unscoped", "scoped"])
def test_every_bit_flip_and_truncation_is_rejected(
    keyring: InMemoryKeyring, kind: Any, inner: Any, plaintext: Any, scoped: bool
) -> None:
    column_type = kind(inner, context="tamper.value")
    envelope = column_type.seal(plaintext, tenant_id="t-acme")
    assert column_type.decrypt(envelope) == plaintext
    variants = _flips(envelope) + [envelope[:length] for length in range(len(envelope))]
    if scoped:
        with se.tenant_scope("t-acme"):
            _assert_all_rejected(column_type, variants, plaintext)
    else:
        _assert_all_rejected(column_type, variants, plaintext)


@pytest.mark.parametrize("kind", [Encrypted, DeterministicEncrypted])
def test_base64_storage_flips_and_truncations_are_rejected(
    keyring: InMemoryKeyring, kind: Any
) -> None:
    column_type = kind(sa.String(40), context="tamper.text", storage="base64")
    stored = base64.b64encode(column_type.seal("Test Person", tenant_id="t-acme")).decode()
    assert column_type.decrypt(stored) == "Test Person"
    raw_variants = _flips(stored.encode("ascii"))
    variants: list[Any] = [variant.decode("latin-1") for variant in raw_variants]
    variants += [stored[:length] for length in range(len(stored))]
    _assert_all_rejected(column_type, variants, "Test Person")


@pytest.mark.parametrize("kind", [Encrypted, DeterministicEncrypted])
def test_driver_buffer_types_are_accepted(keyring: InMemoryKeyring, kind: Any) -> None:
    column_type = kind(sa.String(40), context="buffers.value")
    envelope = column_type.seal("Test Person", tenant_id="t-acme")
    for stored in (envelope, bytearray(envelope), memoryview(envelope)):
        assert column_type.decrypt(stored) == "Test Person"
    flipped = bytearray(envelope)
    flipped[-1] ^= 1
    with pytest.raises(DecryptionError):
        column_type.decrypt(memoryview(bytes(flipped)))
