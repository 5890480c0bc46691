"""Tell a stored envelope from a plaintext value, one value at a time.

A value counts as an envelope only when its header parses *and* it
authenticates under the column's type and the row's tenant. A value whose
header does not parse is plaintext. A value whose header parses but which
does not authenticate is neither: it may be a damaged envelope, one copied
from another column or tenant, or plaintext that happens to look like a
header. Treating it as plaintext could encrypt an envelope twice, so
:func:`classify_stored` raises :class:`DecryptionError` for it and the
migration stops before writing that row.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy_encrypted.envelope import parse_header
from sqlalchemy_encrypted.errors import (
    DecryptionError,
    KeyNotFoundError,
    MigrationError,
    StorageFormatError,
    TenantContextError,
)
from sqlalchemy_encrypted.tenancy import tenant_scope
from sqlalchemy_encrypted.types import EncryptedType

__all__ = ["Classified", "ValueForm", "classify_stored", "plaintext_value"]


class ValueForm(enum.Enum):
    """The form of one stored value."""

    NULL = "null"
    ENVELOPE = "envelope"
    PLAINTEXT = "plaintext"


@dataclass(frozen=True)
class Classified:
    """A stored value with its form; ``value`` is the decrypted value of an envelope."""

    form: ValueForm
    value: Any = None


def _as_bytes(raw: Any) -> bytes | None:
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, (bytearray, memoryview)):
        return bytes(raw)
    return None


def _envelope_bytes(column_type: EncryptedType[Any], raw: Any) -> bytes | None:
    """Return the envelope bytes a stored value would hold, or None if it cannot be one."""
    data = _as_bytes(raw)
    if column_type.storage == "base64":
        if data is not None:
            return None
        if not isinstance(raw, str):
            return None
        try:
            return base64.b64decode(raw.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            return None
    return data


@contextlib.contextmanager
def _scope(tenant_id: str | None) -> Iterator[None]:
    if tenant_id is None:
        yield
        return
    with tenant_scope(tenant_id):
        yield


def classify_stored(
    column_type: EncryptedType[Any], raw: Any, tenant_id: str | None, where: str
) -> Classified:
    """Classify one raw stored value of a column declared ``column_type``.

    ``raw`` is the value as the database driver returned it. ``tenant_id``
    is the row's tenant: an envelope of another tenant does not count as
    this row's envelope. ``where`` names the table, column and row in error
    messages. Raises :class:`DecryptionError` for a value with a valid
    envelope header that does not authenticate; KMS errors propagate.
    """
    if raw is None:
        return Classified(ValueForm.NULL)
    data = _envelope_bytes(column_type, raw)
    if data is None:
        return Classified(ValueForm.PLAINTEXT)
    try:
        header = parse_header(data, where)
    except StorageFormatError:
        return Classified(ValueForm.PLAINTEXT)
    stored = raw if column_type.storage == "base64" else data
    try:
        with _scope(tenant_id):
            value = column_type.decrypt(stored)
    except (DecryptionError, KeyNotFoundError, TenantContextError) as exc:
        raise DecryptionError(
            f"{where}: the value has a valid envelope header (key id {header.key_id}, "
            f"key version {header.key_version}) but cannot be opened: {exc}. It is neither "
            "plaintext nor a readable envelope, so it is left unchanged; restore its key, "
            "or correct or clear the value, then run the migration again"
        ) from None
    return Classified(ValueForm.ENVELOPE, value)


def plaintext_value(raw: Any, python_type: type[Any] | None, where: str) -> Any:
    """Interpret a stored plaintext value as a value of ``python_type``.

    Bytes become ``str`` by UTF-8 decoding when the target type is text. That
    covers plaintext written into a binary column by raw SQL. Other values
    are returned unchanged, and the column's codec checks their type.
    """
    data = _as_bytes(raw)
    if data is not None:
        if python_type is str:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                raise MigrationError(
                    f"{where}: the value is neither an envelope nor UTF-8 text, so it "
                    "cannot be read as the column's string type"
                ) from None
        return data
    if python_type is bytes and isinstance(raw, str):
        return raw.encode("utf-8")
    return raw
